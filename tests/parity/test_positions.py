"""The position facts of every family against Hugging Face's own forward.

``HookedVLM.input_embeddings`` returns the embeddings, positions and per-token inputs the
language model received; ``adapter.positions_after_removal`` numbers a shortened sequence.
The reference reads the positions its own forward computes (``analysis_refs``), never the
adapter's rule.
"""

from __future__ import annotations

import pytest
import torch

from tests.parity import analysis_refs as ref
from tests.parity.helpers import TOL, max_diff

PROMPTS = ["what is in the image ?", "describe the image ."]


@pytest.fixture(scope="module", params=list(ref.FAMILIES))
def tiny(request, tmp_path_factory):
    return ref.load_tiny(request.param, tmp_path_factory.mktemp(request.param))


def test_input_embeddings_carry_the_models_own_positions(tiny, photo, photo2):
    inputs = tiny.model.prepare([photo, photo2], PROMPTS, answer=["a red circle .", "a cat"])
    lm = tiny.model.input_embeddings(inputs)
    assert max_diff(lm.embeds, ref.merged_embeddings(tiny.reference, inputs)) <= TOL
    hf_positions = ref.full_positions(tiny, inputs)
    assert lm.position_ids.shape == hf_positions.shape  # [batch, pos], or [batch, axes, pos] (M-RoPE)
    assert hf_positions.shape[0] == inputs.batch_size and hf_positions.shape[-1] == inputs.input_ids.shape[1]
    real = inputs.attention_mask.bool()
    assert torch.equal(lm.position_ids.movedim(-1, 1)[real], hf_positions.movedim(-1, 1)[real])
    assert torch.equal(lm.attention_mask, inputs.attention_mask)
    assert sorted(lm.extras) == sorted(tiny.family.per_token)
    expected = ref.per_token_inputs(tiny, inputs)
    for name, value in lm.extras.items():
        assert max_diff(value, expected[name]) <= TOL, name


def test_positions_after_removal_equal_hfs_own_numbering(tiny, photo):
    inputs = tiny.model.prepare(photo, PROMPTS[0], answer="a red circle .")
    lm = tiny.model.input_embeddings(inputs)
    embeds = ref.merged_embeddings(tiny.reference, inputs)
    per_token = ref.per_token_inputs(tiny, inputs)
    n = int(inputs.attention_mask[0].sum())
    img = ref.image_positions(tiny.reference, inputs.input_ids)
    variants = {"first image token": img[:1], "every other image token": img[::2], "every image token": img}
    for label, removed in variants.items():
        keep = torch.ones(n, dtype=torch.bool)
        keep[removed] = False
        ours = tiny.model.adapter.positions_after_removal(lm.position_ids[0, ..., :n], keep)
        kept_per_token = {k: v[:, :n][:, keep] for k, v in per_token.items()}
        theirs = ref.reduced_positions(tiny, embeds[:, :n][:, keep], kept_per_token, inputs, keep.nonzero().flatten())
        assert torch.equal(ours, theirs[0]), label
        # The kv engine's suffix from the first removed position c on continues HF's numbering.
        c = int(removed[0])
        assert torch.equal(ours[..., c:], theirs[0, ..., c:]), label
