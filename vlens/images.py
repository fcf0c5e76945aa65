"""Turning whatever a user calls an image into an RGB ``PIL.Image``.

Accepted: ``PIL.Image.Image`` (any mode), a path (``str`` or ``os.PathLike``) to an
image file, a ``numpy`` array ``H x W x C`` (or ``H x W``) of ``uint8``, and a
``torch`` tensor ``C x H x W`` (``uint8`` 0-255 or floating 0-1). Grayscale, RGBA,
palette and other modes become RGB; transparency is composited on white, as a viewer
would show it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import numpy as np
import PIL.Image
import torch

from vlens.errors import ImageFileError, ImageInputError

ImageLike = Union[PIL.Image.Image, str, os.PathLike, np.ndarray, torch.Tensor]

ACCEPTED = (
    "a PIL.Image, a path to an image file, a numpy uint8 array H x W x C (C in 1, 3, 4) "
    "or H x W, or a torch tensor C x H x W (uint8 or float in [0, 1])"
)


def to_rgb(image: Any) -> PIL.Image.Image:
    """Convert one image-like value to an RGB PIL image.

    Raises:
        ImageInputError: for a value of an unsupported type or shape.
        ImageFileError: for a path that is missing or not an image.
    """
    if isinstance(image, PIL.Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        return _pil_to_rgb(_open(Path(image)))
    if isinstance(image, np.ndarray):
        return _pil_to_rgb(_from_numpy(image))
    if isinstance(image, torch.Tensor):
        return _pil_to_rgb(_from_torch(image))
    raise ImageInputError(f"cannot use an object of type {type(image).__name__} as an image; pass {ACCEPTED}")


def _open(path: Path) -> PIL.Image.Image:
    if not path.exists():
        raise ImageFileError(f"image file {str(path)!r} does not exist")
    if path.is_dir():
        raise ImageFileError(f"image path {str(path)!r} is a folder; pass the path of one image file")
    try:
        with PIL.Image.open(path) as img:
            img.load()
            return img.copy()
    except (PIL.UnidentifiedImageError, OSError) as err:
        raise ImageFileError(
            f"file {str(path)!r} is not an image PIL can read ({err}); pass a PNG, JPEG or other PIL-readable file"
        ) from None


def _from_numpy(array: np.ndarray) -> PIL.Image.Image:
    if array.dtype != np.uint8:
        raise ImageInputError(
            f"numpy image has dtype {array.dtype}; pass uint8 values 0-255 (e.g. (x * 255).astype('uint8'))"
        )
    if array.ndim == 2:
        return PIL.Image.fromarray(array, mode="L")
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        if array.shape[2] == 1:
            return PIL.Image.fromarray(array[:, :, 0], mode="L")
        return PIL.Image.fromarray(array, mode="RGB" if array.shape[2] == 3 else "RGBA")
    raise ImageInputError(f"numpy image has shape {tuple(array.shape)}; pass H x W x C with C in (1, 3, 4), or H x W")


def _from_torch(tensor: torch.Tensor) -> PIL.Image.Image:
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
        raise ImageInputError(
            f"torch image has shape {tuple(tensor.shape)}; pass C x H x W with C in (1, 3, 4) "
            "(a batch of images is a list of tensors)"
        )
    data = tensor.detach().to("cpu")
    if data.dtype == torch.uint8:
        array = data.numpy()
    elif data.is_floating_point():
        low, high = float(data.min()), float(data.max())
        if low < 0.0 or high > 1.0:
            raise ImageInputError(
                f"float torch image has values in [{low:.3g}, {high:.3g}]; pass values in [0, 1] "
                "(un-normalised) or a uint8 tensor"
            )
        array = (data * 255.0).round().to(torch.uint8).numpy()
    else:
        raise ImageInputError(f"torch image has dtype {data.dtype}; pass uint8 or a floating dtype")
    return _from_numpy(np.ascontiguousarray(array.transpose(1, 2, 0)))


def _pil_to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
    if img.width < 1 or img.height < 1:
        # Every image processor divides by a side; refuse here with the size rather than deep inside.
        raise ImageInputError(f"image has size {img.width} x {img.height} (width x height); pass an image at least 1 x 1")
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
