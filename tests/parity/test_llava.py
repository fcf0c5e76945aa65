"""LLaVA-1.5 parity: vlens equals Hugging Face's own LlavaForConditionalGeneration."""

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
from tests.tiny.llava import build_llava

VARIANTS = {
    "clip-gqa": dict(tower="clip", n_kv_heads=2),
    "clip-mha": dict(tower="clip", n_kv_heads=4),
    "siglip": dict(tower="siglip", n_kv_heads=2),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny(request, tmp_path_factory):
    path = build_llava(tmp_path_factory.mktemp(request.param), **VARIANTS[request.param])
    return hooked_and_reference(path)


def test_logits_hidden_states_and_patterns_equal_hf(tiny, photo):
    model, reference = tiny
    inputs = model.prepare(photo, "what is in the image ?", answer="a red circle .")
    assert_matches_hf(model, reference, inputs)


def test_layout_positions_are_the_image_token_positions(tiny, photo):
    model, _ = tiny
    inputs = model.prepare(photo, "what is in the image ?")
    expected = (inputs.input_ids[0] == model.hf_model.config.image_token_id).nonzero().flatten()
    span = inputs.layout.images[0][0]
    assert torch.equal(span.positions, expected)
    rows, cols = span.grid
    vision = model.hf_model.config.vision_config
    assert (rows, cols) == (vision.image_size // vision.patch_size,) * 2
    # Raster order: token k sits at (k // cols, k % cols).
    k = torch.arange(rows * cols)
    assert torch.equal(span.row_col, torch.stack([k // cols, k % cols], 1))


def test_batched_equals_unbatched(tiny, photo, photo2):
    model, _ = tiny
    batch, singles = batch_and_singles(model, [photo, photo2])
    assert_batched_equals_unbatched(model, batch, singles)


def test_batched_cache_equals_unbatched(tiny, photo, photo2):
    model, _ = tiny
    batch = model.prepare([photo, photo2], ["what is in the image ?", "what"])
    single = model.prepare(photo2, "what")
    with torch.no_grad():
        _, cache_b = model.run_with_cache(batch, names_filter="blocks.*.hook_resid_post")
        _, cache_s = model.run_with_cache(single, names_filter="blocks.*.hook_resid_post")
    n = int(single.attention_mask.sum())
    for layer in range(model.n_layers):
        name = f"blocks.{layer}.hook_resid_post"
        assert float((cache_b[name][1, :n] - cache_s[name][0, :n]).abs().max()) <= 1e-4


def test_greedy_generate_equals_hf(tiny, photo):
    model, reference = tiny
    inputs = model.prepare(photo, "describe the image .")
    assert_generate_matches_hf(model, reference, inputs)


def test_generate_ignores_the_answer_and_batches_row_by_row(tiny, photo, photo2):
    model, _ = tiny
    alone = model.generate(model.prepare(photo2, "what"), max_new_tokens=4)
    batch = model.generate(
        model.prepare([photo, photo2], ["describe the image .", "what"], answer=["a cat", "a dog"]), max_new_tokens=4
    )
    assert torch.equal(batch.tokens[1], alone.tokens[0])


def test_two_adjacent_images_in_one_row_equal_hf(tiny, photo, photo2):
    model, reference = tiny
    inputs = model.prepare([photo, photo2], "<image><image> what is in the image ?")
    spans = inputs.layout.images[0]
    assert len(spans) == 2 and int(spans[1].positions[0]) == int(spans[0].positions[-1]) + 1
    assert_matches_hf(model, reference, inputs)
