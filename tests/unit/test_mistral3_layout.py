"""Mistral3 / Pixtral without weights: grids against the processor's own sizes, each token's
pixel box against the processed pixels and by hand, the scene geometry, row markers of
unusual prompts, the refusals, and PixtralProcessor without torchvision.

Each case writes a tiny config and processor (``save_model=False``) and builds the adapter
from them, exactly as ``HookedVLM.from_pretrained`` does.
"""

from __future__ import annotations

import copy
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from tests.conftest import make_photo
from tests.tiny.mistral3 import build_mistral3
from vlens.adapters import adapter_for
from vlens.adapters._processors import TORCHVISION_HELPER_IMPORTS, processor_class, torchvision_problem
from vlens.adapters.mistral3 import Mistral3Adapter
from vlens.data import make_scenes
from vlens.errors import PromptError, UnsupportedArchitectureError
from vlens.loading import load_config, load_processor
from vlens.prepare import prepare_batch

PROMPT = "what is in the image ?"
SIZES = [(61, 43), (40, 52), (90, 30), (30, 90), (56, 56), (10, 100), (14, 14), (200, 120), (13, 57), (5, 5)]


def make_adapter(path):
    config = load_config(str(path))
    cls = adapter_for(config)
    return cls(config, load_processor(str(path), cls.video_processor_class))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return make_adapter(build_mistral3(tmp_path_factory.mktemp("mistral3"), save_model=False))


def coordinate_image(width: int, height: int) -> PIL.Image.Image:
    """Red encodes x and green y (pixel centres scaled to 0..255)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    rgb = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 128.0)], axis=-1)
    return PIL.Image.fromarray(np.round(rgb).astype(np.uint8))


@pytest.mark.parametrize("size", SIZES)
def test_grid_is_the_processors_own_size_over_the_merged_patch(adapter, size):
    width, height = size
    inputs = prepare_batch(adapter, make_photo(width, height), PROMPT, None, True)
    resized = inputs.extras["image_sizes"][0].tolist()  # the processor's own resize
    (span,) = inputs.layout.images[0]
    assert span.grid == (resized[0] // 14, resized[1] // 14)
    assert list(adapter.resized_size(width, height)) == resized
    assert span.n_tokens == span.grid[0] * span.grid[1]
    assert len(span.marker_labels) == span.grid[0]


@pytest.mark.parametrize("size", [(61, 43), (40, 52), (90, 30), (200, 120)])
def test_boxes_agree_with_the_processed_pixels(adapter, size):
    """Each token's cell of the processed pixels has the mean colour of its box's centre on a
    coordinate image, within 2% of a cell; a second, larger image pads this one's pixels."""
    width, height = size
    ip = adapter.processor.image_processor
    mean, std = torch.tensor(ip.image_mean).view(3, 1, 1), torch.tensor(ip.image_std).view(3, 1, 1)
    inputs = prepare_batch(adapter, [coordinate_image(width, height), make_photo(200, 200)], "[IMG] [IMG] w", None, True)
    span = inputs.layout.images[0][0]
    pixels = (inputs.pixel_values[0].float() * std + mean) / ip.rescale_factor
    for k in range(span.n_tokens):
        r, c = span.row_col[k].tolist()
        patch = pixels[:, r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14]
        box = span.boxes[k]
        seen_x, seen_y = float(patch[0].mean()) * width / 255, float(patch[1].mean()) * height / 255
        assert abs(seen_x - float(box[0] + box[2]) / 2) <= 0.02 * float(box[2] - box[0]), (k, seen_x, box)
        assert abs(seen_y - float(box[1] + box[3]) / 2) <= 0.02 * float(box[3] - box[1]), (k, seen_y, box)
    assert torch.isfinite(span.boxes).all()


def test_a_known_patch_by_hand(adapter):
    """200 x 120 px, longest edge 56: ratio 200 / 56, so floor(120 * 56 / 200) = 33 px high,
    rounded up to 42 (3 tokens), and 56 px wide (4 tokens). Token (1, 2) is resized pixels
    x [28, 42), y [14, 28): in the image x * 200 / 56, y * 120 / 42."""
    (span,) = prepare_batch(adapter, make_photo(200, 120), PROMPT, None, True).layout.images[0]
    assert span.grid == (3, 4)
    k = span.labels.index("<img 1,2>")
    sx, sy = 200 / 56, 120 / 42
    assert torch.allclose(span.boxes[k].double(), torch.tensor([28 * sx, 14 * sy, 42 * sx, 28 * sy]).double(), atol=1e-4)


