"""Shared fixtures: generated images and tiny checkpoints (nothing is downloaded)."""

from __future__ import annotations

import os

import numpy as np
import PIL.Image
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def make_photo(width: int = 61, height: int = 43, seed: int = 0) -> PIL.Image.Image:
    """A non-square image with smooth gradients, edges and noise, like a small photograph."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 128 + 100 * np.sin(x / 7.0 + seed)
    g = 128 + 100 * np.cos(y / 5.0)
    b = np.where((x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 3) ** 2, 220, 40)
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 12, size=(height, width, 3))
    return PIL.Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def photo() -> PIL.Image.Image:
    return make_photo()


@pytest.fixture(scope="session")
def photo2() -> PIL.Image.Image:
    return make_photo(width=40, height=52, seed=3)


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory):
    from tests.tiny.llava import build_llava

    return build_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="session")
def llava_model(llava_dir):
    from vlens import HookedVLM

    return HookedVLM.from_pretrained(llava_dir, device="cpu")
