"""SmolVLM and SmolVLM2 (``SmolVLMForConditionalGeneration``): Idefics3's successor.

The model, its image processor and its image prompt string are Idefics3's (transformers
generates them from Idefics3's code): each image is resized, cut into square crops plus a
global image, each folded by pixel shuffle into a ``g x g`` grid, written as
``<fake_token_around_image><row_i_col_j><image>*g²`` per crop and ``<global-img>`` before the
global image; ``pixel_attention_mask`` marks real pixels. vlens reuses the Idefics3 adapter
for all of it (layout, token boxes, scene geometry, the contract: a 1-D causal Llama tower
with no per-token inputs) and TransformerLens's Idefics3 mapping, whose module tree
(``model.vision_model``, ``model.connector``, ``model.text_model``, ``lm_head``) SmolVLM
keeps.

What differs is the processor: ``SmolVLMProcessor`` holds a video processor (which
transformers builds only with torchvision; vlens then loads it for images only), its
``__init__`` refuses to run without ``num2words`` (used to spell a video's frame count;
vlens stands in for it while loading, see ``vlens.adapters._processors``), and its
``apply_chat_template`` reads the video processor's frame count and rate even for images, so
without a video processor vlens calls the ``ProcessorMixin.apply_chat_template`` it wraps.
"""

from __future__ import annotations

from vlens.adapters.idefics3 import Idefics3Adapter


class SmolVLMAdapter(Idefics3Adapter):
    """SmolVLM / SmolVLM2: Idefics3's crops and global image, SmolVLM's processor."""

    family = "smolvlm"
    hf_architectures = ("SmolVLMForConditionalGeneration",)
    tl_architecture = "Idefics3ForConditionalGeneration"  # the same module tree; TL 4.3 has no SmolVLM entry
    vision_model_types = ("smolvlm_vision",)
    video_processor_class = "SmolVLMProcessor"
    fallback_template = "<|im_start|>User:{images}{prompt}<end_of_utterance>\nAssistant:"

    def render_chat(self, messages: list[dict]) -> str:
        if getattr(self.processor, "video_processor", None) is not None:
            return super().render_chat(messages)
        # SmolVLMProcessor.apply_chat_template only adds the video processor's num_frames / fps
        # to the processor kwargs, then calls ProcessorMixin's, which renders the template.
        from transformers.processing_utils import ProcessorMixin

        text = ProcessorMixin.apply_chat_template(self.processor, messages, add_generation_prompt=True, tokenize=False)
        assert isinstance(text, str)
        return text

    def describe(self) -> dict:
        return {**super().describe(), "video_processor": getattr(self.processor, "video_processor", None) is not None}
