"""Pixel geometry of image processors, for the adapters' ``token_boxes``.

An image processor resizes, pads and crops; every step maps the original image's pixel
coordinates onto the processed image's by a scale and a shift per axis. A :class:`Frame`
is that map from the original image to one processed (sub-)image; a token's box on the
processed image goes back to the original image through its inverse. Each size rule here
mirrors the transformers function named in its docstring (transformers 5.23-5.24), and
refuses processor settings it does not reproduce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from vlens.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Frame:
    """A processed image of ``width x height`` pixels whose pixel x is ``sx * x0 + dx`` for
    the original image's pixel x0 (likewise y).

    Coordinates are continuous: pixel column i covers ``[i, i + 1)``.
    """

    width: float
    height: float
    sx: float = 1.0
    sy: float = 1.0
    dx: float = 0.0
    dy: float = 0.0

    def resize(self, width: float, height: float) -> "Frame":
        """The frame after resizing the whole image to ``width x height``."""
        kx, ky = width / self.width, height / self.height
        return Frame(width, height, self.sx * kx, self.sy * ky, self.dx * kx, self.dy * ky)

    def crop(self, left: float, top: float, width: float, height: float) -> "Frame":
        """The frame of the ``width x height`` window whose corner is at (left, top)."""
        return Frame(width, height, self.sx, self.sy, self.dx - left, self.dy - top)

    def pad(self, left: float, top: float, width: float, height: float) -> "Frame":
        """The frame after padding to ``width x height`` with the image at (left, top)."""
        return self.crop(-left, -top, width, height)

    def to_original(self, boxes: Float[Tensor, "n 4"]) -> Float[Tensor, "n 4"]:
        """Boxes (x0, y0, x1, y1) in this frame's pixels, in the original image's."""
        scale = torch.tensor([self.sx, self.sy, self.sx, self.sy], dtype=torch.float64)
        shift = torch.tensor([self.dx, self.dy, self.dx, self.dy], dtype=torch.float64)
        return ((boxes.double() - shift) / scale).float()


def grid_boxes(rows: int, cols: int, cell_w: float, cell_h: Optional[float] = None) -> Float[Tensor, "n 4"]:
    """Boxes of a ``rows x cols`` grid of ``cell_w x cell_h`` cells from (0, 0), raster order."""
    cell_h = cell_w if cell_h is None else cell_h
    r = torch.arange(rows, dtype=torch.float64).repeat_interleave(cols)
    c = torch.arange(cols, dtype=torch.float64).repeat(rows)
    return torch.stack([c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h], dim=1).float()


def cell_boxes(row_col: Tensor, cell_w: float, cell_h: Optional[float] = None) -> Float[Tensor, "n 4"]:
    """Boxes of grid cells given as (row, col) pairs; NaN where row is -1 (no cell)."""
    cell_h = cell_w if cell_h is None else cell_h
    rc = row_col.double()
    r, c = rc[:, 0], rc[:, 1]
    boxes = torch.stack([c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h], dim=1)
    boxes[row_col[:, 0] < 0] = float("nan")
    return boxes.float()


def clip_to_image(boxes: Float[Tensor, "n 4"], width: int, height: int) -> Float[Tensor, "n 4"]:
    """Boxes clipped to the image; NaN for a box that covers none of it (padding only)."""
    lo = torch.tensor([0.0, 0.0, 0.0, 0.0])
    hi = torch.tensor([float(width), float(height), float(width), float(height)])
    out = torch.maximum(torch.minimum(boxes, hi), lo)
    empty = (out[:, 2] <= out[:, 0]) | (out[:, 3] <= out[:, 1])
    out[empty] = float("nan")
    return out


def size_get(size: Any, key: str) -> Optional[int]:
    """A key of a processor size (a dict or a ``SizeDict``), None when unset."""
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value is not None else None


def resized_size(height: int, width: int, size: Any, family: str) -> tuple[int, int]:
    """(height, width) after a processor's ``resize`` with ``size``.

    Mirrors ``image_processing_backends`` ``resize``: ``shortest_edge`` alone scales the short
    side to it (``image_transforms.get_resize_output_image_size`` with
    ``default_to_square=False``: the long side is ``int(edge * long / short)``); ``height``
    and ``width`` resize to exactly that.
    """
    edge = size_get(size, "shortest_edge")
    h, w = size_get(size, "height"), size_get(size, "width")
    others = [k for k in ("longest_edge", "max_height", "max_width") if size_get(size, k) is not None]
    if edge is not None and not others and h is None and w is None:
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(edge * long / short)
        return (new_long, edge) if width <= height else (edge, new_long)
    if h is not None and w is not None and edge is None and not others:
        return h, w
    raise UnsupportedArchitectureError(
        f"{family}: the image processor resizes with size={size!r}; vlens maps token boxes for "
        "{'shortest_edge': s} or {'height': h, 'width': w}"
    )


def center_crop(frame: Frame, crop_h: int, crop_w: int, image_processor: Any) -> Frame:
    """The frame after a processor's ``center_crop`` to ``crop_h x crop_w``.

    Mirrors both backends (``TorchvisionBackend.center_crop``: corner at
    ``int((size - crop) / 2)``; ``PilBackend``'s ``image_transforms.center_crop``: at
    ``(size - crop) // 2``, the same for a crop inside the image). A crop larger than the
    image pads it first: the torchvision backend puts ``(crop - size) // 2`` on the left and
    top, the PIL backend ``ceil((crop - size) / 2)``.
    """
    from transformers.image_processing_backends import PilBackend

    height, width = int(round(frame.height)), int(round(frame.width))
    ceil_pad = isinstance(image_processor, PilBackend)
    if crop_w > width or crop_h > height:
        new_w, new_h = max(crop_w, width), max(crop_h, height)
        pad_w, pad_h = new_w - width, new_h - height
        left = math.ceil(pad_w / 2) if ceil_pad else pad_w // 2
        top = math.ceil(pad_h / 2) if ceil_pad else pad_h // 2
        frame = frame.pad(left, top, new_w, new_h)
        height, width = new_h, new_w
    return frame.crop((width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h)


def clip_style_frame(image_processor: Any, width: int, height: int, family: str) -> Frame:
    """The frame of the one image a CLIP-style processor makes of a ``width x height`` image:
    pad to a square (``do_pad``, LLaVA's ``pad_to_square``, image centred at
    ``(side - size) // 2``), resize (``do_resize``), centre-crop (``do_center_crop``)."""
    frame = Frame(float(width), float(height))
    if getattr(image_processor, "do_pad", False):
        side = max(width, height)
        frame = frame.pad((side - width) // 2, (side - height) // 2, side, side)
    if getattr(image_processor, "do_resize", False):
        h, w = resized_size(int(frame.height), int(frame.width), image_processor.size, family)
        frame = frame.resize(w, h)
    if getattr(image_processor, "do_center_crop", False):
        crop = image_processor.crop_size
        crop_h, crop_w = size_get(crop, "height"), size_get(crop, "width")
        if crop_h is None or crop_w is None:
            raise UnsupportedArchitectureError(
                f"{family}: the image processor's crop_size {crop!r} has no height and width"
            )
        frame = center_crop(frame, crop_h, crop_w, image_processor)
    return frame
