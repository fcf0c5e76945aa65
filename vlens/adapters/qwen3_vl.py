"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): Qwen2-VL's layout and (interleaved) M-RoPE
positions, plus DeepStack (see :class:`Qwen3VLAdapter`)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from vlens._compat import cache_argument, output_cache
from vlens._modules import submodule
from vlens.adapters.qwen2_vl import Qwen2VLAdapter
from vlens.errors import UnsupportedArchitectureError


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL: Qwen2-VL's layout and (interleaved) M-RoPE positions, plus DeepStack.

    DeepStack: mergers on early vision blocks make one extra feature per visual token and
    level; the text model adds level l's to the hidden states at the image positions right
    after decoder layer l (l < levels), a tensor add between block calls. So, at image
    positions and for those layers, ``blocks.{l}.hook_resid_post`` (the block's output) differs
    from ``blocks.{l+1}.hook_resid_pre`` (what the next block reads) by the feature.

    The layer axis of every per-layer result stays vlens's (index l = ``blocks.{l-1}.
    hook_resid_post``) and is Hugging Face's ``hidden_states``: the decoder layers' outputs,
    before DeepStack's addition. The lens, the similarities and the streams read it; to patch
    the stream a layer reads, patch ``blocks.{l+1}.hook_resid_pre``.

    The features are per-token inputs of the language model: ``visual_pos_masks`` (``[batch,
    pos]``, True at image tokens) and ``deepstack_visual_embeds`` (``[batch, pos, levels,
    d_model]``, zero elsewhere), read from the language model's call in the forward pass.
    :meth:`run_language_model` hands them to the text model, so running it on embeddings keeps
    DeepStack, and removing a visual token removes its features too. Per-token inputs rule the
    kv engine out (an expected fallback to ``naive``, recorded in results).
    """

    family = "qwen3_vl"
    hf_architectures = ("Qwen3VLForConditionalGeneration",)
    tl_architecture = "vlens.Qwen3VLForConditionalGeneration"
    video_processor_class = "Qwen3VLProcessor"
    text_model_types = ("qwen3_vl_text",)
    vision_model_types = ("qwen3_vl_vision", "qwen3_vl")
    per_token_inputs = ("visual_pos_masks", "deepstack_visual_embeds")

    @property
    def deepstack_levels(self) -> int:
        return len(getattr(self.config.vision_config, "deepstack_visual_indexes", None) or ())

    def per_token_values(self, call_kwargs: dict[str, Any], extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        embeds = call_kwargs.get("inputs_embeds")
        if not isinstance(embeds, Tensor):
            raise UnsupportedArchitectureError(f"{self.family}: the text model was called without inputs_embeds")
        batch, pos, d_model = embeds.shape
        mask = call_kwargs.get("visual_pos_masks")
        features = call_kwargs.get("deepstack_visual_embeds")
        if mask is None or features is None:  # no image in the batch
            mask = torch.zeros(batch, pos, dtype=torch.bool, device=embeds.device)
            features = []
        if len(features) not in (0, self.deepstack_levels):
            raise UnsupportedArchitectureError(
                f"{self.family}: the text model got {len(features)} DeepStack levels; the config names "
                f"{self.deepstack_levels} (vision_config.deepstack_visual_indexes)"
            )
        mask = mask.to(embeds.device).bool()
        stacked = embeds.new_zeros(batch, pos, self.deepstack_levels, d_model)
        if features:
            stacked[mask] = torch.stack([f.to(embeds.device, embeds.dtype) for f in features], dim=1)
        return {"visual_pos_masks": mask, "deepstack_visual_embeds": stacked}

    def run_language_model(
        self,
        hf_model: torch.nn.Module,
        inputs_embeds: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        position_ids: torch.Tensor,
        past_key_values: Any,
        use_cache: bool,
        logits_to_keep: Optional[torch.Tensor],
        extras: Optional[dict[str, torch.Tensor]] = None,
    ) -> tuple[torch.Tensor, Any]:
        """The text model with the DeepStack features of the given positions, then the head.

        ``extras`` are :attr:`per_token_inputs` of these positions; without them the run would
        silently drop DeepStack (as Hugging Face's whole model does on ``inputs_embeds``), so
        they are required unless the positions are plain text ones (equal on the three axes,
        as :meth:`text_positions` gives; image tokens past an image's first differ there, and
        released processors make at least 2 x 2 tokens of an image).
        """
        hf_positions = self.hf_position_ids(position_ids)  # checks the [batch, 3, pos] layout
        extras = dict(extras or {})
        unknown = sorted(set(extras) - set(self.per_token_inputs))
        if unknown:
            raise ValueError(f"{self.family}: unknown per-token inputs {unknown}; it reads {list(self.per_token_inputs)}")
        if not extras and bool((position_ids != position_ids[:, :1]).any()):
            raise ValueError(
                f"{self.family}: run_language_model needs the DeepStack per-token inputs {list(self.per_token_inputs)} "
                "(model.input_embeddings(...).extras, kept where the embeddings are kept); without them the image "
                "tokens would miss DeepStack's features"
            )
        if not extras:  # plain text: nothing for DeepStack to add
            batch, pos = inputs_embeds.shape[:2]
            extras = {
                "visual_pos_masks": torch.zeros(batch, pos, dtype=torch.bool, device=inputs_embeds.device),
                "deepstack_visual_embeds": inputs_embeds.new_zeros(batch, pos, self.deepstack_levels, 0),
            }
        mask = extras["visual_pos_masks"].bool()
        stacked = extras["deepstack_visual_embeds"]
        if mask.shape != inputs_embeds.shape[:2] or stacked.shape[:2] != inputs_embeds.shape[:2]:
            raise ValueError(
                f"{self.family}: DeepStack inputs {tuple(mask.shape)} / {tuple(stacked.shape)} do not match the "
                f"embeddings {tuple(inputs_embeds.shape)}"
            )
        text_model = self.language_model(hf_model)
        kwargs: dict[str, Any] = {
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "position_ids": hf_positions,
            cache_argument(text_model): past_key_values,
            "use_cache": use_cache,
        }
        if bool(mask.any()):
            kwargs["visual_pos_masks"] = mask
            kwargs["deepstack_visual_embeds"] = list(stacked[mask].to(inputs_embeds.dtype).unbind(1))
        out = text_model(**kwargs)
        hidden = out.last_hidden_state
        if logits_to_keep is not None:
            hidden = hidden[:, logits_to_keep]
        return submodule(hf_model, "lm_head")(hidden), output_cache(out)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "deepstack": f"{self.deepstack_levels} levels added after decoder layers 0..{self.deepstack_levels - 1}; "
            "the layer axis is the layers' outputs (before the addition)",
        }
