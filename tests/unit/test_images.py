"""Image conversion: every accepted type becomes RGB; everything else gets a clear error."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from vlens.errors import ImageFileError, ImageInputError
from vlens.images import to_rgb


def test_pil_modes_become_rgb():
    gray = PIL.Image.new("L", (5, 4), 77)
    rgba = PIL.Image.new("RGBA", (5, 4), (10, 20, 30, 0))  # fully transparent -> white
    pal = PIL.Image.new("P", (5, 4))
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal.paste(1, (0, 0, 5, 4))
    assert to_rgb(gray).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(pal).getpixel((2, 2)) == (200, 100, 50)
    assert all(to_rgb(im).mode == "RGB" for im in (gray, rgba, pal))


def test_numpy_and_torch_layouts():
    hwc = np.zeros((4, 6, 3), dtype=np.uint8)
    hwc[1, 2] = (1, 2, 3)
    assert to_rgb(hwc).size == (6, 4) and to_rgb(hwc).getpixel((2, 1)) == (1, 2, 3)
    chw = torch.from_numpy(hwc).permute(2, 0, 1)
    assert to_rgb(chw).getpixel((2, 1)) == (1, 2, 3)
    assert to_rgb(chw.float() / 255).getpixel((2, 1)) == (1, 2, 3)
    assert to_rgb(np.full((3, 3), 9, dtype=np.uint8)).getpixel((0, 0)) == (9, 9, 9)


def test_paths(tmp_path):
    path = tmp_path / "a.png"
    PIL.Image.new("RGB", (3, 2), (5, 6, 7)).save(path)
    assert to_rgb(path).getpixel((0, 0)) == (5, 6, 7)
    assert to_rgb(str(path)).size == (3, 2)


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (42, "int"),
        (np.zeros((4, 4, 3), dtype=np.float32), "float32"),
        (np.zeros((4, 4, 2), dtype=np.uint8), "(4, 4, 2)"),
        (torch.zeros(2, 3, 4, 4), "(2, 3, 4, 4)"),
        (torch.full((3, 4, 4), 3.0), "[3, 3]"),
    ],
)
def test_unsupported_images_name_the_value(bad, fragment):
    with pytest.raises(ImageInputError, match=None) as err:
        to_rgb(bad)
    assert fragment in str(err.value)
    assert isinstance(err.value, TypeError)


def test_bad_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ImageFileError, match="notes.txt"):
        to_rgb(text)
    with pytest.raises(ImageFileError, match="does not exist"):
        to_rgb(tmp_path / "missing.png")
    with pytest.raises(ImageFileError, match="folder"):
        to_rgb(tmp_path)
