"""Gemma3 parity: vlens equals Hugging Face's own Gemma3ForConditionalGeneration (which needs
``token_type_ids``), and the layout's grid is the projector's pooled grid."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_photo
from tests.parity.helpers import (
    hooked_and_reference,
    assert_batched_equals_unbatched,
    assert_generate_matches_hf,
    assert_matches_hf,
    max_diff,
)
from tests.tiny.gemma3 import build_gemma3

TWO_IMAGES = "compare <start_of_image> and <start_of_image> ."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_gemma3(tmp_path_factory.mktemp("gemma3"))
    return hooked_and_reference(path)


def test_logits_hidden_states_and_patterns_equal_hf(tiny, photo):
    model, reference = tiny
    inputs = model.prepare(photo, "what is in the image ?", answer="a red circle on the left .")
    # The prompt is longer than the sliding window, so local layers really mask.
    assert inputs.input_ids.shape[1] > model.hf_model.config.text_config.sliding_window
    assert_matches_hf(model, reference, inputs)


def test_token_type_ids_matter_and_vlens_passes_them(tiny, photo):
    model, reference = tiny
    inputs = model.prepare(photo, "what is in the image ?")
    ids = inputs.input_ids
    assert torch.equal(inputs.extras["token_type_ids"], (ids == model.hf_model.config.image_token_id).long())
    kwargs = inputs.model_kwargs()
    without = {k: v for k, v in kwargs.items() if k != "token_type_ids"}
    with torch.no_grad():
        hf_with = reference(**kwargs).logits
        hf_without = reference(**without).logits
        ours, cache = model.run_with_cache(inputs, names_filter="blocks.0.attn.hook_pattern")
    assert max_diff(hf_with, hf_without) > 1e-3, "token_type_ids should change HF's logits"
    assert max_diff(ours, hf_with) <= 1e-4
    assert max_diff(ours, hf_without) > 1e-3
    # Bidirectional inside the image: the first image token attends to the image tokens after it.
    positions = inputs.layout.images[0][0].positions
    pattern = cache["blocks.0.attn.hook_pattern"][0]
    assert float(pattern[:, positions[0], positions[1:]].sum(-1).min()) > 0
    first_text_after = int(positions[-1]) + 2  # past <end_of_image>
    assert float(pattern[:, positions[0], first_text_after:].abs().max()) == 0.0


def test_layout_positions_grid_and_markers(tiny, photo, photo2):
    model, _ = tiny
    inputs = model.prepare([photo, photo2], TWO_IMAGES)
    config = model.hf_model.config
    ids = inputs.input_ids[0]
    expected = (ids == config.image_token_id).nonzero().flatten()
    spans = inputs.layout.images[0]
    assert len(spans) == 2
    assert torch.equal(torch.cat([s.positions for s in spans]), expected)
    side = int(config.mm_tokens_per_image**0.5)
    for span in spans:
        assert span.grid == (side, side) and span.n_tokens == config.mm_tokens_per_image
        assert int(ids[span.positions[0] - 1]) == config.boi_token_id
        assert int(ids[span.positions[-1] + 1]) == config.eoi_token_id
    markers = inputs.layout.marker_mask[0]
    assert set(ids[markers].tolist()) == {config.boi_token_id, config.eoi_token_id} and int(markers.sum()) == 4


def test_layout_matches_the_features_hf_scatters(tiny, photo):
    """Independent of the layout: the token at (r, c) is the projector's RMS-normed,
    projected mean of the k x k patch block at (r, c) of the tower's output."""
    model, reference = tiny
    inputs = model.prepare(photo, "what is in the image ?")
    (span,) = inputs.layout.images[0]
    seen = {}

    def grab(module, args, output):
        seen["x"] = args[0]

    projector = reference.model.multi_modal_projector
    handle = projector.register_forward_hook(grab)
    try:
        with torch.no_grad():
            reference(**inputs.model_kwargs())
            _, cache = model.run_with_cache(inputs, names_filter="blocks.0.hook_resid_pre")
    finally:
        handle.remove()
    patches = seen["x"][0]  # [p*p, d_vision]
    p = int(patches.shape[0] ** 0.5)
    k = p // span.grid[0]
    grid = patches.reshape(p, p, -1)
    embeds = cache["blocks.0.hook_resid_pre"][0, span.positions]
    for idx, (r, c) in enumerate(span.row_col.tolist()):
        with torch.no_grad():
            pooled = grid[k * r : k * r + k, k * c : k * c + k].reshape(-1, grid.shape[-1]).mean(0)
            want = projector.mm_soft_emb_norm(pooled) @ projector.mm_input_projection_weight
        assert torch.allclose(embeds[idx], want, atol=1e-5), f"token {idx} ({span.labels[idx]})"


def test_batched_equals_unbatched(tiny, photo, photo2):
    model, _ = tiny
    wide = make_photo(width=90, height=30, seed=5)
    images = [photo, [photo2, wide]]
    prompts = ["what is in the image ?", TWO_IMAGES]
    answers = ["a red circle .", "a big blue square on the left ."]
    batch = model.prepare(images, prompts, answer=answers)
    singles = [model.prepare(img, p, answer=a) for img, p, a in zip(images, prompts, answers)]
    assert batch.attention_mask[1].sum() != batch.attention_mask[0].sum()
    assert [len(r) for r in batch.layout.images] == [1, 2]
    assert_batched_equals_unbatched(model, batch, singles)


def test_greedy_generate_equals_hf(tiny, photo2):
    model, reference = tiny
    inputs = model.prepare(photo2, "describe the image .")
    assert_generate_matches_hf(model, reference, inputs, n=5)


def test_two_images_in_one_row_equal_hf(tiny, photo, photo2):
    model, reference = tiny
    inputs = model.prepare([photo, photo2], TWO_IMAGES, answer="a red circle .")
    assert len(inputs.layout.images[0]) == 2
    assert_matches_hf(model, reference, inputs)
