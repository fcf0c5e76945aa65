"""Logit lens, modality similarity, attention to image, prompt dependence and the streaming
curves equal computations written here from the Hugging Face model's own outputs, for
every family with a tiny checkpoint."""

from __future__ import annotations

import pytest
import torch

from tests.parity import analysis_refs as ref
from vlens import analysis as va

TOL = 1e-4
PROMPT = "what is in the image ?"
ANSWER = "a red circle ."


@pytest.fixture(scope="module", params=list(ref.FAMILIES))
def tiny(request, tmp_path_factory):
    return ref.load_tiny(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def case(tiny, photo):
    """Inputs, the vlens cache of every hook the read-outs need, and HF's raw states."""
    model = tiny.model
    inputs = model.prepare(photo, PROMPT, answer=ANSWER)
    names = sorted(
        set(va.lens.required_hooks(model))
        | set(va.similarity.required_hooks(model, against="text_embeddings"))
        | set(va.attention.required_hooks(model))
    )
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=names)
    states, out = ref.residual_states(tiny.reference, inputs, model.n_layers)
    return inputs, cache, states, out


def reference_logprobs(tiny, states, out, layer, positions):
    """HF's final norm and head on HF's hidden state, then the final soft cap its config
    states (Gemma 2's ``cap * tanh(x / cap)``); the last layer: HF's own logits."""
    if layer == len(states) - 1:
        logits = out.logits[0, positions]
    else:
        with torch.no_grad():
            normed = ref.final_norm(tiny.reference)(states[layer][0, positions])
            logits = tiny.reference.get_output_embeddings()(normed)
        cap = getattr(tiny.reference.config.get_text_config(), "final_logit_softcapping", None)
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
    return torch.log_softmax(logits.float(), dim=-1)


def test_logit_lens_equals_hf(tiny, case):
    inputs, cache, states, out = case
    positions = ref.image_positions(tiny.reference, inputs.input_ids)
    words = [5, 7]
    result = va.logit_lens(tiny.model, cache, positions="image", k=4, words=words).row(0)
    n_layers = tiny.model.n_layers
    assert result.top_ids.shape == (n_layers + 1, len(positions), 4)
    assert torch.equal(result.positions, positions)
    for layer in range(n_layers + 1):
        expected = reference_logprobs(tiny, states, out, layer, positions)
        top = expected.topk(4, dim=-1)
        assert (result.top_logprobs[layer] - top.values).abs().max() <= TOL, f"layer {layer}"
        # The ids vlens ranks first have the reference's log-probs (robust to near ties).
        assert (expected.gather(-1, result.top_ids[layer]) - result.top_logprobs[layer]).abs().max() <= TOL
        assert (result.word_logprobs[layer] - expected[:, words]).abs().max() <= TOL
        ranks = (expected.unsqueeze(1) > expected[:, words].unsqueeze(-1)).sum(-1)
        assert (result.word_ranks[layer] - ranks).abs().max() <= 1  # a tie within float noise may swap one