def test_scene_cells_are_the_token_cells(adapter):
    geometry = adapter.scene_geometry()
    assert (geometry.image_size, geometry.patch_size, geometry.token_grid) == (56, 14, (4, 4))
    scene = make_scenes(1, seed=0, **geometry.scene_kwargs())[0]
    (span,) = prepare_batch(adapter, scene.image, PROMPT, None, True).layout.images[0]
    assert span.grid == geometry.token_grid
    assert torch.allclose(span.boxes, torch.tensor(
        [[14 * c, 14 * r, 14 * c + 14, 14 * r + 14] for r in range(4) for c in range(4)], dtype=torch.float32
    ))


def test_rows_without_images_and_rows_with_two(adapter, photo, photo2):
    inputs = prepare_batch(adapter, [[], [photo, photo2], [photo2]], ["what", "[IMG] [IMG] what", "what"], None, True)
    assert inputs.layout.images[0] == ()
    assert [s.grid for s in inputs.layout.images[1]] == [(3, 4), (4, 3)]
    assert inputs.layout.images[2][0].grid == (4, 3)
    labels = inputs.layout.token_labels(1, ["?"] * int(inputs.layout.lengths[1]))
    assert labels.count("<nl 0>") == 2 and labels.count("<nl 2>") == 2 and labels.count("<nl 3>") == 1


def test_refuses_a_prompt_whose_rows_lack_their_markers(adapter):
    """A hand-written prompt with [IMG] tokens but no row markers (chat_template=False passes
    the text as it is; the processor expands [IMG] itself, so the markers are removed here)."""
    batch = adapter.process([[make_photo()]], ["[IMG] what"])
    ids = batch["input_ids"]
    markers = (ids == adapter.break_token_id) | (ids == adapter.end_token_id)
    batch["input_ids"] = torch.where(markers, torch.full_like(ids, adapter.tokenizer.convert_tokens_to_ids("what")), ids)
    with pytest.raises(PromptError, match=r"not each followed by \[IMG_BREAK\]"):
        adapter.build_layout(batch, [int(batch["attention_mask"][0].sum())])


def mistral3_config(**overrides):
    from transformers import Mistral3Config, MistralConfig, PixtralVisionConfig

    base = dict(
        vision_config=PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, head_dim=8, image_size=56, patch_size=7),
        text_config=MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  head_dim=8),
        spatial_merge_size=2, vision_feature_layer=-1,
    )
    config = Mistral3Config(**{**base, **overrides})
    config.architectures = ["Mistral3ForConditionalGeneration"]
    return config


def test_accepts_its_tiny_config():
    Mistral3Adapter.check_config(mistral3_config())


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(vision_feature_layer=[-2, -1]), r"vision_feature_layer = \[-2, -1\]"),
        (dict(spatial_merge_size=0), "spatial_merge_size = 0"),
    ],
)
def test_refuses_configs_it_does_not_handle(overrides, match):
    with pytest.raises(UnsupportedArchitectureError, match=match):
        Mistral3Adapter.check_config(mistral3_config(**overrides))


def test_refuses_other_towers():
    from transformers import GemmaConfig, SiglipVisionConfig

    gemma = GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, head_dim=8)
    with pytest.raises(UnsupportedArchitectureError, match="text_config.model_type = 'gemma'"):
        Mistral3Adapter.check_config(mistral3_config(text_config=gemma))
    siglip = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(UnsupportedArchitectureError, match="vision_config.model_type = 'siglip_vision_model'"):
        Mistral3Adapter.check_config(mistral3_config(vision_config=siglip))


def test_refuses_a_processor_that_disagrees_with_the_model(tmp_path):
    path = build_mistral3(tmp_path / "m", save_model=False)
    config, processor = load_config(str(path)), load_processor(str(path), "PixtralProcessor")
    other = copy.copy(processor)
    other.spatial_merge_size = 1
    with pytest.raises(UnsupportedArchitectureError, match=r"\(patch_size, spatial_merge_size\) \(7, 1\)"):
        Mistral3Adapter(config, other)
    other = copy.copy(processor)
    other.image_processor = copy.copy(processor.image_processor)
    other.image_processor.size = {"height": 56, "width": 56}
    adapter = Mistral3Adapter(config, other)
    with pytest.raises(UnsupportedArchitectureError, match="longest_edge"):
        adapter.scene_geometry()


@pytest.mark.skipif(torchvision_problem() is None, reason="torchvision imports here: AutoProcessor builds it")
def test_pixtral_processor_without_torchvision_is_the_real_class_and_leaves_no_stand_in():
    import transformers

    with pytest.raises(Exception):
        transformers.PixtralProcessor()  # transformers' own placeholder: needs torchvision
    cls = processor_class("PixtralProcessor")
    assert cls.__module__ == "transformers.models.pixtral.processing_pixtral"
    assert issubclass(cls, transformers.ProcessorMixin)
    _, torchvision_module, _ = TORCHVISION_HELPER_IMPORTS["PixtralProcessor"]
    assert torchvision_module not in sys.modules  # the PIL stand-in was only there for the import
