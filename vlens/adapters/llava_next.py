"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): base image, anyres tiles, newlines.

The image processor picks the best of ``image_grid_pinpoints`` for the image's size,
resizes the image into that canvas (padding the short side), cuts it into
``tiles_h x tiles_w`` crops of the vision tower's input size, and also sends the whole
image resized to one crop (the *base* image). Hugging Face's ``pack_image_features``
then places, for each image:

1. the base image's patch grid (``g x g`` tokens, ``g = image_size // patch_size``);
2. the crops' patches stitched into one ``tiles_h*g x tiles_w*g`` canvas, with the
   padding rows (or columns) cut off again (``unpad_image``), read row by row, each
   canvas row followed by one ``image_newline`` token.

In the layout, tile 0 is the base image, tiles ``1..tiles_h*tiles_w`` are the crops in
row-major order and newline tokens have tile -1. A crop's grid is the part of it that
survives unpadding, so each tile id has exactly ``rows * cols`` tokens.

Contract: a 1-D causal Llama-style language model with no per-token inputs. A base-image
token's box is its patch of the whole image (squashed to one crop); a crop token's box is
its patch of the padded canvas mapped back through the padding and the aspect-preserving
resize; newline tokens have none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformers import BatchFeature
from transformers.image_processing_utils import select_best_resolution

from vlens.adapters._geometry import Frame, cell_boxes, center_crop, clip_to_image, resized_size, size_get
from vlens.adapters.base import VisionPrefixAdapter, expect
from vlens.adapters.contract import SceneGeometry, SequentialPositions
from vlens.adapters.llava import LLAMA_STYLE_TEXT_MODELS
from vlens.errors import PromptError, UnsupportedArchitectureError
from vlens.layout import ImageSpan


@dataclass(frozen=True)
class AnyresCanvas:
    """Where each token of one LLaVA-NeXT image sits, in HF's packing order.

    Attributes:
        tile: Per token, 0 for the base image, 1.. for crops, -1 for newlines.
        row_col: Per token, (row, col) in its tile's (unpadded) grid, -1 for newlines.
        labels: Per token, ``<img r,c>``, ``<t{k} r,c>`` or ``<nl r>``.
        tile_grids: (rows, cols) of every tile with at least one token.
        canvas_rc: Per token, (row, col) in the base grid for base tokens, in the whole
            (padded) crop canvas's patch grid for crop tokens, -1 for newlines.
    """

    tile: list[int]
    row_col: list[tuple[int, int]]
    labels: list[str]
    tile_grids: dict[int, tuple[int, int]]
    canvas_rc: list[tuple[int, int]]

    @property
    def n_tokens(self) -> int:
        return len(self.tile)


