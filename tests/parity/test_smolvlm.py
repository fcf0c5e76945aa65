"""SmolVLM / SmolVLM2 parity: vlens equals Hugging Face's own SmolVLMForConditionalGeneration, loads
SmolVLMProcessor for images without torchvision or num2words, and the layout (crops in row-major
order, then the global image) and token boxes say where each token came from."""

from __future__ import annotations

import copy
import importlib.util

import PIL.Image
import pytest
import torch
import transformers

from tests.conftest import make_photo
from tests.parity.helpers import (
    assert_batched_equals_unbatched,
    assert_generate_matches_hf,
    assert_matches_hf,
    batch_and_singles,
    hooked_and_reference,
)
from tests.tiny.smolvlm import build_smolvlm
from vlens.adapters._processors import torchvision_problem, video_only_imports_absent
from vlens.adapters.smolvlm import SmolVLMAdapter
from vlens.errors import UnsupportedArchitectureError

PROMPT = "what is in the image ?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return hooked_and_reference(build_smolvlm(tmp_path_factory.mktemp("smolvlm")))


@pytest.fixture(scope="module")
def wide():
    return make_photo(width=90, height=30, seed=5)  # splits into 1 x 2 crops


def test_processor_loads_for_images_without_torchvision_or_num2words(tiny):
    model, _ = tiny
    if torchvision_problem() is None or importlib.util.find_spec("num2words") is not None:
        pytest.skip("this checks the machine without torchvision and num2words")
    assert isinstance(model.processor, transformers.SmolVLMProcessor)
    assert getattr(model.processor, "video_processor", None) is None
    assert isinstance(model.processor.image_processor, transformers.SmolVLMImageProcessorPil)
    # The module is left as transformers imported it.
    from transformers.models.smolvlm import processing_smolvlm

    assert processing_smolvlm.num2words is None
    # While vlens builds the processor, a video prompt would get a clear error, not a TypeError.
    with video_only_imports_absent(transformers.SmolVLMProcessor):
        with pytest.raises(ImportError, match="needs the package 'num2words' for video prompts"):
            processing_smolvlm.num2words(3)
    assert processing_smolvlm.num2words is None


def test_chat_template_renders_as_released(tiny):
    model, _ = tiny
    inputs = model.prepare(make_photo(), PROMPT)
    # SmolVLM's released template: role capitalised, ':' straight before an image, no space.
    assert inputs.texts == (f"<|im_start|>User:<image>{PROMPT}<end_of_utterance>\nAssistant:",)


def test_logits_hidden_states_and_patterns_equal_hf(tiny, photo):
    model, reference = tiny
    inputs = model.prepare(photo, PROMPT, answer="a red circle .")
    assert inputs.pixel_values.shape[1] == 5  # 2 x 2 crops + the global image
    assert "pixel_attention_mask" in inputs.extras
    assert_matches_hf(model, reference, inputs)


def test_layout_tiles_and_markers(tiny, photo):
    model, _ = tiny
    inputs = model.prepare(photo, PROMPT)
    ids = inputs.input_ids[0]
    config = model.hf_model.config
    (span,) = inputs.layout.images[0]
    assert torch.equal(span.positions, (ids == config.image_token_id).nonzero().flatten())
    g = config.vision_config.image_size // config.vision_config.patch_size // config.scale_factor
    assert span.tile_grids == {t: (g, g) for t in range(5)}
    tok = model.tokenizer.convert_ids_to_tokens
    starts = [int(span.positions[span.tile == t][0]) for t in range(5)]
    assert [tok(int(ids[s - 1])) for s in starts] == [
        "<global-img>", "<row_1_col_1>", "<row_1_col_2>", "<row_2_col_1>", "<row_2_col_2>"
    ]
    assert int(inputs.layout.marker_mask[0].sum()) == 5 + 5 + 1


