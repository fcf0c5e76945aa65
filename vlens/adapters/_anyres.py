"""Anyres tiling shared by LLaVA-NeXT and LLaVA-OneVision: a base grid, unpadded crops, newlines.

The image processor picks the best of ``image_grid_pinpoints`` for the image's size,
resizes the image into that canvas (aspect kept, centred with padding), cuts it into
``tiles_h x tiles_w`` crops of the vision tower's input size, and also sends the whole
image resized to one crop (the *base* image). The model's ``pack_image_features`` then
places, for each image:

1. the base image's patch grid (``g x g`` tokens, ``g = image_size // patch_size``);
2. the crops' patches stitched into one ``tiles_h*g x tiles_w*g`` canvas, with the
   padding rows (or columns) cut off again (``unpad_image``), read row by row, each
   canvas row followed by one ``image_newline`` token.

LLaVA-OneVision adds two rules (``anyres_max_N``, :func:`anyres_canvas`'s ``max_crops``
and ``tiled``): an unpadded canvas of more than about N tiles' worth of patches is
resampled bilinearly down to about N tiles (``ratio > 1.1``), and an image in a prompt with
several images is not tiled at all: its base grid (of the image padded to a square) and one
newline.

In the layout, tile 0 is the base image, tiles ``1..tiles_h*tiles_w`` are the crops in
row-major order and newline tokens have tile -1. A crop's grid is the part of it that
survives unpadding, so each tile id has exactly ``rows * cols`` tokens. A resampled canvas
no longer splits into crops: its tokens form one tile, 1, with the resampled grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from jaxtyping import Float
from torch import Tensor
from transformers import BatchFeature
from transformers.image_processing_utils import select_best_resolution

from vlens.adapters._geometry import Frame, cell_boxes, center_crop, clip_to_image, resized_size, size_get
from vlens.adapters.base import VisionPrefixAdapter
from vlens.adapters.contract import SceneGeometry, SequentialPositions
from vlens.errors import PromptError, UnsupportedArchitectureError
from vlens.layout import ImageSpan


@dataclass(frozen=True)
class AnyresCanvas:
    """Where each token of one anyres image sits, in the model's packing order.

    Attributes:
        tile: Per token, 0 for the base image, 1.. for crops, -1 for newlines.
        row_col: Per token, (row, col) in its tile's (unpadded) grid, -1 for newlines.
        labels: Per token, ``<img r,c>``, ``<t{k} r,c>`` or ``<nl r>``.
        tile_grids: (rows, cols) of every tile with at least one token.
        canvas_rc: Per token, (row, col) in the base grid for base tokens, in the whole
            (padded) crop canvas's patch grid for crop tokens, in the resampled grid for
            resampled tokens, -1 for newlines.
        resampled: For a resampled canvas, (first row, first col, rows per token, cols per
            token) in the padded canvas's patch grid: resampled token (r, c) covers canvas
            rows ``[r0 + r*sr, r0 + (r+1)*sr)`` and columns likewise. None otherwise.
    """

    tile: list[int]
    row_col: list[tuple[int, int]]
    labels: list[str]
    tile_grids: dict[int, tuple[int, int]]
    canvas_rc: list[tuple[int, int]]
    resampled: Optional[tuple[float, float, float, float]] = None

    @property
    def n_tokens(self) -> int:
        return len(self.tile)


def anyres_canvas(
    image_height: int,
    image_width: int,
    grid_pinpoints: list,
    tower_image_size: int,
    patch_size: int,
    max_crops: Optional[int] = None,
    tiled: bool = True,
) -> AnyresCanvas:
    """The token layout of one image, following ``pack_image_features`` / ``unpad_image``.

    Args:
        image_height, image_width: The original image size (the processor's ``image_sizes``).
        grid_pinpoints: ``config.image_grid_pinpoints`` ((height, width) in pixels).
        tower_image_size: ``config.vision_config.image_size`` (one crop's side in pixels).
        patch_size: ``config.vision_config.patch_size``.
        max_crops: OneVision's ``anyres_max_N``: N; None (LLaVA-NeXT) never resamples.
        tiled: False for a OneVision image in a multi-image prompt: base grid and one newline.
    """
    g = tower_image_size // patch_size
    tile: list[int] = []
    row_col: list[tuple[int, int]] = []
    labels: list[str] = []
    canvas_rc: list[tuple[int, int]] = []

    def newline(row: int) -> None:
        tile.append(-1)
        row_col.append((-1, -1))
        labels.append(f"<nl {row}>")
        canvas_rc.append((-1, -1))

    for r in range(g):
        for c in range(g):
            tile.append(0)
            row_col.append((r, c))
            labels.append(f"<img {r},{c}>")
            canvas_rc.append((r, c))
    grids: dict[int, tuple[int, int]] = {0: (g, g)}
    if not tiled:
        newline(0)
        return AnyresCanvas(tile=tile, row_col=row_col, labels=labels, tile_grids=grids, canvas_rc=canvas_rc)

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

    height, width = row_hi - row_lo, col_hi - col_lo
    ratio = math.sqrt(height * width / (max_crops * g**2)) if max_crops is not None else 0.0
    if ratio > 1.1:  # OneVision resamples the unpadded canvas (bilinear) to about max_crops tiles
        rows, cols = int(height // ratio), int(width // ratio)
        for r in range(rows):
            for c in range(cols):
                tile.append(1)
                row_col.append((r, c))
                labels.append(f"<t1 {r},{c}>")
                canvas_rc.append((r, c))
            newline(r)
        grids[1] = (rows, cols)
        resampled = (float(row_lo), float(col_lo), height / rows, width / cols)
        return AnyresCanvas(tile, row_col, labels, grids, canvas_rc, resampled=resampled)

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
            n_rows, n_cols = grids.get(t, (0, 0))
            grids[t] = (max(n_rows, r + 1), max(n_cols, c + 1))
        newline(R - row_lo)
    return AnyresCanvas(tile=tile, row_col=row_col, labels=labels, tile_grids=grids, canvas_rc=canvas_rc)


def patch_output_size(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """(height, width) of an image resized into a target canvas keeping its aspect ratio
    (mirrors ``transformers.image_processing_utils.get_patch_output_size``)."""
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


def check_pinpoints(config: Any, family: str) -> None:
    """Refuse ``image_grid_pinpoints`` that are not whole numbers of tower-sized crops."""
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    size = config.vision_config.image_size
    if not (
        isinstance(pinpoints, (list, tuple))
        and pinpoints
        and all(isinstance(p, (list, tuple)) and len(p) == 2 and not p[0] % size and not p[1] % size for p in pinpoints)
    ):
        raise UnsupportedArchitectureError(
            f"{family}: config.image_grid_pinpoints = {pinpoints!r} is not supported; vlens handles a "
            f"non-empty list of (height, width) pairs that are multiples of the tower's image_size ({size})"
        )


def check_tower_strategy(config: Any, family: str) -> None:
    """Refuse a feature-selection strategy that leaves a CLS token in (CLIP with 'full') or a real
    patch out of (SigLIP with 'default') every tile: the tiles would not be square grids."""
    has_cls = config.vision_config.model_type == "clip_vision_model"
    if has_cls != (config.vision_feature_select_strategy == "default"):
        raise UnsupportedArchitectureError(
            f"{family}: vision_feature_select_strategy={config.vision_feature_select_strategy!r} with a "
            f"{config.vision_config.model_type} tower leaves "
            f"{'a CLS token in' if has_cls else 'a real patch out of'} every tile, so the tiles do not form "
            "square grids; vlens handles CLIP towers with 'default' and SigLIP towers with 'full'"
        )


class AnyresAdapter(SequentialPositions, VisionPrefixAdapter):
    """What the anyres families share: spans from ``image_sizes``, pixel boxes, scene geometry.

    Contract: a 1-D causal language model with no per-token inputs. A base-image token's box
    is its patch of the whole image (squashed to one crop); a crop token's box is its patch
    of the padded canvas mapped back through the padding and the aspect-preserving resize; a
    resampled token's box is the canvas region it was resampled from; newline tokens have
    none. A subclass states :meth:`max_crops` and :meth:`tiled_images`.
    """

    per_token_inputs = ()
    causal_over_image = True

    def max_crops(self) -> Optional[int]:
        """The ``N`` of ``anyres_max_N`` (canvases beyond it are resampled), None for never."""
        return None

    def tiled_images(self, batch: BatchFeature) -> list[bool]:
        """Per image of the batch (flattened in row order), whether it was tiled."""
        return [True] * int(batch["image_sizes"].shape[0])

    def untiled_frame(self, width: int, height: int) -> Frame:
        """The frame of the one sub-image of an image that was not tiled."""
        raise UnsupportedArchitectureError(f"{self.family}: every image is tiled; none has a single sub-image")

    def model_extras(self, batch: BatchFeature) -> dict[str, torch.Tensor]:
        if batch.get("pixel_values") is None:
            return {}  # a text-only batch: HF's forward takes no image_sizes then
        return super().model_extras(batch)

    def canvas(self, image_size: torch.Tensor, tiled: bool = True) -> AnyresCanvas:
        """The token layout of an image of ``image_size`` = (height, width) pixels."""
        vision = self.config.vision_config
        height, width = (int(v) for v in image_size)
        return anyres_canvas(
            height, width, self.config.image_grid_pinpoints, vision.image_size, vision.patch_size,
            max_crops=self.max_crops(), tiled=tiled,
        )

    def image_spans(self, batch: BatchFeature, row: int, positions: torch.Tensor) -> list[ImageSpan]:
        if positions.numel() == 0:
            return []
        sizes = batch["image_sizes"]
        tiled = self.tiled_images(batch)
        index = self._first_image_of_row(batch, row, tiled)
        spans: list[ImageSpan] = []
        start = 0
        while start < positions.shape[0]:
            if index >= sizes.shape[0]:
                raise PromptError(
                    f"row {row}: the prompt has {positions.shape[0]} image placeholder tokens, but the anyres "
                    f"layout of its image(s) needs {start} ({[s.n_tokens for s in spans]} per image); the "
                    "processor and the model config disagree on how many tokens an image becomes"
                )
            canvas = self.canvas(sizes[index], tiled[index])
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

    def _first_image_of_row(self, batch: BatchFeature, row: int, tiled: list[bool]) -> int:
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
                n_placeholders -= self.canvas(sizes[index], tiled[index]).n_tokens
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
                    f"{self.family}: the image processor's crop_size {ip.crop_size!r} has no height and width"
                )
            frame = center_crop(frame, crop_h, crop_w, ip)
        tower = self.config.vision_config.image_size
        if (frame.width, frame.height) != (tower, tower):
            raise UnsupportedArchitectureError(
                f"{self.family}: the image processor hands the tower {int(frame.width)}x{int(frame.height)} px "
                f"sub-images, not {tower}x{tower} (vision_config.image_size)"
            )
        return frame

    def sub_image_frames(self, width: int, height: int) -> tuple[Frame, dict[int, Frame]]:
        """The frames of the base image and of each crop (tile id 1..) of a ``width x height``
        image, following the image processors' ``get_image_patches``: the base image is the
        whole image resized to ``size``; the crops are cut from the image resized into the best
        pinpoint canvas (aspect kept, centred with padding)."""
        base, canvas, crop_px = self._base_and_canvas(width, height)
        tiles_w = int(canvas.width) // crop_px
        crops = {
            tr * tiles_w + tc + 1: self._finish(canvas.crop(tc * crop_px, tr * crop_px, crop_px, crop_px))
            for tr in range(int(canvas.height) // crop_px)
            for tc in range(tiles_w)
        }
        return base, crops

    def _base_and_canvas(self, width: int, height: int) -> tuple[Frame, Frame, int]:
        """The base image's frame, the padded pinpoint canvas's frame and the crop side."""
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
                f"{self.family}: the image processor's size {size!r} has neither height and width nor shortest_edge"
            )
        base = self._finish(Frame(float(width), float(height)).resize(base_w, base_h))
        best_h, best_w = select_best_resolution((height, width), self.config.image_grid_pinpoints)
        new_h, new_w = patch_output_size(height, width, best_h, best_w)
        canvas = Frame(float(width), float(height)).resize(new_w, new_h)
        canvas = canvas.pad((best_w - new_w) // 2, (best_h - new_h) // 2, best_w, best_h)
        return base, canvas, crop_px

    def token_boxes(self, span: ImageSpan, image_size: tuple[int, int]) -> Float[Tensor, "n 4"]:
        width, height = image_size
        # An untiled image is a base grid and one newline; a tiled one has crop tokens, or, when
        # unpadding leaves no canvas row (a very wide image), nothing after its base grid.
        tiled = bool((span.tile > 0).any()) or int(span.tile[-1]) != -1
        canvas = self.canvas(torch.tensor([height, width]), tiled)
        if canvas.n_tokens != span.n_tokens or list(span.tile.tolist()) != canvas.tile:
            raise UnsupportedArchitectureError(
                f"{self.family}: a {width}x{height} image makes {canvas.n_tokens} tokens, its span has {span.n_tokens}"
            )
        g = self.config.vision_config.image_size // self.config.vision_config.patch_size
        patch = self.config.vision_config.patch_size
        rc = torch.tensor(canvas.canvas_rc, dtype=torch.long)
        boxes = torch.full((span.n_tokens, 4), float("nan"))
        on_base = span.tile == 0
        if not tiled:
            boxes[on_base] = self.untiled_frame(width, height).to_original(cell_boxes(rc[on_base], patch))
            return clip_to_image(boxes, width, height)
        base, crops = self.sub_image_frames(width, height)
        boxes[on_base] = base.to_original(cell_boxes(rc[on_base], patch))
        if canvas.resampled is not None:
            boxes[span.tile == 1] = self._resampled_boxes(canvas, rc[span.tile == 1], width, height)
            return clip_to_image(boxes, width, height)
        for t, frame in crops.items():
            mine = span.tile == t
            if bool(mine.any()):
                # A crop token at canvas patch (R, C) is patch (R mod g, C mod g) of its crop.
                boxes[mine] = frame.to_original(cell_boxes(rc[mine] % g, patch))
        return clip_to_image(boxes, width, height)

    def _resampled_boxes(
        self, canvas: AnyresCanvas, rc: Tensor, width: int, height: int
    ) -> Float[Tensor, "n 4"]:
        """Boxes of resampled tokens: the region of the padded canvas each one was resampled
        from, which needs the crops to be the canvas cut up unchanged (crop side = tower)."""
        assert canvas.resampled is not None
        _, frame, crop_px = self._base_and_canvas(width, height)
        tower = self.config.vision_config.image_size
        if crop_px != tower:
            raise UnsupportedArchitectureError(
                f"{self.family}: crops of {crop_px} px are resized to the tower's {tower} px, so a resampled "
                "canvas token has no single region of the pinpoint canvas; vlens maps boxes for crops of the "
                "tower's size"
            )
        self.sub_image_frames(width, height)  # the processor's checks on every crop
        patch = self.config.vision_config.patch_size
        r0, c0, sr, sc = canvas.resampled
        r, c = rc[:, 0].double(), rc[:, 1].double()
        cells = torch.stack([c0 + c * sc, r0 + r * sr, c0 + (c + 1) * sc, r0 + (r + 1) * sr], dim=1) * patch
        return frame.to_original(cells)

    def scene_geometry(self) -> SceneGeometry:
        # A square scene's base image is the scene resized to one crop; its grid is the base grid.
        vision = self.config.vision_config
        g = vision.image_size // vision.patch_size
        return SceneGeometry(image_size=g * vision.patch_size, patch_size=vision.patch_size, token_grid=(g, g))
