"""contextual_lens equals a brute-force cosine over the whole bank, computed from the Hugging Face
reference's own hidden states of the image input and of each context run alone."""

from __future__ import annotations

import pytest
import torch

from tests.parity import analysis_refs as ref
from vlens import analysis as va
from vlens.analysis.contextual import BankChunk, NearestStates
from vlens.errors import AnalysisInputError

TOL = 1e-4
PROMPT = "what is in the image ?"
CONTEXTS = ["a red circle .", "a big blue square on the left .", "what is in the image ?", "a small green circle ."]
FAMILIES = ["llava", "gemma3", "blip2", "instructblip", "qwen2_vl", "qwen3_vl"]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    return ref.load_tiny(request.param, tmp_path_factory.mktemp(request.param))


def _context_states(tiny, ids):
    """The reference's residual stream of one context run alone (index l: input of layer l; the
    last taken before the final norm), ``[n_layers + 1, pos, d]``."""
    n_layers = tiny.model.n_layers
    captured = {}

    def grab(_m, _args, out):
        captured["last"] = (out[0] if isinstance(out, tuple) else out).detach()

    handle = ref.decoder_layers(tiny.reference, n_layers)[-1].register_forward_hook(grab)
    try:
        with torch.no_grad():
            embeds = tiny.reference.get_input_embeddings()(torch.tensor([ids]))
            out = ref.lm_target(tiny)(inputs_embeds=embeds, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      output_hidden_states=True)
    finally:
        handle.remove()
    hidden = list(out.hidden_states[:-1]) + [captured["last"]]
    return torch.stack([h[0].float() for h in hidden])


def test_contextual_lens_equals_brute_force_cosine_over_the_bank(tiny, photo):
    model = tiny.model
    inputs = model.prepare(photo, PROMPT)
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=va.contextual.required_hooks(model))
    k = 4
    result = va.contextual_lens(model, cache, CONTEXTS, k=k, chunk_size=3).row(0)
    hidden, _ = ref.residual_states(tiny.reference, inputs, model.n_layers)
    img = ref.image_positions(tiny.reference, inputs.input_ids)
    assert torch.equal(result.positions, img)
    special = set(model.tokenizer.all_special_ids)
    bank, words, where = [], [], []
    for c, text in enumerate(CONTEXTS):
        ids = model.tokenizer(text)["input_ids"]
        states = _context_states(tiny, ids)
        for t, token in enumerate(ids):
            if token not in special:
                bank.append(states[:, t])
                words.append(token)
                where.append((c, t))
    bank_t = torch.stack(bank, dim=1)  # [layer, m, d]
    assert result.n_bank_tokens == bank_t.shape[1]
    for layer in range(model.n_layers + 1):
        q = hidden[layer][0, img].double()
        b = bank_t[layer].double()
        cos = (q / q.norm(dim=-1, keepdim=True)) @ (b / b.norm(dim=-1, keepdim=True)).T  # [img, m]
        expected = cos.topk(k, dim=1).values
        assert (result.top_similarity[layer].double() - expected).abs().max() <= TOL, layer
        # Each reported neighbour is that bank entry (its cosine and its word), whatever the tie order.
        index = {w: i for i, w in enumerate(where)}
        for p in range(img.numel()):
            for r in range(k):
                entry = index[(int(result.top_context[layer, p, r]), int(result.top_offset[layer, p, r]))]
                assert abs(float(cos[p, entry]) - float(result.top_similarity[layer, p, r])) <= TOL
                assert int(result.top_ids[layer, p, r]) == words[entry]


def test_labels_give_the_logit_lens_match_rate(tiny, photo):
    model = tiny.model
    inputs = model.prepare(photo, PROMPT)
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=va.contextual.required_hooks(model))
    n = int(inputs.layout.image_mask[0].sum())
    labels = (["circle", None] * n)[:n]
    result = va.contextual_lens(model, cache, CONTEXTS, k=3, labels=labels, layers=[0, model.n_layers])
    lens = va.logit_lens(model, cache, k=3, labels=labels, layers=[0, model.n_layers])
    assert torch.equal(result.label_ids, lens.label_ids)
    hit = (result.top_ids[0] == result.label_ids[0][None, :, None]).any(-1)
    labelled = result.label_ids[0] >= 0
    expected = (hit & labelled).sum(-1).float() / labelled.sum()
    assert torch.allclose(result.match_rate[0], expected)
    assert torch.allclose(result.match(result.label_ids), result.match_rate, equal_nan=True)
    frame = result.to_frame()
    assert list(frame.columns) == ["batch", "layer", "pos", "rank", "token_id", "similarity", "context", "offset"]
    assert len(frame) == 2 * n * 3


def test_bad_arguments_name_the_value(tiny, photo):
    model = tiny.model
    inputs = model.prepare(photo, PROMPT)
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter="blocks.0.hook_resid_pre")
    with pytest.raises(AnalysisInputError, match="contextual.required_hooks"):
        va.contextual_lens(model, cache, CONTEXTS)
    with pytest.raises(AnalysisInputError, match="non-empty"):
        va.contextual_lens(model, cache, [], layers=[0])
    with pytest.raises(AnalysisInputError, match=r"\[1\]"):
        va.contextual_lens(model, cache, ["a red circle .", "  "], layers=[0])
    with pytest.raises(AnalysisInputError, match="fewer than k = 50"):
        va.contextual_lens(model, cache, ["a red circle ."], layers=[0], k=50)
    with pytest.raises(AnalysisInputError, match="chunk_size"):
        va.contextual_lens(model, cache, CONTEXTS, layers=[0], chunk_size=0)


# ---- synthetic known answers --------------------------------------------------------------


def _chunk(states, start):
    m = states.shape[0]
    return BankChunk(states, torch.arange(m) + 100, torch.full((m,), start), torch.arange(m))


def test_a_bank_holding_the_exact_state_returns_it_first():
    torch.manual_seed(0)
    queries = torch.randn(5, 16)
    bank = torch.randn(40, 16)
    bank[17] = queries[2] * 3.0  # the same direction, another norm: cosine 1
    nearest = NearestStates([queries], k=3)
    for start in range(0, 40, 7):
        chunk = _chunk(bank[start : start + 7], start)
        nearest.add(0, BankChunk(chunk.states, chunk.ids + start, chunk.context, chunk.offset + start))
    assert int(nearest.offset[0][2, 0]) == 17 and abs(float(nearest.sim[0][2, 0]) - 1.0) <= 1e-6


def test_chunking_does_not_change_the_neighbours():
    torch.manual_seed(1)
    queries, bank = torch.randn(6, 8), torch.randn(50, 8)
    results = []
    for size in (1, 7, 50):
        nearest = NearestStates([queries], k=5)
        for start in range(0, 50, size):
            part = bank[start : start + size]
            m = part.shape[0]
            nearest.add(0, BankChunk(part, torch.arange(m) + start, torch.zeros(m, dtype=torch.long), torch.arange(m) + start))
        results.append((nearest.sim[0], nearest.offset[0]))
    brute = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(bank, dim=-1).T
    top = brute.topk(5, dim=1)
    for sim, offset in results:
        assert torch.allclose(sim, top.values, atol=1e-6) and torch.equal(offset, top.indices)
