"""InstructBLIP (Llama tower) parity: vlens equals Hugging Face's own
InstructBlipForConditionalGeneration at every stage, with the Q-Former reading the
instruction (``qformer_input_ids``) beside its queries."""

from __future__ import annotations

import pytest
import torch

from tests.parity.blip_checks import (
    assert_every_stage_matches_hf,
    assert_language_model_alone_matches,
    claimed_hook_names,
)
from tests.parity.helpers import hooked_and_reference, batch_and_singles, assert_batched_equals_unbatched, assert_generate_matches_hf
from tests.tiny.blip import build_instructblip
from vlens import HookedVLM

VARIANTS = {"gqa": dict(n_kv_heads=2), "mha": dict(n_kv_heads=4)}


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny(request, tmp_path_factory):
    path = build_instructblip(tmp_path_factory.mktemp(f"instructblip-{request.param}"), **VARIANTS[request.param])
    return hooked_and_reference(path)


def test_every_stage_equals_hf(tiny, photo):
    model, reference = tiny
    inputs = model.prepare(photo, "what is in the image ?", answer="a red circle .")
    assert set(inputs.extras) == {"qformer_input_ids", "qformer_attention_mask"}
    assert_every_stage_matches_hf(model, reference, inputs)


def test_every_claimed_hook_fires(tiny, photo):
    model, _ = tiny
    extra = ("qformer.embeddings.hook_out", "qformer.layers.{q}.mlp_text.hook_out", "qformer.layers.{q}.ln2_text.hook_out")
    names = claimed_hook_names(model, extra=extra)
    with torch.no_grad():
        _, cache = model.run_with_cache(model.prepare(photo, "what is in the image ?"), names_filter=names)
    assert all(name in cache for name in names)


def test_qformer_sees_the_prompt_not_the_answer(tiny, photo):
    model, _ = tiny
    with_answer = model.prepare(photo, "what is in the image ?", answer="a red circle .")
    without = model.prepare(photo, "what is in the image ?")
    for name in ("qformer_input_ids", "qformer_attention_mask"):
        assert torch.equal(with_answer.extras[name], without.extras[name])
    n_query = model.hf_model.config.num_query_tokens
    with torch.no_grad():
        _, a = model.run_with_cache(with_answer, names_filter="vision_projector.hook_out")
        _, b = model.run_with_cache(without, names_filter="vision_projector.hook_out")
    assert torch.equal(a["vision_projector.hook_out"], b["vision_projector.hook_out"])
    assert a["vision_projector.hook_out"].shape[1] == n_query
    assert with_answer.layout.images[0][0].connector_text == "what is in the image ?"


def test_visual_tokens_depend_on_the_instruction(tiny, photo):
    model, _ = tiny
    with torch.no_grad():
        _, a = model.run_with_cache(model.prepare(photo, "what is in the image ?"), names_filter="vision_projector.hook_out")
        _, b = model.run_with_cache(model.prepare(photo, "describe the image ."), names_filter="vision_projector.hook_out")
    assert float((a["vision_projector.hook_out"] - b["vision_projector.hook_out"]).abs().max()) > 1e-4


def test_batched_equals_unbatched(tiny, photo, photo2):
    model, _ = tiny
    batch, singles = batch_and_singles(model, [photo, photo2])
    assert_batched_equals_unbatched(model, batch, singles)


def test_batched_instruction_padding_leaves_visual_tokens_unchanged(tiny, photo, photo2):
    model, _ = tiny
    batch = model.prepare([photo, photo2], ["what is in the image ?", "what"])
    single = model.prepare(photo2, "what")
    assert batch.extras["qformer_attention_mask"][1].sum() < batch.extras["qformer_attention_mask"].shape[1]
    with torch.no_grad():
        _, cache_b = model.run_with_cache(batch, names_filter="vision_projector.hook_out")
        _, cache_s = model.run_with_cache(single, names_filter="vision_projector.hook_out")
    diff = float((cache_b["vision_projector.hook_out"][1] - cache_s["vision_projector.hook_out"][0]).abs().max())
    assert diff <= 1e-4


def test_greedy_generate_equals_hf(tiny, photo):
    model, reference = tiny
    assert_generate_matches_hf(model, reference, model.prepare(photo, "describe the image ."))


def test_language_model_alone_on_input_embeddings(tiny, photo):
    model, _ = tiny
    assert_language_model_alone_matches(model, model.prepare(photo, "what is in the image ?", answer="a cat"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_equals_hf_at_the_same_dtype(tiny, photo, dtype):
    model, _ = tiny
    half = HookedVLM.from_pretrained(model.name, device="cpu", dtype=dtype)
    reference = type(model.hf_model).from_pretrained(model.name, dtype=dtype, attn_implementation="eager").eval()
    inputs = half.prepare(photo, "what is in the image ?", answer="a cat")
    with torch.no_grad():
        got = half(inputs)
        expected = reference(**inputs.to("cpu", dtype=dtype).model_kwargs()).logits
    assert got.dtype == dtype and float((got.float() - expected.float()).abs().max()) == 0.0
    assert inputs.layout.images[0][0].query_attention.dtype == torch.float32
