"""Idefics3 / SmolVLM parity: vlens equals Hugging Face's own Idefics3ForConditionalGeneration,
and the layout (crops in row-major order, then the global image) says where each token came from."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_photo
from tests.parity.helpers import (
    hooked_and_reference,
    batch_and_singles,
    assert_batched_equals_unbatched,
    assert_generate_matches_hf,
    assert_matches_hf,
)
from tests.tiny.idefics3 import build_idefics3


VARIANTS = {
    "idefics3": dict(image_size=56, patch=7, scale_factor=2),
    "smolvlm": dict(image_size=60, patch=7, scale_factor=4),  # 60 px is no whole number of patches
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny(request, tmp_path_factory):
    path = build_idefics3(tmp_path_factory.mktemp(request.param), **VARIANTS[request.param])
    return hooked_and_reference(path)


@pytest.fixture(scope="module")
def wide():
    return make_photo(width=90, height=30, seed=5)  # splits into 1 x 2 crops


def test_logits_hidden_states_and_patterns_equal_hf(tiny, photo):
    model, reference = tiny
    inputs = model.prepare(photo, "what is in the image ?", answer="a red circle .")
    assert inputs.pixel_values.shape[1] == 5  # 2 x 2 crops + the global image
    assert_matches_hf(model, reference, inputs)


def test_layout_positions_tiles_and_markers(tiny, photo):
    model, _ = tiny
    inputs = model.prepare(photo, "what is in the image ?")
    ids = inputs.input_ids[0]
    expected = (ids == model.hf_model.config.image_token_id).nonzero().flatten()
    (span,) = inputs.layout.images[0]
    assert torch.equal(span.positions, expected)
    config = model.hf_model.config
    g = config.vision_config.image_size // config.vision_config.patch_size // config.scale_factor
    assert span.tile_grids == {t: (g, g) for t in range(5)}
    for t in range(5):
        assert int((span.tile == t).sum()) == g * g
    # Each crop's run follows its <row_i_col_j> tag; the global image's follows <global-img>.
    tok = model.tokenizer.convert_ids_to_tokens
    starts = [int(span.positions[span.tile == t][0]) for t in range(5)]
    assert [tok(int(ids[s - 1])) for s in starts] == [
        "<global-img>", "<row_1_col_1>", "<row_1_col_2>", "<row_2_col_1>", "<row_2_col_2>"
    ]
    markers = inputs.layout.marker_mask[0]
    assert all(tok(int(i)) in {"<fake_token_around_image>", "<global-img>"} or tok(int(i)).startswith("<row_")
               for i in ids[markers])
    assert int(markers.sum()) == 5 + 5 + 1  # a tag per tile, a fake token before each tile and one closing
    assert span.labels[0] == "<t1 0,0>" and span.labels[-1] == f"<img {g - 1},{g - 1}>"


def test_layout_matches_the_features_hf_scatters(tiny, photo):
    """Independent of the layout: the token at (tile t, r, c) holds the connector's projection of
    the scale x scale block of patches at (r, c) of sub-image t (crops first, global last)."""
    model, reference = tiny
    inputs = model.prepare(photo, "what is in the image ?")
    (span,) = inputs.layout.images[0]
    seen = {}

    def grab(module, args, output):
        seen["x"] = args[0]

    handle = reference.model.connector.register_forward_hook(grab)
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
    n_sub = patches.shape[0]
    for k in range(len(span.positions)):
        t = int(span.tile[k])
        r, c = span.row_col[k].tolist()
        sub = n_sub - 1 if t == 0 else t - 1
        block = grid[sub, s * r : s * r + s, s * c : s * c + s]  # [s, s, d]
        with torch.no_grad():
            want = projection(block.reshape(-1))
        assert torch.allclose(embeds[k], want, atol=1e-5), f"token {k} ({span.labels[k]})"


def test_batched_equals_unbatched(tiny, photo, wide):
    model, _ = tiny
    batch, singles = batch_and_singles(model, [photo, wide])
    assert len(batch.layout.images[0][0].tile_grids) == 5 and len(batch.layout.images[1][0].tile_grids) == 3
    assert_batched_equals_unbatched(model, batch, singles)
    for row, single in enumerate(singles):
        assert torch.equal(batch.layout.images[row][0].positions, single.layout.images[0][0].positions)


def test_greedy_generate_equals_hf(tiny, wide):
    model, reference = tiny
    inputs = model.prepare(wide, "describe the image .")
    assert_generate_matches_hf(model, reference, inputs, n=5)


def test_two_images_in_one_row_equal_hf(tiny, photo, wide):
    model, reference = tiny
    inputs = model.prepare([wide, photo], "<image> what is in <image> the image ?")
    assert [len(s.tile_grids) for s in inputs.layout.images[0]] == [3, 5]
    assert_matches_hf(model, reference, inputs)