def anyres_canvas(
    image_height: int,
    image_width: int,
    grid_pinpoints: list,
    tower_image_size: int,
    patch_size: int,
) -> AnyresCanvas:
    """The token layout of one image, following ``pack_image_features`` / ``unpad_image``.

    Args:
        image_height, image_width: The original image size (the processor's ``image_sizes``).
        grid_pinpoints: ``config.image_grid_pinpoints`` ((height, width) in pixels).
        tower_image_size: ``config.vision_config.image_size`` (one crop's side in pixels).
        patch_size: ``config.vision_config.patch_size``.
    """
    g = tower_image_size // patch_size
    best_h, best_w = select_best_resolution((image_height, image_width), grid_pinpoints)
    tiles_h, tiles_w = best_h // tower_image_size, best_w // tower_image_size
    canvas_h, canvas_w = tiles_h * g, tiles_w * g
    # unpad_image, with the same float arithmetic.
    row_lo, row_hi, col_lo, col_hi = 0, canvas_h, 0, canvas_w
    if image_width / image_height > canvas_w / canvas_h:
        new_h = int(round(image_height * (canvas_w / image_width), 7))
        pad = (canvas_h - new_h) // 2
        row_lo, row_hi = pad, canvas_h - pad
    else:
        new_w = int(round(image_width * (canvas_h / image_height), 7))
        pad = (canvas_w - new_w) // 2
        col_lo, col_hi = pad, canvas_w - pad

    tile: list[int] = []
    row_col: list[tuple[int, int]] = []
    labels: list[str] = []
    canvas_rc: list[tuple[int, int]] = []
    for r in range(g):
        for c in range(g):
            tile.append(0)
            row_col.append((r, c))
            labels.append(f"<img {r},{c}>")
            canvas_rc.append((r, c))
    grids: dict[int, tuple[int, int]] = {0: (g, g)}
    # First kept row / column inside each tile row / column, for tile-local coordinates.
    first_row = {tr: max(row_lo, tr * g) for tr in range(tiles_h)}
    first_col = {tc: max(col_lo, tc * g) for tc in range(tiles_w)}
    for R in range(row_lo, row_hi):
        for C in range(col_lo, col_hi):
            tr, tc = R // g, C // g
            t = tr * tiles_w + tc + 1
            r, c = R - first_row[tr], C - first_col[tc]
            tile.append(t)
            row_col.append((r, c))
            labels.append(f"<t{t} {r},{c}>")
            canvas_rc.append((R, C))
            rows, cols = grids.get(t, (0, 0))
            grids[t] = (max(rows, r + 1), max(cols, c + 1))
        tile.append(-1)
        row_col.append((-1, -1))
        labels.append(f"<nl {R - row_lo}>")
        canvas_rc.append((-1, -1))
    return AnyresCanvas(tile=tile, row_col=row_col, labels=labels, tile_grids=grids, canvas_rc=canvas_rc)


