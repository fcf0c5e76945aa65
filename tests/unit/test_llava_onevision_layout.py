"""LLaVA-OneVision without weights: token counts against the processor's own, each token's
pixel box against the processed pixels, the layout of unusual batches, and the refusals.

Each case writes a tiny config and processor (``save_model=False``) and builds the adapter
from them, exactly as ``HookedVLM.from_pretrained`` does.
"""

from __future__ import annotations

import copy

import numpy as np
import PIL.Image
import pytest
import torch

from tests.conftest import make_photo
from tests.tiny.llava_onevision import build_llava_onevision
from vlens.adapters import adapter_for
from vlens.adapters.llava_onevision import LlavaOnevisionAdapter
from vlens.errors import UnsupportedArchitectureError
from vlens.loading import load_config, load_processor
from vlens.prepare import prepare_batch

PROMPT = "what is in the image ?"
SIZES = [(43, 61), (52, 40), (30, 90), (90, 30), (56, 56), (10, 100), (28, 28), (200, 120), (120, 400)]


def make_adapter(path):
    config = load_config(str(path))
    cls = adapter_for(config)
    return cls(config, load_processor(str(path), cls.video_processor_class))


@pytest.fixture(scope="module", params=["anyres_max_9", "anyres_max_2", "anyres_max_1"])
def adapter(request, tmp_path_factory):
    path = build_llava_onevision(tmp_path_factory.mktemp(request.param), aspect_ratio=request.param, save_model=False)
    return make_adapter(path)


def coordinate_image(width: int, height: int) -> PIL.Image.Image:
    """Red encodes x and green y (pixel centres scaled to 0..255)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    rgb = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 128.0)], axis=-1)
    return PIL.Image.fromarray(np.round(rgb).astype(np.uint8))


def unnormalised(adapter, pixel_values):
    ip = adapter.processor.image_processor
    mean, std = torch.tensor(ip.image_mean).view(3, 1, 1), torch.tensor(ip.image_std).view(3, 1, 1)
    return (pixel_values.float() * std + mean) / ip.rescale_factor


@pytest.mark.parametrize("size", SIZES)
def test_counts_equal_the_processors_own(adapter, size):
    """The processor counts placeholders with its own code (``_get_number_of_features``);
    the layout must agree for single images (tiled) and for images of a two-image prompt."""
    height, width = size
    image = make_photo(width, height)
    g = adapter.config.vision_config.image_size // adapter.config.vision_config.patch_size
    expected = adapter.processor._get_number_of_features(height, width, g * 7, g * 7)
    (span,) = prepare_batch(adapter, image, PROMPT, None, True).layout.images[0]
    assert span.n_tokens == expected
    for t, (rows, cols) in span.tile_grids.items():
        assert int((span.tile == t).sum()) == rows * cols, t
    pair = prepare_batch(adapter, [image, make_photo(40, 52)], "<image> <image> " + PROMPT, None, True)
    assert [s.n_tokens for s in pair.layout.images[0]] == [g * g + 1, g * g + 1]


def test_two_images_of_different_aspect_ratios_give_different_counts(adapter):
    wide, tall = make_photo(90, 30), make_photo(30, 90)
    square = make_photo(56, 56)
    counts = [prepare_batch(adapter, im, PROMPT, None, True).layout.images[0][0].n_tokens for im in (wide, tall, square)]
    assert counts[0] != counts[2] and counts[1] != counts[2]


@pytest.mark.parametrize("size", [(61, 43), (40, 52), (90, 30), (200, 120)])
def test_boxes_agree_with_the_processed_pixels(adapter, size):
    """Each base, crop and untiled token's patch of the processed pixels has the mean colour of
    its box's centre on a coordinate image, within 2% of a cell (padding patches skipped)."""
    width, height = size
    vision = adapter.config.vision_config
    g, p = vision.image_size // vision.patch_size, vision.patch_size
    image = coordinate_image(width, height)
    alone = prepare_batch(adapter, image, PROMPT, None, True)
    pair = prepare_batch(adapter, [image, coordinate_image(40, 40)], "<image> <image> " + PROMPT, None, True)
    # The square's padding is the mean colour as whole numbers (pad_to_square's background).
    background = torch.tensor([int(x * 255) for x in adapter.processor.image_processor.image_mean]).view(3, 1, 1)
    checked = 0
    for inputs, tiled in ((alone, True), (pair, False)):
        span = inputs.layout.images[0][0]
        pixels = unnormalised(adapter, inputs.pixel_values[0])  # [sub-images, 3, H, W] of image 0
        canvas = adapter.canvas(torch.tensor([height, width]), tiled)
        for k in range(span.n_tokens):
            tile = int(span.tile[k])
            if tile < 0 or (tile > 0 and canvas.resampled is not None):
                continue  # newlines; resampled tokens mix patches (checked by hand below)
            r, c = canvas.canvas_rc[k]
            r, c = (r % g, c % g) if tile > 0 else (r, c)
            patch = pixels[tile, :, r * p : (r + 1) * p, c * p : (c + 1) * p]
            if bool((patch.abs() < 0.5).all(0).any()) or bool(((patch - background).abs() < 0.5).all(0).any()):
                continue  # touches padding of a tile canvas (zeros) or of the square (the mean colour)
            box = span.boxes[k]
            seen_x, seen_y = float(patch[0].mean()) * width / 255, float(patch[1].mean()) * height / 255
            assert abs(seen_x - float(box[0] + box[2]) / 2) <= 0.02 * float(box[2] - box[0]), (k, seen_x, box)
            assert abs(seen_y - float(box[1] + box[3]) / 2) <= 0.02 * float(box[3] - box[1]), (k, seen_y, box)
            checked += 1
    assert checked >= g * g


