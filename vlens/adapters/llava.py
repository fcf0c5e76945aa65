"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one image becomes one patch grid.

A CLIP or SigLIP tower encodes the image; a two-layer MLP projects every patch into
the language model, where the patches replace the ``<image>`` placeholders in raster
order. With ``vision_feature_select_strategy="default"`` the CLS token is dropped
(LLaVA-1.5: 24 x 24 = 576 tokens at 336 px, patch 14); with ``"full"`` it is kept in
front of the grid.

Contract: a 1-D causal Llama-style language model with no per-token inputs. The CLIP-style
image processor resizes the short side and centre-crops (LLaVA-1.5: 336 px of the image's
central square), optionally padding to a square first, so each patch token's box is its
patch mapped back through the crop and the resize.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformers import BatchFeature

from vlens.adapters._geometry import cell_boxes, clip_style_frame, clip_to_image
from vlens.adapters.base import VisionPrefixAdapter, expect
from vlens.adapters.contract import SceneGeometry, SequentialPositions
from vlens.errors import PromptError, UnsupportedArchitectureError
from vlens.layout import ImageSpan, grid_span

LLAMA_STYLE_TEXT_MODELS = ("llama", "mistral", "qwen2")


class LlavaAdapter(SequentialPositions, VisionPrefixAdapter):
    """LLaVA-1.5: a CLIP or SigLIP tower, an MLP projector, one fixed grid per image."""
    family = "llava"
    hf_architectures = ("LlavaForConditionalGeneration",)
    tl_architecture = "LlavaForConditionalGeneration"
    fallback_template = "USER: {images}\n{prompt} ASSISTANT:"
    per_token_inputs = ()
    causal_over_image = True

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

    def token_boxes(self, span: ImageSpan, image_size: tuple[int, int]) -> Float[Tensor, "n 4"]:
        width, height = image_size
        frame = clip_style_frame(self.processor.image_processor, width, height, self.family)
        p = self.patch_size()
        # The tower's convolution reads whole patches from the top left; a remainder is dropped.
        grid = (int(frame.height) // p, int(frame.width) // p)
        if span.grid != grid:
            raise UnsupportedArchitectureError(
                f"llava: the image processor makes a {int(frame.width)}x{int(frame.height)} px image of a "
                f"{width}x{height} image ({grid[0]}x{grid[1]} patches), but its span has grid {span.grid}"
            )
        return clip_to_image(frame.to_original(cell_boxes(span.row_col, p)), width, height)

    def scene_geometry(self) -> SceneGeometry:
        p = self.patch_size()
        side = int(self.config.vision_config.image_size)
        frame = clip_style_frame(self.processor.image_processor, side, side, self.family)
        rows, cols = int(frame.height) // p, int(frame.width) // p
        if rows != cols:
            raise UnsupportedArchitectureError(f"llava: a square image becomes a {rows}x{cols} patch grid, not a square")
        scene = rows * p
        # A scene's label cells are its token cells only when the processor neither crops nor
        # scales a scene of that size (resize and crop both equal to it, as in LLaVA-1.5).
        seen = clip_style_frame(self.processor.image_processor, scene, scene, self.family)
        if (seen.sx, seen.sy, seen.dx, seen.dy) != (1.0, 1.0, 0.0, 0.0) or (seen.width, seen.height) != (scene, scene):
            raise UnsupportedArchitectureError(
                f"llava: the image processor resizes or crops a {scene} px scene (size {self.processor.image_processor.size!r}, "
                f"crop {getattr(self.processor.image_processor, 'crop_size', None)!r}), so no square scene's cells "
                "are the model's patches"
            )
        return SceneGeometry(image_size=scene, patch_size=p, token_grid=(rows, cols))
