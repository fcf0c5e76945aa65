"""Gemma3 (``Gemma3ForConditionalGeneration``): pooled SigLIP tokens between markers.

The prompt holds ``<start_of_image>`` per image; the processor expands it into
``<start_of_image> <image_soft_token>*N <end_of_image>`` (with blank lines around). The
SigLIP tower sees the image resized to a square of ``image_size`` pixels, and the
projector average-pools its ``p x p`` patch grid (``p = image_size // patch_size``) down
to ``s x s`` tokens (``s = sqrt(mm_tokens_per_image)``), flattened in raster order.

The processor also returns ``token_type_ids`` (1 at soft tokens): Hugging Face's forward
uses them to let the tokens of one image attend to each other bidirectionally. Without
them the model is causal everywhere and its logits change, so vlens always passes them.

Contract: 1-D positions; ``token_type_ids`` are its per-token inputs, and because an image's
tokens attend to later ones of the same image the language model is not causal over the
image. A token's box is its pooled cell of the image, squashed to the tower's square.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformers import BatchFeature

from vlens.adapters._geometry import Frame, cell_boxes, clip_to_image, resized_size
from vlens.adapters.base import VisionPrefixAdapter, expect
from vlens.adapters.contract import SceneGeometry, SequentialPositions
from vlens.errors import PromptError, UnsupportedArchitectureError
from vlens.layout import ImageSpan, contiguous_runs, grid_span


class Gemma3Adapter(SequentialPositions, VisionPrefixAdapter):
    """Gemma 3: SigLIP tower, pooled soft tokens, a language model bidirectional over each image."""
    family = "gemma3"
    hf_architectures = ("Gemma3ForConditionalGeneration",)
    tl_architecture = "Gemma3ForConditionalGeneration"
    model_input_names = ("token_type_ids",)
    nested_images = True
    per_token_inputs = ("token_type_ids",)
    causal_over_image = False

    @classmethod
    def check_config(cls, config: Any) -> None:
        if getattr(config, "model_type", None) != "gemma3" or getattr(config, "vision_config", None) is None:
            raise UnsupportedArchitectureError(
                f"gemma3: config has model_type {getattr(config, 'model_type', None)!r} and no vision_config; this "
                "is a text-only Gemma3, which has no image input. vlens handles Gemma3ForConditionalGeneration "
                "checkpoints (model_type 'gemma3' with a vision_config)"
            )
        super().check_config(config)
        expect(
            config.vision_config, "model_type", ("siglip_vision_model",), cls.family, where="config.vision_config",
        )
        expect(config.text_config, "model_type", ("gemma3_text",), cls.family, where="config.text_config")
        expect(
            config.text_config, "use_bidirectional_attention", (False, None), cls.family, where="config.text_config",
        )
        softcap = getattr(config.text_config, "attn_logit_softcapping", None)
        if softcap is not None:
            # HF's Gemma3Attention stores attn_logit_softcapping but never applies it;
            # TransformerLens 4.3's PositionEmbeddingsAttentionBridge does (measured: logits
            # differ by ~0.1), so the bridge would not compute what HF computes.
            raise UnsupportedArchitectureError(
                f"gemma3: config.text_config.attn_logit_softcapping = {softcap!r} is not supported: Hugging Face's "
                "Gemma3 ignores it while TransformerLens's attention bridge applies it, so their outputs differ; "
                "vlens handles None (every released Gemma3 checkpoint)"
            )
        tokens = config.mm_tokens_per_image
        side = math.isqrt(tokens) if isinstance(tokens, int) and tokens > 0 else 0
        patches = config.vision_config.image_size // config.vision_config.patch_size
        if side * side != tokens or patches % side:
            raise UnsupportedArchitectureError(
                f"gemma3: config.mm_tokens_per_image = {tokens!r} must be a square s*s whose side divides the "
                f"tower's {patches}x{patches} patch grid (the projector average-pools it to s x s)"
            )

    def __init__(self, config: Any, processor: Any) -> None:
        super().__init__(config, processor)
        size = getattr(getattr(processor, "image_processor", None), "size", None)
        hw = (size.get("height"), size.get("width")) if isinstance(size, dict) else (
            getattr(size, "height", None), getattr(size, "width", None))
        tower = config.vision_config.image_size
        if None not in hw and hw != (tower, tower):
            raise UnsupportedArchitectureError(
                f"gemma3: the image processor resizes images to {hw[0]}x{hw[1]} but the vision tower takes "
                f"{tower}x{tower} (vision_config.image_size); this checkpoint's processor and model disagree"
            )

    @property
    def grid_side(self) -> int:
        """Side of the pooled token grid of one image."""
        return math.isqrt(self.config.mm_tokens_per_image)

    @property
    def cell_side(self) -> int:
        """Side in pixels of the tower-input region one pooled token averages (whole patches:
        the tower drops a remainder of the image size)."""
        vision = self.config.vision_config
        return vision.patch_size * (vision.image_size // vision.patch_size // self.grid_side)

    def prompt_placeholder(self) -> str:
        return self.processor.boi_token

    def token_boxes(self, span: ImageSpan, image_size: tuple[int, int]) -> Float[Tensor, "n 4"]:
        width, height = image_size
        ip = self.processor.image_processor
        if getattr(ip, "do_pan_and_scan", False):
            raise UnsupportedArchitectureError("gemma3: pan-and-scan crops have no token boxes in vlens")
        frame = Frame(float(width), float(height))
        if getattr(ip, "do_resize", False):
            h, w = resized_size(height, width, ip.size, self.family)
            frame = frame.resize(w, h)
        return clip_to_image(frame.to_original(cell_boxes(span.row_col, self.cell_side)), width, height)

    def scene_geometry(self) -> SceneGeometry:
        s = self.grid_side
        return SceneGeometry(image_size=s * self.cell_side, patch_size=self.cell_side, token_grid=(s, s))

    def marker_ids(self) -> frozenset[int]:
        return frozenset({int(self.config.boi_token_id), int(self.config.eoi_token_id)})

    def model_extras(self, batch: BatchFeature) -> dict[str, torch.Tensor]:
        if "token_type_ids" in batch:
            return {"token_type_ids": batch["token_type_ids"]}
        if batch.get("pixel_values") is not None:
            raise UnsupportedArchitectureError(
                "gemma3: the processor returned no token_type_ids for a prompt with images; Gemma3 needs them "
                "(they make an image's tokens attend to each other), so vlens will not run without them"
            )
        return {"token_type_ids": torch.zeros_like(batch["input_ids"])}

    def image_spans(self, batch: BatchFeature, row: int, positions: torch.Tensor) -> list[ImageSpan]:
        s = self.grid_side
        ids = batch["input_ids"][row]
        runs = contiguous_runs(positions)
        boi, eoi = int(self.config.boi_token_id), int(self.config.eoi_token_id)
        for i, run in enumerate(runs):
            first, last = int(run[0]), int(run[-1])
            if first == 0 or int(ids[first - 1]) != boi or last + 1 >= ids.shape[0] or int(ids[last + 1]) != eoi:
                raise PromptError(
                    f"row {row}, image {i}: its soft tokens at {first}..{last} are not wrapped in "
                    f"<start_of_image> ... <end_of_image>"
                )
        n_images = self._images_in_batch(batch)
        if n_images is not None and n_images != self._runs_in_batch(batch):
            raise PromptError(
                f"the batch has {self._runs_in_batch(batch)} image token runs but {n_images} images in pixel_values "
                "(pan-and-scan crops are not supported: vlens expects one run per image)"
            )
        return [grid_span(i, run, s, s) for i, run in enumerate(runs)]

    @staticmethod
    def _images_in_batch(batch: BatchFeature) -> int | None:
        pixel_values = batch.get("pixel_values")
        return None if pixel_values is None else int(pixel_values.shape[0])

    def _runs_in_batch(self, batch: BatchFeature) -> int:
        real = batch["attention_mask"].bool()
        mask = (batch["input_ids"] == self.image_token_id) & real
        return sum(len(contiguous_runs(mask[b].nonzero().flatten())) for b in range(mask.shape[0]))
