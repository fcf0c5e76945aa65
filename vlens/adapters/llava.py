"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one image becomes one patch grid.

A CLIP or SigLIP tower encodes the image; a two-layer MLP projects every patch into
the language model, where the patches replace the ``<image>`` placeholders in raster
order. With ``vision_feature_select_strategy="default"`` the CLS token is dropped
(LLaVA-1.5: 24 x 24 = 576 tokens at 336 px, patch 14); with ``"full"`` it is kept in
front of the grid.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import BatchFeature

from vlens.adapters.base import VisionPrefixAdapter, expect
from vlens.errors import PromptError, UnsupportedArchitectureError
from vlens.layout import ImageSpan, grid_span

LLAMA_STYLE_TEXT_MODELS = ("llama", "mistral", "qwen2")


class LlavaAdapter(VisionPrefixAdapter):
    family = "llava"
    hf_architectures = ("LlavaForConditionalGeneration",)
    tl_architecture = "LlavaForConditionalGeneration"
    fallback_template = "USER: {images}\n{prompt} ASSISTANT:"

    @classmethod
    def check_config(cls, config: Any) -> None:
        super().check_config(config)
        expect(config, "vision_feature_select_strategy", ("default", "full"), cls.family)
        expect(
            config.vision_config, "model_type", ("clip_vision_model", "siglip_vision_model"), cls.family,
            where="config.vision_config",
        )
        # TransformerLens's LLaVA bridge maps an RMSNorm + rotary (Llama-style) tower.
        expect(config.text_config, "model_type", LLAMA_STYLE_TEXT_MODELS, cls.family, where="config.text_config")
        if config.vision_config.model_type == "siglip_vision_model" and config.vision_feature_select_strategy == "default":
            raise UnsupportedArchitectureError(
                "llava: a SigLIP tower has no CLS token, so vision_feature_select_strategy='default' would drop a "
                "real patch and leave no square grid; vlens handles SigLIP towers with strategy 'full'"
            )

    def patch_size(self) -> int:
        return int(self.config.vision_config.patch_size)

    def image_spans(self, batch: BatchFeature, row: int, positions: torch.Tensor) -> list[ImageSpan]:
        pixel_values = batch["pixel_values"]
        rows = pixel_values.shape[-2] // self.patch_size()
        cols = pixel_values.shape[-1] // self.patch_size()
        leading_cls = (
            self.config.vision_feature_select_strategy == "full"
            and self.config.vision_config.model_type == "clip_vision_model"
        )
        # Split by the per-image count, not by contiguous runs: two images whose
        # placeholders are adjacent ("<image><image>") form one run.
        per_image = rows * cols + int(leading_cls)
        if positions.numel() % per_image:
            raise PromptError(
                f"row {row} has {positions.numel()} image tokens, not a multiple of the {per_image} one "
                f"{rows}x{cols} image becomes"
            )
        chunks = torch.split(positions, per_image)
        return [grid_span(i, chunk, rows, cols, leading_cls=leading_cls) for i, chunk in enumerate(chunks)]