def patch_output_size(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """(height, width) of an image resized into a target canvas keeping its aspect ratio
    (mirrors ``transformers.image_processing_utils.get_patch_output_size``)."""
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


class LlavaNextAdapter(SequentialPositions, VisionPrefixAdapter):
    """LLaVA-NeXT: anyres, a base grid and unpadded high-resolution tiles with newline tokens."""
    family = "llava_next"
    hf_architectures = ("LlavaNextForConditionalGeneration",)
    tl_architecture = "LlavaNextForConditionalGeneration"
    model_input_names = ("image_sizes",)
    fallback_template = "USER: {images}\n{prompt} ASSISTANT:"
    per_token_inputs = ()
    causal_over_image = True

    @classmethod
    def check_config(cls, config: Any) -> None:
        super().check_config(config)
        expect(config, "vision_feature_select_strategy", ("default", "full"), cls.family)
        towers = ("clip_vision_model", "siglip_vision_model")
        expect(config.vision_config, "model_type", towers, cls.family, where="config.vision_config")
        # TransformerLens's LLaVA-NeXT bridge is its LLaVA bridge: a Llama-style text tower.
        expect(config.text_config, "model_type", LLAMA_STYLE_TEXT_MODELS, cls.family, where="config.text_config")
        has_cls = config.vision_config.model_type == "clip_vision_model"
        if has_cls != (config.vision_feature_select_strategy == "default"):
            raise UnsupportedArchitectureError(
                f"llava_next: vision_feature_select_strategy={config.vision_feature_select_strategy!r} with a "
                f"{config.vision_config.model_type} tower leaves "
                f"{'a CLS token in' if has_cls else 'a real patch out of'} every tile, so the tiles do not form "
                "square grids; vlens handles CLIP towers with 'default' and SigLIP towers with 'full'"
            )
        pinpoints = getattr(config, "image_grid_pinpoints", None)
        size = config.vision_config.image_size
        if not (
            isinstance(pinpoints, (list, tuple))
            and pinpoints
            and all(isinstance(p, (list, tuple)) and len(p) == 2 and not p[0] % size and not p[1] % size for p in pinpoints)
        ):
            raise UnsupportedArchitectureError(
                f"llava_next: config.image_grid_pinpoints = {pinpoints!r} is not supported; vlens handles a "
                f"non-empty list of (height, width) pairs that are multiples of the tower's image_size ({size})"
            )

    def model_extras(self, batch: BatchFeature) -> dict[str, torch.Tensor]:
        if batch.get("pixel_values") is None:
            return {}  # a text-only batch: HF's forward takes no image_sizes then
        return super().model_extras(batch)

    def image_spans(self, batch: BatchFeature, row: int, positions: torch.Tensor) -> list[ImageSpan]:
        if positions.numel() == 0:
            return []
        sizes = batch["image_sizes"]
        first = self._first_image_of_row(batch, row)
        spans: list[ImageSpan] = []
        start = 0
        index = first
        while start < positions.shape[0]:
            if index >= sizes.shape[0]:
                raise PromptError(
                    f"row {row}: the prompt has {positions.shape[0]} image placeholder tokens, but the anyres "
                    f"layout of its image(s) needs {start} ({[s.n_tokens for s in spans]} per image); the "
                    "processor and the model config disagree on how many tokens an image becomes"
                )
            canvas = self.canvas(sizes[index])
            run = positions[start : start + canvas.n_tokens]
            if run.shape[0] != canvas.n_tokens or (run.shape[0] > 1 and bool((run.diff() != 1).any())):
                raise PromptError(
                    f"row {row}, image {len(spans)} ({int(sizes[index][0])}x{int(sizes[index][1])} px): its "
                    f"anyres layout needs {canvas.n_tokens} consecutive image tokens (base grid, unpadded tiles "
                    f"and newlines), but the prompt holds {run.shape[0]} there"
                )
            spans.append(
                ImageSpan(
                    image_index=len(spans),
                    positions=run,
                    tile=torch.tensor(canvas.tile, dtype=torch.long),
                    row_col=torch.tensor(canvas.row_col, dtype=torch.long),
                    tile_grids=dict(canvas.tile_grids),
                    labels=tuple(canvas.labels),
                )
            )
            start += canvas.n_tokens
            index += 1
        return spans

    def canvas(self, image_size: torch.Tensor) -> AnyresCanvas:
        """The token layout of an image of ``image_size`` = (height, width) pixels."""
        vision = self.config.vision_config
        height, width = (int(v) for v in image_size)
        return anyres_canvas(height, width, self.config.image_grid_pinpoints, vision.image_size, vision.patch_size)

    def _first_image_of_row(self, batch: BatchFeature, row: int) -> int:
        """Index into ``image_sizes`` of the first image of ``row``.

        The processor flattens every row's images in order, so the earlier rows'
        images come first; their token counts tell how many each row consumed.
        """
        sizes = batch["image_sizes"]
        index = 0
        for earlier in range(row):
            real = batch["attention_mask"][earlier].bool()
            n_placeholders = int(((batch["input_ids"][earlier] == self.image_token_id) & real).sum())
            while n_placeholders > 0:
                if index >= sizes.shape[0]:
                    raise PromptError(f"row {earlier}: more image placeholder tokens than images")
                n_placeholders -= self.canvas(sizes[index]).n_tokens
                index += 1
            if n_placeholders < 0:
                raise PromptError(f"row {earlier}: image placeholder tokens do not add up to whole images")
        return index

    # ---- pixel geometry ----------------------------------------------------------------

    def _finish(self, frame: Frame) -> Frame:
        """The resize and centre crop every sub-image goes through last (``_preprocess``)."""
        ip = self.processor.image_processor
        if getattr(ip, "do_resize", False):
            h, w = resized_size(int(frame.height), int(frame.width), ip.size, self.family)
            frame = frame.resize(w, h)
        if getattr(ip, "do_center_crop", False):
            crop_h, crop_w = size_get(ip.crop_size, "height"), size_get(ip.crop_size, "width")
            if crop_h is None or crop_w is None:
                raise UnsupportedArchitectureError(
                    f"llava_next: the image processor's crop_size {ip.crop_size!r} has no height and width"
                )
            frame = center_crop(frame, crop_h, crop_w, ip)
        tower = self.config.vision_config.image_size
        if (frame.width, frame.height) != (tower, tower):
            raise UnsupportedArchitectureError(
                f"llava_next: the image processor hands the tower {int(frame.width)}x{int(frame.height)} px "
                f"sub-images, not {tower}x{tower} (vision_config.image_size)"
            )
        return frame

    def sub_image_frames(self, width: int, height: int) -> tuple[Frame, dict[int, Frame]]:
        """The frames of the base image and of each crop (tile id 1..) of a ``width x height``
        image, following ``LlavaNextImageProcessor._get_image_patches``: the base image is the
        whole image resized to ``size``; the crops are cut from the image resized into the best
        pinpoint canvas (aspect kept, centred with padding)."""
        ip = self.processor.image_processor
        size = ip.size
        if size_get(size, "height") and size_get(size, "width"):
            base_h, base_w = size_get(size, "height"), size_get(size, "width")
        else:
            base_h = base_w = size_get(size, "shortest_edge")
        crop_px = size_get(getattr(ip, "crop_size", None) or {}, "height") or size_get(size, "height") or size_get(
            size, "shortest_edge"
        )
        if base_h is None or base_w is None or crop_px is None:
            raise UnsupportedArchitectureError(
                f"llava_next: the image processor's size {size!r} has neither height and width nor shortest_edge"
            )
        base = self._finish(Frame(float(width), float(height)).resize(base_w, base_h))
        best_h, best_w = select_best_resolution((height, width), self.config.image_grid_pinpoints)
        new_h, new_w = patch_output_size(height, width, best_h, best_w)
        canvas = Frame(float(width), float(height)).resize(new_w, new_h)
        canvas = canvas.pad((best_w - new_w) // 2, (best_h - new_h) // 2, best_w, best_h)
        tiles_w = best_w // crop_px
        crops = {
            tr * tiles_w + tc + 1: self._finish(canvas.crop(tc * crop_px, tr * crop_px, crop_px, crop_px))
            for tr in range(best_h // crop_px)
            for tc in range(tiles_w)
        }
        return base, crops

    def token_boxes(self, span: ImageSpan, image_size: tuple[int, int]) -> Float[Tensor, "n 4"]:
        width, height = image_size
        canvas = self.canvas(torch.tensor([height, width]))
        if canvas.n_tokens != span.n_tokens or list(span.tile.tolist()) != canvas.tile:
            raise UnsupportedArchitectureError(
                f"llava_next: a {width}x{height} image makes {canvas.n_tokens} tokens, its span has {span.n_tokens}"
            )
        base, crops = self.sub_image_frames(width, height)
        g = self.config.vision_config.image_size // self.config.vision_config.patch_size
        patch = self.config.vision_config.patch_size
        rc = torch.tensor(canvas.canvas_rc, dtype=torch.long)
        boxes = torch.full((span.n_tokens, 4), float("nan"))
        on_base = span.tile == 0
        boxes[on_base] = base.to_original(cell_boxes(rc[on_base], patch))
        for t, frame in crops.items():
            mine = span.tile == t
            if bool(mine.any()):
                # A crop token at canvas patch (R, C) is patch (R mod g, C mod g) of its crop.
                boxes[mine] = frame.to_original(cell_boxes(rc[mine] % g, patch))
        return clip_to_image(boxes, width, height)

    def scene_geometry(self) -> SceneGeometry:
        # A square scene's base image is the scene resized to one crop; its grid is the base grid.
        vision = self.config.vision_config
        g = vision.image_size // vision.patch_size
        return SceneGeometry(image_size=g * vision.patch_size, patch_size=vision.patch_size, token_grid=(g, g))
