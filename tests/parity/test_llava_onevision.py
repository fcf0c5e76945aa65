"""LLaVA-OneVision parity: vlens equals Hugging Face's own LlavaOnevisionForConditionalGeneration,
and the anyres_max layout (base grid, unpadded or resampled tiles, newlines; one grid per image
of a multi-image prompt) says where each token came from."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape, unpad_image

from tests.parity.helpers import (
    assert_batched_equals_unbatched,
    assert_generate_matches_hf,
    assert_matches_hf,
    batch_and_singles,
    hooked_and_reference,
)
from tests.tiny.llava_onevision import build_llava_onevision

PROMPT = "what is in the image ?"


@pytest.fixture(scope="module", params=["anyres_max_9", "anyres_max_1"])
def tiny(request, tmp_path_factory):
    path = build_llava_onevision(tmp_path_factory.mktemp(request.param), aspect_ratio=request.param)
    return hooked_and_reference(path)


def hf_image_features(model, reference, inputs) -> list[torch.Tensor]:
    """Hugging Face's own packed features, one tensor per image (its get_image_features)."""
    with torch.no_grad():
        out = reference.model.get_image_features(
            inputs.pixel_values, inputs.extras["image_sizes"], batch_num_images=inputs.extras["batch_num_images"],
            vision_feature_layer=-1, vision_feature_select_strategy="full",
        )
    return list(out.pooler_output)


def test_logits_hidden_states_and_patterns_equal_hf(tiny, photo):
    model, reference = tiny
    inputs = model.prepare(photo, PROMPT, answer="a red circle .")
    assert inputs.extras["batch_num_images"].tolist() == [1]
    assert_matches_hf(model, reference, inputs)


def test_layout_matches_the_features_hf_scatters(tiny, photo):
    """Independent of the layout arithmetic: each span is as long as HF's packed features of
    its image, newline positions hold ``image_newline``, the base tokens are the base crop's
    projected grid, and the high-resolution tokens are HF's unpadded (and, past anyres_max,
    bilinearly resampled) canvas of the crops' features, read row by row."""
    model, reference = tiny
    inputs = model.prepare(photo, PROMPT)
    (span,) = inputs.layout.images[0]
    (features,) = hf_image_features(model, reference, inputs)
    assert span.n_tokens == features.shape[0]
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter="blocks.0.hook_resid_pre")
        embeds = cache["blocks.0.hook_resid_pre"][0, span.positions]
        core = reference.model
        hidden = core.vision_tower(inputs.pixel_values[0], output_hidden_states=True).hidden_states[-1]
        crops = core.multi_modal_projector(hidden)  # [1 + tiles (+ padding), g*g, d]
    config = model.hf_model.config
    g = config.vision_config.image_size // config.vision_config.patch_size
    newline = span.tile == -1
    assert torch.allclose(embeds[newline], core.image_newline.expand(int(newline.sum()), -1), atol=1e-6)
    assert torch.allclose(embeds[span.tile == 0], crops[0], atol=1e-5)  # base grid first, raster order
    size = inputs.extras["image_sizes"][0]
    tiles_h, tiles_w = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, config.vision_config.image_size)
    canvas = crops[1 : 1 + tiles_h * tiles_w].reshape(tiles_h, tiles_w, g, g, -1).permute(4, 0, 2, 1, 3)
    canvas = unpad_image(canvas.reshape(-1, tiles_h * g, tiles_w * g), size)
    high = span.tile > 0
    rows = int(newline.sum())
    if config.vision_aspect_ratio == "anyres_max_1":
        assert sorted(span.tile_grids) == [0, 1]  # one resampled tile
        assert rows < canvas.shape[1]
        canvas = torch.nn.functional.interpolate(canvas[None], span.tile_grids[1], mode="bilinear")[0]
    else:
        assert sorted(span.tile_grids) == list(range(tiles_h * tiles_w + 1))
    assert rows == canvas.shape[1]
    assert torch.allclose(embeds[high], canvas.permute(1, 2, 0).reshape(-1, canvas.shape[0]), atol=1e-5)
    # Each row of the canvas ends in a newline token.
    row_len = canvas.shape[2] + 1
    assert torch.equal(newline.nonzero().flatten(), g * g + row_len - 1 + row_len * torch.arange(rows))


def test_two_images_in_one_prompt_are_one_grid_each_and_equal_hf(tiny, photo, photo2):
    model, reference = tiny
    inputs = model.prepare([photo, photo2], "<image> <image> " + PROMPT)
    assert inputs.extras["batch_num_images"].tolist() == [2]
    g = model.hf_model.config.vision_config.image_size // model.hf_model.config.vision_config.patch_size
    features = hf_image_features(model, reference, inputs)
    for span, feats in zip(inputs.layout.images[0], features):
        assert span.n_tokens == feats.shape[0] == g * g + 1
        assert span.tile_grids == {0: (g, g)} and span.labels[-1] == "<nl 0>"
    assert_matches_hf(model, reference, inputs)


def test_images_of_different_aspect_ratios_give_different_counts_batched_equals_unbatched(tiny, photo, photo2):
    model, _ = tiny
    batch, singles = batch_and_singles(model, [photo, photo2])
    counts = [batch.layout.images[row][0].n_tokens for row in range(2)]
    assert counts[0] != counts[1]
    assert_batched_equals_unbatched(model, batch, singles)
    for row, single in enumerate(singles):
        assert torch.equal(batch.layout.images[row][0].positions, single.layout.images[0][0].positions)
        assert torch.equal(batch.layout.images[row][0].tile, single.layout.images[0][0].tile)


def test_a_multi_image_row_beside_a_single_image_row_equals_hf_and_each_row_alone(tiny, photo, photo2):
    model, reference = tiny
    prompts = ["<image> <image> " + PROMPT, "describe the image ."]
    batch = model.prepare([[photo, photo2], photo2], prompts, answer=["a red circle .", "a cat"])
    assert batch.extras["batch_num_images"].tolist() == [2, 1]
    assert_matches_hf(model, reference, batch)
    singles = [
        model.prepare([photo, photo2], prompts[0], answer="a red circle ."),
        model.prepare(photo2, prompts[1], answer="a cat"),
    ]
    assert_batched_equals_unbatched(model, batch, singles)
    assert [s.n_tokens for s in batch.layout.images[1]] == [s.n_tokens for s in singles[1].layout.images[0]]


def test_greedy_generate_equals_hf(tiny, photo2):
    model, reference = tiny
    inputs = model.prepare(photo2, "describe the image .")
    assert_generate_matches_hf(model, reference, inputs, n=5)


def test_analyses_that_need_matching_tokens_refuse_rows_that_tile_differently(tiny, photo, photo2):
    """A token order shared by every row is undefined when the rows' images became different
    numbers of tokens: the error names the counts."""
    from vlens import analysis as va
    from vlens.errors import AnalysisInputError

    model, _ = tiny
    batch = model.prepare([photo, photo2], [PROMPT, "describe the image ."], answer=["a red circle .", "a cat"])
    n0, n1 = (batch.layout.images[row][0].n_tokens for row in range(2))
    assert n0 != n1
    with pytest.raises(AnalysisInputError, match=rf"not a permutation of 0\.\.{n1 - 1} \(row 1 has {n1} image tokens\)"):
        va.token_count_curve(model, batch, order=list(range(n0)))