def test_a_known_patch_by_hand(tmp_path):
    """anyres_max_9, a 61 x 43 image: the 2 x 2 canvas of 56 x 56 px. Resized keeping its aspect,
    it is 56 x ceil(43 * 56 / 61) = 40 px high, padded by (56 - 40) // 2 = 8 px on top. Crop 1's
    patch (1, 2) is canvas pixels x in [14, 21), y in [7, 14): y in the image is (y - 8) * 43 / 40,
    so its box is x [14, 21) * 61 / 56, y [0, 6) * 43 / 40 after clipping the padding row off.
    The base token (0, 0) is pixels [0, 7) of the image squashed to 28 x 28."""
    adapter = make_adapter(build_llava_onevision(tmp_path / "ov", save_model=False))
    (span,) = prepare_batch(adapter, make_photo(61, 43), PROMPT, None, True).layout.images[0]
    label = span.labels.index("<t1 0,2>")  # crop 1's first kept row is canvas row 1 (row 0 is padding)
    sx, sy = 61 / 56, 43 / 40
    assert torch.allclose(span.boxes[label].double(), torch.tensor([14 * sx, 0.0, 21 * sx, 6 * sy]).double(), atol=1e-4)
    assert torch.allclose(span.boxes[0].double(), torch.tensor([0, 0, 7 * 61 / 28, 7 * 43 / 28]).double(), atol=1e-4)
    # An untiled image of a two-image prompt is padded to a 61 x 61 square, (61 - 43) // 2 = 9 px on top.
    pair = prepare_batch(adapter, [make_photo(61, 43), make_photo(40, 52)], "<image> <image> w", None, True)
    untiled = pair.layout.images[0][0]
    k = untiled.labels.index("<img 1,0>")
    s = 61 / 28
    assert torch.allclose(untiled.boxes[k].double(), torch.tensor([0, 7 * s - 9, 7 * s, 14 * s - 9]).double(), atol=1e-4)
    assert torch.isnan(untiled.boxes[-1]).all()  # its newline


