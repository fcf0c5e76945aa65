"""Attention knockout, activation patching and attribution patching equal independent
computations with plain PyTorch hooks on the Hugging Face reference model (eager attention):

* knockout: the reference's own eager attention with the blocked entries of its additive
  mask set to the most negative value, layer by layer, by a pre-hook on each ``self_attn``;
* patching: the clean run's decoder-layer input / ``self_attn`` output / ``mlp`` output at one
  position captured with forward hooks, and written into the corrupted run's (vision included);
* attribution: the gradient of the metric at the corrupted run's decoder-layer inputs, read
  with ``retain_grad`` on the reference.

Families: LLaVA (Llama), BLIP-2 (OPT, whose attention has no pre-softmax hook: the mask route),
InstructBLIP (Q-Former, Llama) and Gemma 3 (not causal over the image, per-token inputs).
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import make_photo
from tests.parity import analysis_refs as ref
from vlens.analysis._spans import grid_cells, predictor_positions
from vlens.analysis.flow_knockout import attention_knockout
from vlens.analysis.attribution import attribution_patching, rank_agreement, spearman
from vlens.analysis.patching import activation_patching
from vlens.errors import AnalysisInputError

TOL = 1e-4
PROMPT = "what is in the image ?"
ANSWER = "a red circle ."
FAMILIES = ["llava", "blip2", "instructblip", "gemma3", "paligemma", "mistral3", "qwen2_vl", "qwen3_vl"]
# Families whose attention hands no pre-softmax scores to a hook (BLIP-2's OPT; the Qwen-VL
# attention, Hugging Face's own module hooked after the fact): the eager mask is edited.
MASK_ROUTE = {"blip2", "qwen2_vl", "qwen3_vl"}


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    return ref.load_tiny(request.param, tmp_path_factory.mktemp(request.param))


# ---- the reference -----------------------------------------------------------------------


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def ref_answer_logprob(tiny, inputs, blocked: dict[int, torch.Tensor]) -> float:
    """The answer's summed log-probability from the reference with, in layer l, the additive
    mask of its eager attention at -max wherever ``blocked[l]`` ([pos, pos]) is True."""
    layers = ref.decoder_layers(tiny.reference, tiny.model.n_layers)
    handles = []
    for l, block in blocked.items():

        def pre(_m, args, kwargs, block=block):
            mask = kwargs["attention_mask"]
            q, k = mask.shape[-2], mask.shape[-1]
            kwargs["attention_mask"] = mask.masked_fill(block[:q, :k], torch.finfo(mask.dtype).min)
            return args, kwargs

        handles.append(layers[l].self_attn.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            logits = tiny.reference(**inputs.model_kwargs()).logits[0].float()
    finally:
        for h in handles:
            h.remove()
    answer = inputs.layout.answer_mask[0].nonzero().flatten()
    ids = inputs.input_ids[0, answer]
    return float(logits[answer - 1].log_softmax(-1).gather(1, ids[:, None]).sum())


def block_matrix(n: int, queries, keys) -> torch.Tensor:
    block = torch.zeros(n, n, dtype=torch.bool)
    block[torch.as_tensor(queries)[:, None], torch.as_tensor(keys)[None, :]] = True
    block.fill_diagonal_(False)
    return block


# ---- knockout ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def case(tiny, photo):
    return tiny.model.prepare(photo, PROMPT, answer=ANSWER)


@pytest.mark.parametrize("flow", [("predictor", "image"), ("instruction", "image"), ("image", "image")])
def test_knockout_equals_hand_masked_eager_attention(tiny, case, flow):
    query, key = flow
    L = tiny.model.n_layers
    windows = [(0, 1), (L - 1, 1), (0, L)]
    kv = attention_knockout(tiny.model, case, query, key, windows=windows, batch_size=2)
    naive = attention_knockout(tiny.model, case, query, key, windows=windows, engine="naive")
    layout = case.layout
    n = int(layout.lengths[0])
    queries = predictor_positions(layout)[:1] if query == "predictor" else layout.mask(query)[0, :n].nonzero().flatten()
    keys = layout.mask(key)[0, :n].nonzero().flatten()
    block = block_matrix(n, queries, keys)
    clean = ref_answer_logprob(tiny, case, {})
    assert abs(float(kv.clean_logprob[0]) - clean) <= TOL
    for i, (start, size) in enumerate(windows):
        expected = ref_answer_logprob(tiny, case, {l: block for l in range(start, start + size)})
        assert abs(float(kv.logprob[0, i]) - expected) <= TOL, (i, kv.logprob, expected)
        assert abs(float(naive.logprob[0, i]) - expected) <= TOL
    assert kv.engine == ("naive" if tiny.family.per_token else "kv"), kv.engine_reason
    # BLIP-2's OPT attention hands no pre-softmax scores to a hook: the eager mask is edited.
    assert kv.route == ("mask" if tiny.name in MASK_ROUTE else "scores")


def test_knockout_of_a_span_no_query_attends_to_changes_nothing(tiny, case):
    # Nothing before the answer sees the answer (causal, and Gemma 3's bidirectional block is the image's).
    result = attention_knockout(tiny.model, case, "image", "answer", sizes=(1, tiny.model.n_layers))
    assert int(result.n_blocked[0]) > 0
    assert float(result.delta_logprob.abs().max()) == 0.0


def test_knocking_out_every_key_leaves_a_query_its_own_position(tiny, photo):
    # A one-token answer: its log-probability is read at the predictor alone. With every key
    # but its own blocked in every layer, the predictor's state is that of the predictor
    # token run alone, at its own position.
    inputs = tiny.model.prepare(photo, PROMPT, answer="red")
    layout = inputs.layout
    if int(layout.answer_mask.sum()) != 1:
        pytest.skip(f"{tiny.name}'s processor adds tokens to the answer (an end-of-sequence suffix): not a one-token answer")
    q = int(predictor_positions(layout)[0])
    result = attention_knockout(tiny.model, inputs, "predictor", "real", windows=[(0, tiny.model.n_layers)])
    embeds = ref.merged_embeddings(tiny.reference, inputs)
    with torch.no_grad():
        logits = ref.lm_target(tiny)(
            inputs_embeds=embeds[:, q : q + 1], position_ids=torch.tensor([[q]]), attention_mask=torch.ones(1, 1, dtype=torch.long)
        ).logits[0, 0].float()
    answer_id = int(inputs.input_ids[0, q + 1])
    expected = float(logits.log_softmax(-1)[answer_id])
    assert abs(float(result.logprob[0, 0]) - expected) <= TOL, (result.logprob, expected)
    assert abs(float(result.logprob[0, 0]) - float(result.clean_logprob[0])) > 1e-3  # the knockout did something


def test_grid_cells_pick_the_tokens_on_those_cells(llava_model, photo):
    inputs = llava_model.prepare(photo, PROMPT, answer=ANSWER)
    span = inputs.layout.images[0][0]
    mask = grid_cells(inputs.layout, [(0, 0), (1, 2)])
    picked = mask[0].nonzero().flatten().tolist()
    rows, cols = span.grid
    on = span.positions[span.on_grid]
    assert picked == sorted([int(on[0]), int(on[1 * cols + 2])])
    with pytest.raises(AnalysisInputError, match="off image 0"):
        grid_cells(inputs.layout, [(rows, 0)])


# ---- patching ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tiny, photo):
    clean = tiny.model.prepare(photo, PROMPT, answer=ANSWER)
    corrupted = tiny.model.prepare(make_photo(seed=7), PROMPT, answer=ANSWER)  # same size, other content
    return clean, corrupted


def _module_for(tiny, kind: str, layer: int) -> torch.nn.Module:
    block = ref.decoder_layers(tiny.reference, tiny.model.n_layers)[layer]
    return block if kind == "resid_pre" else block.self_attn if kind == "attn_out" else block.mlp


def _grab(kind: str, store: dict, pos: int):
    if kind == "resid_pre":
        def pre(_m, args, kwargs):
            store["v"] = _hidden(args, kwargs)[0, pos].clone()
        return pre

    def post(_m, _args, out):
        t = out[0] if isinstance(out, tuple) else out
        store["v"] = t[0, pos].clone()
    return post


def _write(kind: str, value: torch.Tensor, pos: int):
    if kind == "resid_pre":
        def pre(_m, args, kwargs):
            h = _hidden(args, kwargs).clone()
            h[0, pos] = value
            if args:
                return (h, *args[1:]), kwargs
            kwargs["hidden_states"] = h
            return args, kwargs
        return pre

    def post(_m, _args, out):
        t = (out[0] if isinstance(out, tuple) else out).clone()
        t[0, pos] = value
        return (t, *out[1:]) if isinstance(out, tuple) else t
    return post


def ref_patched_logits(tiny, clean, corrupted, kind: str, layer: int, pos: int) -> torch.Tensor:
    """The reference's corrupted logits at the predictor with one clean activation written in."""
    module = _module_for(tiny, kind, layer)
    store: dict = {}
    register = module.register_forward_pre_hook if kind == "resid_pre" else module.register_forward_hook
    extra = {"with_kwargs": True} if kind == "resid_pre" else {}
    handle = register(_grab(kind, store, pos), **extra)
    with torch.no_grad():
        tiny.reference(**clean.model_kwargs())
    handle.remove()
    handle = register(_write(kind, store["v"], pos), **extra)
    with torch.no_grad():
        logits = tiny.reference(**corrupted.model_kwargs()).logits[0].float()
    handle.remove()
    return logits[int(predictor_positions(corrupted.layout)[0])]