def test_logit_lens_match_rate_counts_labels_in_top_k(tiny, case):
    _, cache, _, _ = case
    lens = va.logit_lens(tiny.model, cache, positions="image", k=3).row(0)
    n = lens.positions.numel()
    labels = lens.top_ids[-1, :, 0].clone()  # the last layer's top-1: always a match there
    labels[n // 2 :] = -1  # unlabelled
    result = va.logit_lens(tiny.model, cache, positions="image", k=3, labels=labels).row(0)
    assert result.match_rate[-1] == 1.0
    expected = (lens.top_ids[:, : n // 2] == labels[: n // 2, None]).any(-1).float().mean(-1)
    assert torch.allclose(result.match_rate, expected)


@pytest.mark.parametrize("against", ["text_states", "text_embeddings", "vocab"])
def test_modality_similarity_equals_hf(tiny, case, against):
    inputs, cache, states, _ = case
    result = va.modality_similarity(tiny.model, cache, against=against).row(0)
    img = ref.image_positions(tiny.reference, inputs.input_ids)
    txt = inputs.layout.instruction_mask[0].nonzero().flatten()
    W = tiny.reference.get_input_embeddings().weight.detach().float()
    assert result.per_layer.shape == (tiny.model.n_layers + 1,)
    for layer, h in enumerate(states):
        v = h[0, img]
        if against == "vocab":
            cos = torch.nn.functional.normalize(v, dim=-1) @ torch.nn.functional.normalize(W, dim=-1).T
            expected_tokens = cos.max(-1).values
        else:
            others = h[0, txt] if against == "text_states" else W[inputs.input_ids[0, txt]]
            expected_tokens = torch.tensor(
                [sum(ref.cosine(v[i], o) for o in others) / len(others) for i in range(len(img))]
            )
        assert (result.per_token[layer] - expected_tokens).abs().max() <= TOL, f"layer {layer}"
        assert abs(float(result.per_layer[layer]) - float(expected_tokens.mean())) <= TOL


@pytest.mark.parametrize("query", ["instruction", "last", "answer"])
def test_attention_to_image_equals_hf(tiny, case, query):
    inputs, cache, _, out = case
    result = va.attention_to_image(cache, query=query).row(0)
    img = ref.image_positions(tiny.reference, inputs.input_ids)
    q = inputs.layout.mask(query)[0].nonzero().flatten()
    for layer, pattern in enumerate(ref.attentions(out)):
        a = pattern[0].float()  # [head, q, k]
        mass = torch.stack([a[h][q][:, img].sum(-1).mean() for h in range(a.shape[0])])
        received = a[:, q][:, :, img].mean(dim=(0, 1))
        assert (result.mass[layer] - mass).abs().max() <= TOL, f"layer {layer}"
        assert (result.received[layer] - received).abs().max() <= TOL


def test_streaming_curves_equal_cache_analyses(tiny, photo, photo2):
    model = tiny.model
    batch = model.prepare([photo, photo2], [PROMPT, "describe the image ."], answer=[ANSWER, "a big blue square ."])
    names = va.lens.required_hooks(model) + va.attention.required_hooks(model) + ["embed.hook_in"]
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=names)
    for against in ("text_states", "text_embeddings", "vocab"):
        stream = va.SimilarityStream(model, against=against)
        stream.update(batch)
        curves = va.modality_similarity(model, cache, against=against).per_layer  # [batch, layer]
        got = stream.result()
        assert (stream.last_batch.per_layer - curves).abs().max() <= 1e-5, against  # per example
        assert got.n_examples == 2
        assert (got.per_layer - curves.mean(0)).abs().max() <= 1e-5, against
        assert (got.std - curves.std(0, unbiased=False)).abs().max() <= 1e-5, against
    attn = va.attention_to_image(cache, query="instruction")
    stream = va.AttentionStream(model, query="instruction")
    half = va.AttentionStream(model, query="instruction")
    stream.update(batch)
    # Two workers, one example each, merged: the same sums.
    for row in range(2):
        one = model.prepare([photo, photo2][row], [PROMPT, "describe the image ."][row])
        part = va.AttentionStream(model, query="instruction")
        part.update(one)
        half.merge(part)
    for s in (stream, half):
        got = s.result()
        assert (got.mass - attn.mass.mean(0)).abs().max() <= 1e-5
        if got.n_received == 2:
            assert (got.received - attn.received.nanmean(0)).abs().max() <= 1e-5


def test_lens_stream_equals_logit_lens(tiny, photo, photo2):
    model = tiny.model
    batch = model.prepare([photo, photo2], [PROMPT, "describe the image ."])
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=va.lens.required_hooks(model))
    plain = va.logit_lens(model, cache, k=3)
    # Label each image token with its own final-layer top-2 id: a known mixture of hits.
    labels = plain.top_ids[:, -1, :, 1].clone()
    lens = va.logit_lens(model, cache, k=3, labels=labels)
    stream = va.LensStream(model, k=3, labels=lambda inputs, row: labels[row, : int(inputs.layout.image_mask[row].sum())])
    stream.update(batch)
    got = stream.result()
    assert got.n_examples == 2
    assert (got.top1_logprob - plain.top_logprobs[..., 0].nanmean(-1).mean(0)).abs().max() <= 1e-4
    assert (got.match_rate - lens.match_rate.mean(0)).abs().max() <= 1e-5
    assert got.match_rate[-1] == 1.0


def test_batched_results_equal_single_rows(tiny, photo, photo2):
    model = tiny.model
    prompts, answers, images = [PROMPT, "describe the image ."], [ANSWER, "a big blue square ."], [photo, photo2]
    names = va.lens.required_hooks(model) + va.attention.required_hooks(model)
    with torch.no_grad():
        _, batch_cache = model.run_with_cache(model.prepare(images, prompts, answer=answers), names_filter=names)
    lens_b = va.logit_lens(model, batch_cache, k=3)
    sim_b = va.modality_similarity(model, batch_cache)
    att_b = va.attention_to_image(batch_cache)
    for row in range(2):
        with torch.no_grad():
            _, cache = model.run_with_cache(model.prepare(images[row], prompts[row], answer=answers[row]), names_filter=names)
        lens, sim, att = (va.logit_lens(model, cache, k=3).row(0), va.modality_similarity(model, cache).row(0),
                          va.attention_to_image(cache).row(0))
        n = lens.positions.numel()
        assert torch.equal(lens_b.positions[row, :n], lens.positions)
        assert (lens_b.top_logprobs[row, :, :n] - lens.top_logprobs).abs().max() <= TOL
        assert (sim_b.per_layer[row] - sim.per_layer).abs().max() <= TOL
        assert (att_b.mass[row] - att.mass).abs().max() <= TOL
        assert (att_b.received[row, :, :n] - att.received).abs().max() <= TOL
    assert not lens_b.to_frame()["logprob"].isna().any()


def test_prompt_dependence_equals_hf_and_shows_what_the_family_does(tiny, photo):
    model = tiny.model
    prompts = [PROMPT, "describe the image .", "how many circle ?"]
    result = va.prompt_dependence(model, photo, prompts)
    states = []
    for prompt in prompts:
        inputs = model.prepare(photo, prompt)
        hidden, _ = ref.residual_states(tiny.reference, inputs, model.n_layers)
        img = ref.image_positions(tiny.reference, inputs.input_ids)
        states.append(torch.stack([h[0, img] for h in hidden]))
    pairs = [(0, 1), (0, 2), (1, 2)]
    cos = torch.stack([torch.nn.functional.cosine_similarity(states[p], states[q], dim=-1) for p, q in pairs])
    expected = (1 - cos).mean(0)
    max_diff = torch.stack([(states[p] - states[q]).abs().amax(dim=(1, 2)) for p, q in pairs]).amax(0)
    assert (result.per_token - expected).abs().max() <= TOL
    assert (result.max_abs_diff - max_diff).abs().max() <= TOL
    if tiny.family.reads_prompt:
        # The Q-Former reads the instruction (the visual tokens differ from the input embeddings on),
        # or the language model's image tokens attend to the prompt (they differ from its first layer on).
        first = tiny.family.prompt_from_layer
        assert float(result.max_abs_diff[first:].min()) > 1e-3
        assert all(float(d) <= 1e-4 for d in result.max_abs_diff[:first])
    else:
        # Causal, image before the instruction: the visual tokens cannot see the prompt.
        assert float(result.max_abs_diff.max()) <= 1e-4