def test_resampled_boxes_by_hand(tmp_path):
    """anyres_max_1, a 56 x 56 image: the 2 x 2 canvas (8 x 8 patches) keeps every patch;
    ratio sqrt(64 / 16) = 2 > 1.1 resamples it to 4 x 4, each token 2 x 2 canvas patches:
    resampled token (r, c) covers pixels [14c, 14c + 14) x [14r, 14r + 14)."""
    adapter = make_adapter(build_llava_onevision(tmp_path / "ov", aspect_ratio="anyres_max_1", save_model=False))
    (span,) = prepare_batch(adapter, make_photo(56, 56), PROMPT, None, True).layout.images[0]
    assert span.tile_grids == {0: (4, 4), 1: (4, 4)}
    mine = span.tile == 1
    r, c = span.row_col[mine, 0].double(), span.row_col[mine, 1].double()
    expected = torch.stack([14 * c, 14 * r, 14 * c + 14, 14 * r + 14], dim=1)
    assert torch.allclose(span.boxes[mine].double(), expected, atol=1e-4)


def test_a_text_only_row_and_a_multi_image_row(tmp_path, photo, photo2):
    adapter = make_adapter(build_llava_onevision(tmp_path / "ov", save_model=False))
    inputs = prepare_batch(adapter, [[], [photo, photo2], [photo2]], ["what", "<image> <image> what", "what"], None, True)
    assert inputs.extras["batch_num_images"].tolist() == [2, 1]
    assert inputs.layout.images[0] == ()
    assert [s.n_tokens for s in inputs.layout.images[1]] == [17, 17]
    alone = prepare_batch(adapter, photo2, "what", None, True).layout.images[0][0]
    assert inputs.layout.images[2][0].n_tokens == alone.n_tokens > 17


def onevision_config(**overrides):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    base = dict(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, image_size=28, patch_size=7),
        text_config=Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4),
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=[[28, 56], [56, 56]],
    )
    config = LlavaOnevisionConfig(**{**base, **overrides})
    config.architectures = ["LlavaOnevisionForConditionalGeneration"]
    return config


def test_accepts_its_tiny_config():
    LlavaOnevisionAdapter.check_config(onevision_config())


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(vision_aspect_ratio="pad"), "vision_aspect_ratio = 'pad'"),
        (dict(vision_aspect_ratio="anyres_max_0"), "vision_aspect_ratio = 'anyres_max_0'"),
        (dict(vision_feature_layer=[-2, -1]), r"vision_feature_layer = \[-2, -1\]"),
        (dict(vision_feature_select_strategy="default"), "vision_feature_select_strategy='default'"),
        (dict(image_grid_pinpoints=[[30, 60]]), "image_grid_pinpoints"),
    ],
)
def test_refuses_configs_it_does_not_handle(overrides, match):
    with pytest.raises(UnsupportedArchitectureError, match=match):
        LlavaOnevisionAdapter.check_config(onevision_config(**overrides))


def test_refuses_a_non_llama_style_text_tower():
    from transformers import GemmaConfig

    gemma = GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, head_dim=8)
    with pytest.raises(UnsupportedArchitectureError, match="model_type = 'gemma'"):
        LlavaOnevisionAdapter.check_config(onevision_config(text_config=gemma))


def test_refuses_a_processor_that_tiles_differently(tmp_path):
    path = build_llava_onevision(tmp_path / "ov", save_model=False)
    config, processor = load_config(str(path)), load_processor(str(path), "LlavaOnevisionProcessor")
    other = copy.copy(processor)
    other.vision_aspect_ratio = "anyres_max_4"
    with pytest.raises(UnsupportedArchitectureError, match="vision_aspect_ratio 'anyres_max_4'"):
        LlavaOnevisionAdapter(config, other)
    other = copy.copy(processor)
    other.num_image_tokens = 9
    with pytest.raises(UnsupportedArchitectureError, match="num_image_tokens 9"):
        LlavaOnevisionAdapter(config, other)
