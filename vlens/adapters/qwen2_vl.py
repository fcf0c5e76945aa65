"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``):
dynamic resolution, merged patches, 3-D M-RoPE positions.

The image processor resizes each image to a multiple of ``patch * merge`` pixels on both
sides whose area lies between its pixel bounds, keeping the aspect ratio
(``smart_resize``), and cuts it into ``patch`` px patches: ``image_grid_thw`` = (1, h, w)
patches. The vision tower's merger turns every ``merge x merge`` block of patches into one
token, so the image becomes ``h/merge x w/merge`` tokens in raster order, written by the
processor as ``<|vision_start|> <|image_pad|>*n <|vision_end|>`` (the markers are marker
tokens). Qwen2.5-VL's tower attends within windows, but its merger restores the raster order
before the language model, so the token grid is the same.

Positions are 3-D (M-RoPE, ``get_rope_index``): text tokens have (p, p, p); an image starting
at p has (p, p + r, p + c) for its token at (r, c) (temporal axis p for a still image), and
the text after it resumes at p + max(h, w)/merge, not at p + the token count. vlens reads the
positions the model computed (from its rotary embedding's call, shaped ``[batch, 3, pos]``)
and never lets Hugging Face infer them from ``rope_deltas``, which it caches between calls.

Contract:
    * positions: multi-axis ``[3, n]``. A sequence with some tokens removed keeps every kept
      token's own (t, h, w) position: kept image tokens keep their place on the image grid
      and the text after the image keeps its positions (the image still spans its whole
      grid in position space). With nothing removed this is the model's own numbering.
    * per-token inputs: none for the language model. The forward's ``mm_token_type_ids``
      only feed ``get_rope_index``, and vlens passes the positions themselves.
    * causal over the image (Qwen2 text decoder, causal everywhere).
    * token boxes: the token's ``patch*merge`` px cell of the resized image, mapped back.
    * scenes: a square the processor does not resize, whose cells are the merged cells.

Videos are refused: vlens analyses images (and loads the processor without its video part
where torchvision is missing, see ``vlens.adapters._processors``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Sequence

import PIL.Image
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformers import BatchFeature

from vlens._modules import submodule
from vlens.adapters import _qwen_bridge
from vlens.adapters._geometry import Frame, cell_boxes, clip_to_image, size_get
from vlens.adapters.base import VisionPrefixAdapter, expect
from vlens.adapters.contract import SceneGeometry
from vlens.errors import PromptError, UnsupportedArchitectureError
from vlens.layout import ImageSpan, contiguous_runs, grid_span

_qwen_bridge.register()

AXES = 3
"""M-RoPE's position axes: temporal, height, width."""


class Qwen2VLAdapter(VisionPrefixAdapter):
    """Qwen2-VL: a ViT with 2-D rotary positions, a 2 x 2 patch merger, a Qwen2 decoder with M-RoPE."""

    family = "qwen2_vl"
    hf_architectures = ("Qwen2VLForConditionalGeneration",)
    tl_architecture = "vlens.Qwen2VLForConditionalGeneration"
    model_input_names = ("image_grid_thw", "mm_token_type_ids")
    video_processor_class: ClassVar[Optional[str]] = "Qwen2VLProcessor"
    text_model_types: ClassVar[tuple[str, ...]] = ("qwen2_vl_text",)
    vision_model_types: ClassVar[tuple[str, ...]] = ("qwen2_vl_vision", "qwen2_vl")
    per_token_inputs = ()
    causal_over_image = True
    stage_prefixes = {
        "vision": ("vision_encoder.",),
        "connector": ("vision_projector.",),
        "language": ("embed.", "hook_embed", "blocks.", "ln_final.", "unembed.", "hook_unembed"),
    }

    @classmethod
    def check_config(cls, config: Any) -> None:
        super().check_config(config)
        expect(config.text_config, "model_type", cls.text_model_types, cls.family, where="config.text_config")
        expect(config.vision_config, "model_type", cls.vision_model_types, cls.family, where="config.vision_config")
        rope = getattr(config.text_config, "rope_parameters", None) or {}
        section = rope.get("mrope_section")
        if not (isinstance(section, (list, tuple)) and len(section) == AXES):
            raise UnsupportedArchitectureError(
                f"{cls.family}: config.text_config.rope_parameters has mrope_section {section!r}; vlens handles "
                "3-axis M-RoPE (temporal, height, width), a list of 3 rotary sections"
            )
        merge = getattr(config.vision_config, "spatial_merge_size", None)
        if not isinstance(merge, int) or merge < 1:
            raise UnsupportedArchitectureError(
                f"{cls.family}: config.vision_config.spatial_merge_size = {merge!r}; vlens needs a positive int"
            )

    def __init__(self, config: Any, processor: Any) -> None:
        super().__init__(config, processor)
        ip = getattr(processor, "image_processor", None)
        merge = int(config.vision_config.spatial_merge_size)
        patch = int(config.vision_config.patch_size)
        if ip is not None and (getattr(ip, "merge_size", merge), getattr(ip, "patch_size", patch)) != (merge, patch):
            raise UnsupportedArchitectureError(
                f"{self.family}: the image processor cuts {ip.patch_size} px patches merged {ip.merge_size} x "
                f"{ip.merge_size}, but the vision tower takes {patch} px patches merged {merge} x {merge}; this "
                "checkpoint's processor and model disagree"
            )

    # ---- facts of the family -------------------------------------------------------

    @property
    def merge(self) -> int:
        """Side, in patches, of the block of patches one token merges."""
        return int(self.config.vision_config.spatial_merge_size)

    @property
    def cell_side(self) -> int:
        """Side in pixels (of the resized image) of the region one token covers."""
        return int(self.config.vision_config.patch_size) * self.merge

    def marker_ids(self) -> frozenset[int]:
        return frozenset({int(self.config.vision_start_token_id), int(self.config.vision_end_token_id)})

    def _video_token(self) -> Optional[str]:
        video_id = getattr(self.config, "video_token_id", None)
        return None if video_id is None else self.tokenizer.convert_ids_to_tokens(int(video_id))

    def format_prompt(self, prompt: str, n_images: int, chat_template: bool) -> str:
        video = self._video_token()
        if video and video in prompt:
            raise PromptError(
                f"prompt {prompt!r} holds the video placeholder {video!r}: vlens analyses images only; pass the "
                "frames as images instead"
            )
        return super().format_prompt(prompt, n_images, chat_template)

    def process(self, images: Sequence[Sequence[PIL.Image.Image]], texts: Sequence[str]) -> BatchFeature:
        for row, imgs in enumerate(images):
            for i, image in enumerate(imgs):
                self._check_image_size(row, i, image.size)
        batch = super().process(images, texts)
        if batch.get("pixel_values_videos") is not None:
            raise PromptError("the processor made video inputs; vlens analyses images only")
        return batch

    def _check_image_size(self, row: int, index: int, size: tuple[int, int]) -> None:
        """Refuse an image the processor cannot size, naming its size, before processing."""
        width, height = size
        try:
            rh, rw = self.resized_size(width, height)
        except ValueError as err:
            raise PromptError(f"row {row}, image {index} ({width}x{height} px): {err}") from err
        if rh < self.cell_side or rw < self.cell_side:
            raise PromptError(
                f"row {row}, image {index} is {width}x{height} px, which the processor resizes to {rw}x{rh}: too "
                f"small for one {self.cell_side} px merged patch"
            )

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) the image processor resizes a ``width x height`` image to: its own
        ``smart_resize`` with its pixel bounds, at a multiple of ``patch * merge``."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        ip = self.processor.image_processor
        if not getattr(ip, "do_resize", True):
            raise UnsupportedArchitectureError(f"{self.family}: an image processor with do_resize=False")
        lo, hi = size_get(ip.size, "shortest_edge"), size_get(ip.size, "longest_edge")
        if lo is None or hi is None:
            raise UnsupportedArchitectureError(
                f"{self.family}: the image processor's size {ip.size!r} has no shortest_edge / longest_edge "
                "(its minimum and maximum pixel counts)"
            )
        return smart_resize(height, width, factor=self.cell_side, min_pixels=lo, max_pixels=hi)

    def image_spans(self, batch: BatchFeature, row: int, positions: torch.Tensor) -> list[ImageSpan]:
        grids = batch.get("image_grid_thw")
        runs = contiguous_runs(positions)
        if grids is None:
            raise PromptError(f"row {row} has image tokens but the processor returned no image_grid_thw")
        first = self._images_before(batch, row)
        if first + len(runs) > grids.shape[0]:
            raise PromptError(
                f"row {row} has {len(runs)} image token runs but only {grids.shape[0] - first} image grids are left"
            )
        spans = []
        for i, run in enumerate(runs):
            t, h, w = (int(v) for v in grids[first + i])
            if t != 1:
                raise PromptError(f"row {row}, image {i}: grid {t}x{h}x{w} has {t} frames; vlens handles images")
            spans.append(grid_span(i, run, h // self.merge, w // self.merge))
        return spans

    def _images_before(self, batch: BatchFeature, row: int) -> int:
        """How many images the earlier rows hold (the processor flattens them in order)."""
        mask = (batch["input_ids"][:row] == self.image_token_id) & batch["attention_mask"][:row].bool()
        return sum(len(contiguous_runs(mask[b].nonzero().flatten())) for b in range(row))

    def model_extras(self, batch: BatchFeature) -> dict[str, torch.Tensor]:
        if batch.get("pixel_values") is None:
            # Text only: the forward takes no image grid; token types are all text.
            return {"mm_token_type_ids": batch.get("mm_token_type_ids", torch.zeros_like(batch["input_ids"]))}
        return super().model_extras(batch)

    def token_boxes(self, span: ImageSpan, image_size: tuple[int, int]) -> Float[Tensor, "n 4"]:
        width, height = image_size
        rh, rw = self.resized_size(width, height)
        frame = Frame(float(width), float(height)).resize(rw, rh)
        return clip_to_image(frame.to_original(cell_boxes(span.row_col, self.cell_side)), width, height)

    def scene_geometry(self) -> SceneGeometry:
        # The largest square grid (up to LLaVA's 24 x 24) the processor keeps as it is.
        cell = self.cell_side
        for side in range(24, 0, -1):
            if self.resized_size(side * cell, side * cell) == (side * cell, side * cell):
                return SceneGeometry(image_size=side * cell, patch_size=cell, token_grid=(side, side))
        raise UnsupportedArchitectureError(
            f"{self.family}: the image processor's pixel bounds {self.processor.image_processor.size!r} keep no "
            f"square of whole {cell} px cells unresized"
        )

    # ---- positions (M-RoPE) ----------------------------------------------------------

    def positions_after_removal(
        self, positions: Int[Tensor, "axes pos"], keep: Bool[Tensor, " pos"]
    ) -> Int[Tensor, "axes n"]:
        """Every kept token keeps its own (t, h, w) position (see the module docstring)."""
        if positions.ndim != 2 or positions.shape[0] != AXES or keep.shape != positions.shape[1:]:
            raise ValueError(
                f"positions {tuple(positions.shape)} must be [{AXES}, pos] and keep {tuple(keep.shape)} [pos]"
            )
        return positions[:, keep.to(positions.device)]

    def text_positions(self, n: int, device: torch.device) -> Int[Tensor, "axes n"]:
        return torch.arange(n, device=device).expand(AXES, n)

    def positions_source(self, hf_model: torch.nn.Module) -> torch.nn.Module:
        """The text model's rotary embedding, called with the 3-D positions (the decoder layers
        receive none: Hugging Face hands them the rotary tables only)."""
        rotary = getattr(self.language_model(hf_model), "rotary_emb", None)
        if not isinstance(rotary, torch.nn.Module):
            raise UnsupportedArchitectureError(f"{self.family}: the text model has no rotary_emb module")
        return rotary

    def read_positions(self, args: tuple, kwargs: dict, batch_size: int) -> Int[Tensor, "batch axes pos"]:
        positions = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        if not isinstance(positions, Tensor) or positions.ndim != 3 or positions.shape[0] != AXES:
            shape = None if not isinstance(positions, Tensor) else tuple(positions.shape)
            raise UnsupportedArchitectureError(
                f"{self.family}: the rotary embedding was called with positions of shape {shape}, not [{AXES}, "
                "batch, pos]"
            )
        positions = positions.permute(1, 0, 2)
        return positions.expand(batch_size, -1, -1) if positions.shape[0] == 1 else positions

    def language_model(self, hf_model: torch.nn.Module) -> torch.nn.Module:
        return submodule(submodule(hf_model, "model"), "language_model")

    def hf_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Positions ``[batch, 3, pos]`` as Hugging Face's ``[3, batch, pos]``. ``run_language_model``
        always passes them explicitly: its own inference would reuse the ``rope_deltas`` a previous
        call cached."""
        if position_ids.ndim != 3 or position_ids.shape[1] != AXES:
            raise ValueError(f"{self.family}: position_ids {tuple(position_ids.shape)} must be [batch, {AXES}, pos]")
        return position_ids.permute(1, 0, 2)

    def describe(self) -> dict[str, Any]:
        ip = self.processor.image_processor
        return {
            **super().describe(),
            "token_grid": f"dynamic: image resized to multiples of {self.cell_side} px, one token per "
            f"{self.merge}x{self.merge} patches",
            "pixels": f"{size_get(ip.size, 'shortest_edge')}..{size_get(ip.size, 'longest_edge')}",
            "positions": "3-D M-RoPE (t, h, w); removed tokens leave the others' positions unchanged",
        }


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: Qwen2-VL's layout and positions with a windowed, RMS-normed vision tower."""

    family = "qwen2_5_vl"
    hf_architectures = ("Qwen2_5_VLForConditionalGeneration",)
    tl_architecture = "vlens.Qwen2_5_VLForConditionalGeneration"
    video_processor_class = "Qwen2_5_VLProcessor"
    text_model_types = ("qwen2_5_vl_text",)
    vision_model_types = ("qwen2_5_vl_vision", "qwen2_5_vl")