PATCH_FAMILIES = {"llava", "instructblip", "gemma3", "paligemma", "mistral3", "qwen2_vl", "qwen3_vl"}  # BLIP-2's OPT layer has no mlp module to hook by hand


def test_patching_equals_swapping_activations_by_hand(tiny, pair):
    if tiny.name not in PATCH_FAMILIES:
        pytest.skip("OPT's decoder layer runs its MLP inline (fc1/fc2, no mlp module); the other families cover it")
    clean, corrupted = pair
    foil = 5
    result = activation_patching(tiny.model, clean, corrupted, foil=foil, batch_size=7)
    naive = activation_patching(tiny.model, clean, corrupted, foil=foil, engine="naive")
    assert (result.logit_diff - naive.logit_diff).abs().max() <= TOL
    target = int(result.target[0])
    positions = result.row(0).positions.tolist()
    rng = random.Random(0)
    cases = [(k, l, i) for k in range(3) for l in range(len(result.layers)) for i in range(len(positions))]
    for k, l, i in rng.sample(cases, 10):
        logits = ref_patched_logits(tiny, clean, corrupted, result.kinds[k], int(result.layers[l]), positions[i])
        assert abs(float(result.logit_diff[0, k, l, i]) - float(logits[target] - logits[foil])) <= TOL
        assert abs(float(result.prob[0, k, l, i]) - float(logits.softmax(-1)[target])) <= TOL
    # Patching the whole residual stream at the first layer turns the corrupted run into the clean one.
    with torch.no_grad():
        clean_logits = tiny.reference(**clean.model_kwargs()).logits[0, int(result.predictor[0])].float()
    assert abs(float(result.clean_logit_diff[0]) - float(clean_logits[target] - clean_logits[foil])) <= TOL


