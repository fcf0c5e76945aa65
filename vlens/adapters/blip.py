"""The BLIP family: BLIP-2 (OPT or Llama tower), InstructBLIP (Llama tower), MiniGPT-4.

A BLIP model reads an image through a ViT, then a Q-Former: ``num_query_tokens``
learned queries self-attend, cross-attend to the ViT's patches, and become, through one
linear layer (``language_projection``; MiniGPT-4's ``llama_proj``), that many visual
tokens of the language model. The queries sit on no grid, so their tokens are labelled
``<q k>`` and the layout's spans have no grid; instead each span carries
``query_attention``: where on the patch grid each query looks (its Q-Former
cross-attention, averaged over cross-attention layers and heads), so per-token results
can still be drawn on the image (``ImageSpan.to_grid``).

Where the placeholders go:
    * BLIP-2 and InstructBLIP (Hugging Face's processors): the processor puts
      ``num_query_tokens`` copies of ``<image>`` in front of the text (before BOS); the
      prompt itself holds no placeholder.
    * MiniGPT-4 (converted by ``vlens convert minigpt4``): the processor has no
      ``num_query_tokens``; its chat template writes the placeholders inline, in
      ``###Human: <Img>...</Img> prompt###Assistant:``.

InstructBLIP's Q-Former also reads the instruction, so its visual tokens depend on the
prompt: each span records the text the Q-Former read (``connector_text``). As in
InstructBLIP's training and in generation, the Q-Former reads the prompt only, never
the answer appended for teacher forcing.

Contract: a 1-D causal language model (OPT's learned positions or Llama's rotary ones)
with no per-token inputs; query tokens cover no box of the image, and scenes are drawn at
the vision tower's size, labelled on the patch grid the queries' attention is drawn on.

TransformerLens has no adapter for these models; the one in ``_qformer_bridge`` is
registered with TransformerLens's factory when this module is imported.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import PIL.Image
import torch
from jaxtyping import Float
from torch import Tensor
from transformers import BatchFeature

from vlens._modules import submodule, tensor
from vlens.adapters import _qformer_bridge
from vlens.adapters.base import VisionPrefixAdapter
from vlens.adapters.contract import SceneGeometry, SequentialPositions, no_boxes
from vlens.errors import PromptError, UnsupportedArchitectureError
from vlens.layout import ImageSpan, TokenLayout, contiguous_runs

if TYPE_CHECKING:
    from vlens.inputs import VLMInputs
    from vlens.model import HookedVLM

_qformer_bridge.register()

QUERY_LABEL = "Q-Former queries"
"""What figures call these visual tokens (``ImageSpan.query_label``)."""

_LANGUAGE_STAGE = ("embed.", "hook_embed", "pos_embed.", "rotary_emb.", "blocks.", "ln_final.", "unembed.", "hook_unembed")


def query_span(image_index: int, positions: torch.Tensor, n_query: int, label: str = "q") -> ImageSpan:
    """A span of ``n_query`` Q-Former query tokens: no grid, labels ``<q 0>`` ... ."""
    if positions.shape[0] != n_query:
        raise PromptError(
            f"image {image_index} has {positions.shape[0]} placeholder tokens but the Q-Former makes {n_query} "
            "query tokens per image"
        )
    return ImageSpan(
        image_index=image_index,
        positions=positions,
        tile=torch.zeros(n_query, dtype=torch.long),
        row_col=torch.full((n_query, 2), -1, dtype=torch.long),
        tile_grids={},
        labels=tuple(f"<{label} {k}>" for k in range(n_query)),
        query_label=QUERY_LABEL,
    )


class Blip2Adapter(SequentialPositions, VisionPrefixAdapter):
    """``Blip2ForConditionalGeneration``: BLIP-2 with an OPT or Llama tower, and MiniGPT-4."""

    family = "blip2"
    hf_architectures = ("Blip2ForConditionalGeneration",)
    tl_architecture = "Blip2ForConditionalGeneration"
    fallback_template = "Question: {prompt} Answer:"
    per_token_inputs = ()
    causal_over_image = True
    language_towers: ClassVar[tuple[str, ...]] = ("opt", "llama")
    layout_needs_model = True
    stage_prefixes = {
        "vision": ("vision_encoder.",),
        "qformer": ("qformer.",),
        "connector": ("vision_projector.",),
        "language": _LANGUAGE_STAGE,
    }

    def __init__(self, config: Any, processor: Any) -> None:
        super().__init__(config, processor)
        if isinstance(getattr(processor, "image_token", None), str):
            # When the tokenizer declares image_token, HF's BLIP processors keep it as a str
            # and then fail on ``image_token.content`` at call time; give them the AddedToken
            # they expect (the same token).
            from transformers import AddedToken

            processor.image_token = AddedToken(processor.image_token, normalized=False, special=True)
        if getattr(processor, "chat_template", None) is None and getattr(self.tokenizer, "chat_template", None):
            # Blip2Processor.__init__ drops the chat_template that from_pretrained reads from
            # the folder; the tokenizer loads the same file, so take it from there.
            processor.chat_template = self.tokenizer.chat_template

    @classmethod
    def check_config(cls, config: Any) -> None:
        super().check_config(config)
        text_type = getattr(config.text_config, "model_type", None)
        if getattr(config.text_config, "is_encoder_decoder", False) or not getattr(
            config, "use_decoder_only_language_model", True
        ):
            raise UnsupportedArchitectureError(
                f"{cls.family}: encoder-decoder language models ({text_type!r}, e.g. Flan-T5) are not supported; vlens "
                f"supports decoder-only towers {list(cls.language_towers)}, whose visual tokens prefix the input"
            )
        if text_type not in cls.language_towers:
            raise UnsupportedArchitectureError(
                f"{cls.family}: a {text_type!r} language model is not supported; vlens handles {list(cls.language_towers)}"
            )
        if config.vision_config.model_type not in ("blip_2_vision_model", "instructblip_vision_model"):
            raise UnsupportedArchitectureError(
                f"{cls.family}: vision tower {config.vision_config.model_type!r} is not supported"
            )

    @property
    def n_query(self) -> int:
        return int(self.config.num_query_tokens)

    @property
    def processor_inserts_queries(self) -> bool:
        """True for HF's BLIP processors (queries prepended), False for inline placeholders (MiniGPT-4)."""
        return getattr(self.processor, "num_query_tokens", None) is not None

    # ---- prompts ---------------------------------------------------------------------

    def format_prompt(self, prompt: str, n_images: int, chat_template: bool) -> str:
        if n_images != 1:
            raise PromptError(f"{self.family} reads exactly one image per prompt, got {n_images}")
        placeholder = self.image_token
        found = prompt.count(placeholder)
        if self.processor_inserts_queries:
            if found:
                raise PromptError(
                    f"prompt {prompt!r} contains {placeholder!r}: the {self.family} processor puts the image's "
                    f"{self.n_query} query tokens before the text itself; pass the prompt without it"
                )
            if chat_template and getattr(self.processor, "chat_template", None):
                messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
                return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.fallback_template.format(images="", prompt=prompt) if chat_template else prompt
        if not chat_template:
            if found != self.n_query * n_images:
                raise PromptError(
                    f"prompt {prompt!r} has {found} placeholder token(s) {placeholder!r}; with chat_template=False "
                    f"write {self.n_query} per image (the chat template does this for you)"
                )
            return prompt
        if found:
            raise PromptError(f"prompt {prompt!r} contains {placeholder!r}; the chat template places the image")
        if not getattr(self.processor, "chat_template", None):
            raise PromptError(
                f"this {self.family} checkpoint's processor has no chat template to place the image with; pass "
                f"chat_template=False and write {self.n_query} {placeholder!r} tokens where the image goes"
            )
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    # ---- layout ----------------------------------------------------------------------

    def image_spans(self, batch: BatchFeature, row: int, positions: torch.Tensor) -> list[ImageSpan]:
        runs = contiguous_runs(positions)
        if len(runs) != 1:
            raise PromptError(
                f"row {row}: expected one image as one run of {self.n_query} {self.image_token!r} tokens, found "
                f"{len(runs)} runs ({positions.numel()} tokens): the text holds {self.image_token!r} or a word the "
                "tokenizer maps to it"
            )
        return [replace(query_span(0, runs[0], self.n_query), connector_text=self.qformer_text(batch, row))]

    def qformer_text(self, batch: BatchFeature, row: int) -> str | None:
        """The text the Q-Former read for one row (None: BLIP-2's Q-Former reads none)."""
        return None

    def enrich_layout(self, model: "HookedVLM", inputs: "VLMInputs") -> TokenLayout:
        """Add each span's ``query_attention``: the queries' cross-attention over the patch
        grid (CLS dropped), averaged over the Q-Former's cross-attention layers and heads."""
        attn = self.query_attention(model, inputs)  # [batch, query, rows, cols]
        images = tuple(
            tuple(replace(span, query_attention=attn[row]) for span in spans)
            for row, spans in enumerate(inputs.layout.images)
        )
        return replace(inputs.layout, images=images)

    def query_attention(self, model: "HookedVLM", inputs: "VLMInputs") -> torch.Tensor:
        """Cross-attention of each query over the patch grid, ``[batch, query, rows, cols]``.

        Runs the vision encoder and the Q-Former only, capturing the cross-attention
        patterns at their hook points (no other hook is attached, so this costs one
        vision + Q-Former forward).
        """
        names = [n for n in model.hook_index.points if n.startswith("qformer.layers.") and n.endswith("cross_attn.hook_pattern")]
        if not names:
            raise UnsupportedArchitectureError(f"{self.family}: the Q-Former has no cross-attention hook points")
        patterns: list[torch.Tensor] = []

        def keep(tensor: torch.Tensor, hook: Any) -> None:
            patterns.append(tensor.detach().float())

        hf = model.hf_model
        kwargs = inputs.to(model.device, dtype=model.dtype).model_kwargs()
        with torch.no_grad(), model.hooks([(name, keep) for name in names]):
            image_embeds = submodule(hf, "vision_model")(pixel_values=kwargs["pixel_values"]).last_hidden_state
            query_tokens = tensor(hf, "query_tokens").expand(image_embeds.shape[0], -1, -1)
            image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
            submodule(hf, "qformer")(
                query_embeds=query_tokens,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_mask,
                **self._qformer_text_kwargs(kwargs, query_tokens),
            )
        mean = torch.stack(patterns).mean(dim=(0, 2))[:, : self.n_query, 1:]  # layers, heads; drop CLS key
        rows, cols = self.patch_grid(kwargs["pixel_values"])
        if mean.shape[-1] != rows * cols:
            raise UnsupportedArchitectureError(
                f"{self.family}: the Q-Former attends to {mean.shape[-1]} patches, not a {rows}x{cols} grid"
            )
        return mean.reshape(mean.shape[0], mean.shape[1], rows, cols).cpu()

    def _qformer_text_kwargs(self, kwargs: dict, query_tokens: torch.Tensor) -> dict:
        return {}

    def patch_grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        patch = int(self.config.vision_config.patch_size)
        return pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch

    # ---- pixel geometry ----------------------------------------------------------------

    def token_boxes(self, span: ImageSpan, image_size: tuple[int, int]) -> Float[Tensor, "n 4"]:
        # A query token mixes every patch it attends to (ImageSpan.query_attention): no box.
        return no_boxes(span.n_tokens)

    def scene_geometry(self) -> SceneGeometry:
        vision = self.config.vision_config
        patch = int(vision.patch_size)
        return SceneGeometry(image_size=int(vision.image_size) // patch * patch, patch_size=patch, token_grid=None)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "num_query_tokens": self.n_query, "language_model": self.config.text_config.model_type}


class InstructBlipAdapter(Blip2Adapter):
    """``InstructBlipForConditionalGeneration`` with a Llama (Vicuna) tower."""

    family = "instructblip"
    hf_architectures = ("InstructBlipForConditionalGeneration",)
    tl_architecture = "InstructBlipForConditionalGeneration"
    fallback_template = "{prompt}"
    language_towers = ("llama",)
    model_input_names = ("qformer_input_ids", "qformer_attention_mask")

    def process(self, images: Sequence[Sequence[PIL.Image.Image]], texts: Sequence[str]) -> BatchFeature:
        qformer_tokenizer = self.processor.qformer_tokenizer
        old_side = qformer_tokenizer.padding_side
        qformer_tokenizer.padding_side = "right"
        try:
            return super().process(images, texts)
        finally:
            qformer_tokenizer.padding_side = old_side

    def process_full(
        self, images: Sequence[Sequence[PIL.Image.Image]], texts: Sequence[str], prompt_texts: Sequence[str]
    ) -> BatchFeature:
        """The Q-Former reads each row's prompt, not the answer appended to it."""
        batch = self.process(images, texts)
        if list(texts) != list(prompt_texts):
            prompt_batch = self.process(images, prompt_texts)
            for name in self.model_input_names:
                batch[name] = prompt_batch[name]
        return batch

    def qformer_text(self, batch: BatchFeature, row: int) -> str:
        ids = batch["qformer_input_ids"][row][batch["qformer_attention_mask"][row].bool()]
        return self.processor.qformer_tokenizer.decode(ids, skip_special_tokens=True)

    def _qformer_text_kwargs(self, kwargs: dict, query_tokens: torch.Tensor) -> dict:
        query_mask = torch.ones(query_tokens.shape[:-1], dtype=torch.long, device=query_tokens.device)
        return {
            "input_ids": kwargs["qformer_input_ids"],
            "attention_mask": torch.cat([query_mask, kwargs["qformer_attention_mask"]], dim=1),
        }
