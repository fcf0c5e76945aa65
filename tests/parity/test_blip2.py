"""BLIP-2 (OPT tower) parity: vlens equals Hugging Face's own Blip2ForConditionalGeneration
at every stage: vision encoder, Q-Former, language projection, language model."""

from __future__ import annotations

import pytest
import torch

from tests.parity.blip_checks import (
    assert_every_stage_matches_hf,
    assert_language_model_alone_matches,
    claimed_hook_names,
)
from tests.parity.helpers import hooked_and_reference, batch_and_singles, assert_batched_equals_unbatched, assert_generate_matches_hf
from tests.tiny.blip import build_blip2
from vlens import HookedVLM


# "cross2": as released BLIP-2 checkpoints, cross-attention on every 2nd Q-Former layer.
VARIANTS = {"cross1": dict(), "cross2": dict(qformer_layers=3, cross_every=2)}


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny(request, tmp_path_factory):
    path = build_blip2(tmp_path_factory.mktemp(f"blip2-{request.param}"), **VARIANTS[request.param])
    return hooked_and_reference(path)


def test_every_stage_equals_hf(tiny, photo):
    model, reference = tiny
    inputs = model.prepare(photo, "what is in the image ?", answer="a red circle .")
    diffs = assert_every_stage_matches_hf(model, reference, inputs)
    assert diffs["logits"] <= 1e-4


def test_language_tower_is_opt_with_tl_names(tiny):
    model, _ = tiny
    assert type(model.hf_model.language_model).__name__ == "OPTForCausalLM"
    assert model.n_layers == model.hf_model.config.text_config.num_hidden_layers
    assert set(model.hook_names("qformer")) and set(model.hook_names("vision")) and set(model.hook_names("connector"))


def test_every_claimed_hook_fires(tiny, photo):
    model, _ = tiny
    names = claimed_hook_names(model, extra=("hook_pos_embed",))
    with torch.no_grad():
        _, cache = model.run_with_cache(model.prepare(photo, "what is in the image ?"), names_filter=names)
    assert all(name in cache for name in names)  # run_with_cache raises if an explicit name does not fire


def test_query_state_edit_flows_downstream(tiny, photo):
    model, _ = tiny
    inputs = model.prepare(photo, "what is in the image ?")
    with torch.no_grad():
        clean = model(inputs)
        edited = model.run_with_hooks(
            inputs, fwd_hooks=[("qformer.layers.0.hook_query_states", lambda t, hook: torch.zeros_like(t))]
        )
    assert float((clean - edited).abs().max()) > 1e-3


def test_batched_equals_unbatched(tiny, photo, photo2):
    model, _ = tiny
    batch, singles = batch_and_singles(model, [photo, photo2])
    assert_batched_equals_unbatched(model, batch, singles)
    for row, single in enumerate(singles):
        assert torch.allclose(
            batch.layout.images[row][0].query_attention, single.layout.images[0][0].query_attention, atol=1e-6
        )


def test_greedy_generate_equals_hf(tiny, photo):
    model, reference = tiny
    assert_generate_matches_hf(model, reference, model.prepare(photo, "describe the image ."))


def test_language_model_alone_on_input_embeddings(tiny, photo):
    model, _ = tiny
    assert_language_model_alone_matches(model, model.prepare(photo, "what is in the image ?", answer="a cat"))


def test_weight_processing_keeps_log_probs(tiny, photo):
    model, _ = tiny
    processed = HookedVLM.from_pretrained(model.name, device="cpu", process_weights=True)
    inputs = model.prepare(photo, "what is in the image ?")
    with torch.no_grad():
        diff = (model(inputs).log_softmax(-1) - processed(inputs).log_softmax(-1)).abs().max()
    assert float(diff) <= 1e-4


def test_attention_scores_are_pre_softmax_and_pattern_edits_take_effect(tiny, photo):
    import warnings

    model, _ = tiny
    inputs = model.prepare(photo, "what is in the image ?")
    names = [
        "qformer.layers.0.cross_attn.hook_attn_scores", "qformer.layers.0.cross_attn.hook_pattern",
        "vision_encoder.encoder_layers.0.attn.hook_attn_scores", "vision_encoder.encoder_layers.0.attn.hook_pattern",
    ]
    with torch.no_grad():
        clean, cache = model.run_with_cache(inputs, names_filter=names)
    for stage in ("qformer.layers.0.cross_attn", "vision_encoder.encoder_layers.0.attn"):
        scores, pattern = cache[f"{stage}.hook_attn_scores"], cache[f"{stage}.hook_pattern"]
        assert torch.allclose(scores.softmax(-1), pattern, atol=1e-6) and not torch.allclose(scores, pattern)

    def look_at_patch_one(pattern, hook):  # every query attends to the first patch only
        edited = torch.zeros_like(pattern)
        edited[..., 1] = 1.0
        return edited

    for name in ("qformer.layers.0.cross_attn.hook_pattern", "vision_encoder.encoder_layers.0.attn.hook_pattern"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # TransformerLens warns when a pattern edit is discarded
            with torch.no_grad():
                edited = model.run_with_hooks(inputs, fwd_hooks=[(name, look_at_patch_one)])
        assert float((edited - clean).abs().max()) > 1e-3, name