def test_patching_the_input_with_itself_changes_nothing(tiny, pair):
    clean, _ = pair
    result = activation_patching(tiny.model, clean, clean, foil=5, kinds=["resid_pre"])
    assert (result.logit_diff - result.corrupted_logit_diff).abs().max() <= 1e-5


def test_attribution_equals_a_hand_gradient(tiny, pair):
    clean, corrupted = pair
    foil = 5
    attribution = attribution_patching(tiny.model, clean, corrupted, foil=foil, kinds=["resid_pre"])
    layers = ref.decoder_layers(tiny.reference, tiny.model.n_layers)
    positions = attribution.row(0).positions
    predictor = int(predictor_positions(corrupted.layout)[0])
    target = int(attribution.target[0])
    for l in range(tiny.model.n_layers):
        store: dict = {}

        def grab(_m, args, kwargs):
            store["h"] = _hidden(args, kwargs)
            if store["h"].requires_grad:
                store["h"].retain_grad()

        handle = layers[l].register_forward_pre_hook(grab, with_kwargs=True)
        with torch.no_grad():
            tiny.reference(**clean.model_kwargs())
        clean_h = store["h"][0].detach()
        with torch.enable_grad():
            logits = tiny.reference(**corrupted.model_kwargs()).logits[0, predictor].float()
            (logits[target] - logits[foil]).backward()
        handle.remove()
        tiny.reference.zero_grad(set_to_none=True)
        corr_h, grad = store["h"][0].detach(), store["h"].grad[0]
        expected = ((clean_h - corr_h) * grad).sum(-1)[positions]
        assert (attribution.estimate[0, 0, l, : len(positions)] - expected).abs().max() <= TOL, l


def test_rank_agreement_is_measured(llava_model, photo):
    clean = llava_model.prepare(photo, PROMPT, answer=ANSWER)
    corrupted = llava_model.prepare(make_photo(seed=7), PROMPT, answer=ANSWER)
    exact = activation_patching(llava_model, clean, corrupted, foil=5, positions="real")
    estimate = attribution_patching(llava_model, clean, corrupted, foil=5, positions="real")
    rho = rank_agreement(estimate, exact)
    assert rho.shape == (1, 3) and bool(torch.isfinite(rho).all())
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 30.0, 20.0])) == pytest.approx(0.5)
    assert spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 2.0])) == pytest.approx(1.0)


def test_patching_refuses_inputs_tokenised_differently(llava_model, photo):
    clean = llava_model.prepare(photo, PROMPT, answer=ANSWER)
    other = llava_model.prepare(photo, "describe the image .", answer=ANSWER)
    with pytest.raises(AnalysisInputError, match="tokenised differently.*same number of tokens"):
        activation_patching(llava_model, clean, other, foil=5)
    with pytest.raises(AnalysisInputError, match="unknown activation kind"):
        activation_patching(llava_model, clean, clean, foil=5, kinds=["resid_post"])


def test_patching_refuses_images_tiled_differently(tmp_path_factory, photo, photo2):
    # LLaVA-NeXT picks its tile grid from the aspect ratio: a wide and a tall image tokenise differently.
    tiny = ref.load_tiny("llava_next", tmp_path_factory.mktemp("llava_next"))
    clean = tiny.model.prepare(photo, PROMPT, answer=ANSWER)
    corrupted = tiny.model.prepare(photo2, PROMPT, answer=ANSWER)
    with pytest.raises(AnalysisInputError, match="tokenised differently.*same size and aspect ratio"):
        activation_patching(tiny.model, clean, corrupted, foil=5)
    same_size = tiny.model.prepare(make_photo(seed=7), PROMPT, answer=ANSWER)  # aligned: runs
    assert activation_patching(tiny.model, clean, same_size, foil=5, kinds=["resid_pre"], layers=[0]).logit_diff.shape[:3] == (1, 1, 1)
