"""LLaVA-NeXT parity: vlens equals Hugging Face's own LlavaNextForConditionalGeneration,
and the anyres layout (base grid, unpadded tiles, newlines) says where each token came from."""

from __future__ import annotations

import pytest
import torch

from tests.parity.helpers import (
    hooked_and_reference,
    batch_and_singles,
    assert_batched_equals_unbatched,
    assert_generate_matches_hf,
    assert_matches_hf,
)
from tests.tiny.llava_next import build_llava_next


@pytest.fixture(scope="module", params=["clip", "siglip"])
def tiny(request, tmp_path_factory):
    path = build_llava_next(tmp_path_factory.mktemp(f"llava_next_{request.param}"), tower=request.param)
    return hooked_and_reference(path)


def test_logits_hidden_states_and_patterns_equal_hf(tiny, photo):
    model, reference = tiny
    inputs = model.prepare(photo, "what is in the image ?", answer="a red circle .")
    assert inputs.pixel_values.shape[1] >= 3  # base image + at least 2 tiles
    assert_matches_hf(model, reference, inputs)


def test_layout_positions_tiles_and_newlines(tiny, photo):
    model, _ = tiny
    inputs = model.prepare(photo, "what is in the image ?")
    config = model.hf_model.config
    expected = (inputs.input_ids[0] == config.image_token_id).nonzero().flatten()
    (span,) = inputs.layout.images[0]
    assert torch.equal(span.positions, expected)
    g = config.vision_config.image_size // config.vision_config.patch_size
    assert span.grid == (g, g)
    assert torch.equal(span.tile[: g * g], torch.zeros(g * g, dtype=torch.long))  # base image first
    n_crops = inputs.pixel_values.shape[1] - 1
    assert sorted(span.tile_grids) == list(range(n_crops + 1))
    for t, (rows, cols) in span.tile_grids.items():
        mine = span.tile == t
        assert int(mine.sum()) == rows * cols, f"tile {t}"
        rc = span.row_col[mine]
        assert rc[:, 0].max() == rows - 1 and rc[:, 1].max() == cols - 1
    # Unpadding dropped patch rows of the 61 x 43 photo: fewer canvas rows than 2 tiles of g.
    newline = span.tile == -1
    canvas_tokens = int((span.tile > 0).sum())
    n_rows = int(newline.sum())
    assert n_rows < 2 * g and canvas_tokens % n_rows == 0
    # Each canvas row ends in a newline token.
    ends = torch.nonzero(newline).flatten()
    row_len = canvas_tokens // n_rows + 1
    assert torch.equal(ends, g * g + row_len - 1 + row_len * torch.arange(n_rows))
    assert span.labels[0] == "<img 0,0>" and span.labels[int(ends[0])] == "<nl 0>"


def test_layout_matches_the_features_hf_scatters(tiny, photo):
    """Independent of the layout arithmetic: newline positions hold ``image_newline``; each
    tile's tokens are a contiguous block of that crop's projected patch grid."""
    model, reference = tiny
    inputs = model.prepare(photo, "what is in the image ?")
    (span,) = inputs.layout.images[0]
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter="blocks.0.hook_resid_pre")
        embeds = cache["blocks.0.hook_resid_pre"][0, span.positions]
        core = reference.model
        crops = inputs.pixel_values[0]
        hidden = core.vision_tower(crops, output_hidden_states=True).hidden_states[-2]
        if model.hf_model.config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]  # drop CLS
        feats = core.multi_modal_projector(hidden)  # [1 + tiles, g*g, d]
    g = model.hf_model.config.vision_config.image_size // model.hf_model.config.vision_config.patch_size
    newline = span.tile == -1
    assert torch.allclose(embeds[newline], core.image_newline.expand(int(newline.sum()), -1), atol=1e-6)
    assert not torch.allclose(embeds[~newline][:1], core.image_newline[None], atol=1e-3)
    for t, (rows, cols) in span.tile_grids.items():
        grid = feats[t].reshape(g, g, -1)
        mine = embeds[span.tile == t]
        rc = span.row_col[span.tile == t]
        offsets = [
            (r0, c0)
            for r0 in range(g - rows + 1)
            for c0 in range(g - cols + 1)
            if torch.allclose(mine, grid[rc[:, 0] + r0, rc[:, 1] + c0], atol=1e-5)
        ]
        assert len(offsets) == 1, f"tile {t}: its tokens are no block of crop {t}'s features"


def test_batched_equals_unbatched(tiny, photo, photo2):
    model, _ = tiny
    batch, singles = batch_and_singles(model, [photo, photo2])
    # The two images unpad differently (rows dropped vs columns dropped).
    assert batch.layout.images[0][0].tile_grids[1] != batch.layout.images[1][0].tile_grids[1]
    assert_batched_equals_unbatched(model, batch, singles)
    for row, single in enumerate(singles):
        assert torch.equal(batch.layout.images[row][0].positions, single.layout.images[0][0].positions)
        assert torch.equal(batch.layout.images[row][0].tile, single.layout.images[0][0].tile)


def test_greedy_generate_equals_hf(tiny, photo2):
    model, reference = tiny
    inputs = model.prepare(photo2, "describe the image .")
    assert_generate_matches_hf(model, reference, inputs, n=5)


def test_two_adjacent_images_in_one_row_equal_hf(tiny, photo, photo2):
    model, reference = tiny
    inputs = model.prepare([photo, photo2], "<image> <image> what is in the image ?")
    first, second = inputs.layout.images[0]
    assert int(second.positions[0]) == int(first.positions[-1]) + 1  # one run of placeholders, split by counts
    assert_matches_hf(model, reference, inputs)
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter="blocks.0.hook_resid_pre")
    embeds = cache["blocks.0.hook_resid_pre"][0]
    newline = model.hf_model.model.image_newline
    for span in (first, second):
        at_newlines = embeds[span.positions[span.tile == -1]]
        assert torch.allclose(at_newlines, newline.expand_as(at_newlines), atol=1e-6)