def test_layout_matches_the_features_hf_scatters(tiny, photo):
    """Independent of the layout: the token at (tile t, r, c) holds the connector's projection of
    the scale x scale block of patches at (r, c) of sub-image t (crops first, global last)."""
    model, reference = tiny
    inputs = model.prepare(photo, PROMPT)
    (span,) = inputs.layout.images[0]
    seen = {}
    handle = reference.model.connector.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    try:
        with torch.no_grad():
            reference(**inputs.model_kwargs())
            _, cache = model.run_with_cache(inputs, names_filter="blocks.0.hook_resid_pre")
    finally:
        handle.remove()
    patches = seen["x"]  # [sub-images, side*side, d_vision]
    side = int(patches.shape[1] ** 0.5)
    s = model.hf_model.config.scale_factor
    grid = patches.reshape(patches.shape[0], side, side, -1)
    embeds = cache["blocks.0.hook_resid_pre"][0, span.positions]
    projection = reference.model.connector.modality_projection
    for k in range(span.n_tokens):
        t = int(span.tile[k])
        r, c = span.row_col[k].tolist()
        sub = patches.shape[0] - 1 if t == 0 else t - 1
        with torch.no_grad():
            want = projection(grid[sub, s * r : s * r + s, s * c : s * c + s].reshape(-1))
        assert torch.allclose(embeds[k], want, atol=1e-5), f"token {k} ({span.labels[k]})"


def test_token_box_is_the_cell_the_processor_cuts(tiny):
    """A white square drawn on the box of one crop token lands, in the pixel values of that
    crop, on that token's cell and no other (a 2-crop-wide square image needs no resize)."""
    model, _ = tiny
    crop = model.hf_model.config.vision_config.image_size
    cell = model.hf_model.config.vision_config.patch_size * model.hf_model.config.scale_factor
    probe = PIL.Image.new("RGB", (2 * crop, 2 * crop))
    (span,) = model.prepare(probe, PROMPT).layout.images[0]
    k = int(((span.tile == 3) & (span.row_col[:, 0] == 1) & (span.row_col[:, 1] == 2)).nonzero())
    box = span.boxes[k].tolist()
    assert box == [2 * cell, crop + cell, 3 * cell, crop + 2 * cell]  # crop (row 2, col 1), cell (1, 2)
    probe.paste((255, 255, 255), tuple(int(v) for v in box))
    pixels = model.prepare(probe, PROMPT).pixel_values[0, 2].mean(0)  # the third crop, [crop, crop]
    cells = pixels.unfold(0, cell, cell).unfold(1, cell, cell).mean(dim=(-1, -2)).flatten()
    order = cells.argsort(descending=True)
    side = crop // cell
    assert int(order[0]) == 1 * side + 2 and float(cells[order[0]] - cells[order[1]]) > 1.0


def test_batched_equals_unbatched_with_mixed_image_sizes(tiny, photo, wide):
    model, _ = tiny
    batch, singles = batch_and_singles(model, [photo, wide])
    assert [len(r[0].tile_grids) for r in batch.layout.images] == [5, 3]
    assert_batched_equals_unbatched(model, batch, singles)


def test_greedy_generate_equals_hf(tiny, wide):
    model, reference = tiny
    inputs = model.prepare(wide, "describe the image .")
    assert_generate_matches_hf(model, reference, inputs, n=5)


def test_two_images_in_one_row_equal_hf(tiny, photo, wide):
    model, reference = tiny
    inputs = model.prepare([wide, photo], "<image> what is in <image> the image ?")
    assert [len(s.tile_grids) for s in inputs.layout.images[0]] == [3, 5]
    assert_matches_hf(model, reference, inputs)


def test_config_settings_the_adapter_does_not_handle_are_refused(tiny):
    model, _ = tiny
    config = copy.deepcopy(model.hf_model.config)
    config.vision_config.model_type = "idefics3_vision"
    with pytest.raises(UnsupportedArchitectureError, match=r"smolvlm: config\.vision_config\.model_type"):
        SmolVLMAdapter.check_config(config)
    config = copy.deepcopy(model.hf_model.config)
    config.text_config.model_type = "mistral"
    with pytest.raises(UnsupportedArchitectureError, match=r"config\.text_config\.model_type = 'mistral'"):
        SmolVLMAdapter.check_config(config)
    config = copy.deepcopy(model.hf_model.config)
    config.scale_factor = 3
    with pytest.raises(UnsupportedArchitectureError, match="scale_factor 3"):
        SmolVLMAdapter.check_config(config)
