"""prune_visual_tokens equals the shortened sequence run by hand from layer K on the Hugging Face
reference's own layers, and hiding the dropped tokens' keys from layer K on."""

from __future__ import annotations

import pytest
import torch

from tests.parity import analysis_refs as ref
from vlens import analysis as va
from vlens.errors import AnalysisInputError

TOL = 1e-4
PROMPT = "what is in the image ?"
ANSWER = "a red circle ."
FAMILIES = ["llava", "gemma3", "blip2", "instructblip", "qwen2_vl"]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    return ref.load_tiny(request.param, tmp_path_factory.mktemp(request.param))


class _Grab:
    """Each decoder layer's call (its keyword arguments) in one forward of the reference."""

    def __init__(self, layers):
        self.kwargs = {}
        self.handles = [
            layer.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, layer in enumerate(layers)
        ]

    def _hook(self, i):
        def hook(_m, args, kwargs):
            self.kwargs[i] = dict(kwargs)

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def case(tiny, photo):
    inputs = tiny.model.prepare(photo, PROMPT, answer=ANSWER)
    embeds = ref.merged_embeddings(tiny.reference, inputs)
    per_token = ref.per_token_inputs(tiny, inputs)
    positions = ref.full_positions(tiny, inputs)
    layers = ref.decoder_layers(tiny.reference, tiny.model.n_layers)
    grab = _Grab(layers)
    hf_positions = positions.permute(1, 0, 2) if positions.ndim == 3 else positions  # M-RoPE: HF's [axes, batch, pos]
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    try:
        with torch.no_grad():
            out = ref.lm_target(tiny)(inputs_embeds=embeds, attention_mask=mask, position_ids=hf_positions, **per_token,
                                      output_hidden_states=True, output_attentions=True, use_cache=False)
    finally:
        grab.remove()
    return inputs, embeds, per_token, positions, out, grab.kwargs


def _hand_logits(tiny, case, k, kept):
    """Layers k.. of the reference run by hand on the kept positions of its layer-k input, with
    each layer's own mask rows/columns and rotary angles of those positions."""
    inputs, embeds, per_token, positions, out, calls = case
    layers = ref.decoder_layers(tiny.reference, tiny.model.n_layers)
    hidden = out.hidden_states[k][:, kept]
    with torch.no_grad():
        for j in range(k, len(layers)):
            kwargs = {}
            for name, value in calls[j].items():
                if name == "attention_mask" and value is not None:
                    value = value[:, :, kept][:, :, :, kept]
                elif name == "position_embeddings" and value is not None:
                    value = tuple(v[..., kept, :] for v in value)  # [(axes,) batch, pos, dim]
                elif name == "position_ids" and value is not None:
                    value = value[..., kept]
                elif name in ("past_key_values", "use_cache"):
                    value = None if name == "past_key_values" else False
                kwargs[name] = value
            result = layers[j](hidden, **kwargs)
            hidden = result[0] if isinstance(result, tuple) else result
        logits = ref.lm_target(tiny).get_output_embeddings()(ref.final_norm(tiny.reference)(hidden))
    cap = getattr(tiny.reference.config.get_text_config(), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _masked_logits(tiny, case, k, dropped):
    """The full sequence with the dropped tokens' keys hidden from every query in layers k.."""
    inputs, embeds, per_token, positions, _, _ = case
    layers = ref.decoder_layers(tiny.reference, tiny.model.n_layers)

    def hide(_m, args, kwargs):
        m = kwargs["attention_mask"]
        kwargs["attention_mask"] = (m & ~dropped) if m.dtype == torch.bool else m.masked_fill(dropped, torch.finfo(m.dtype).min)
        return args, kwargs

    handles = [layers[j].register_forward_pre_hook(hide, with_kwargs=True) for j in range(k, len(layers))]
    try:
        with torch.no_grad():
            mask = torch.ones(embeds.shape[:2], dtype=torch.long)
            hf_positions = positions.permute(1, 0, 2) if positions.ndim == 3 else positions
            return ref.lm_target(tiny)(inputs_embeds=embeds, attention_mask=mask, position_ids=hf_positions,
                                       **per_token).logits
    finally:
        for h in handles:
            h.remove()


def _scores(logits_rows, targets):
    loss = float(torch.nn.functional.cross_entropy(logits_rows.float(), targets))
    return loss, bool((logits_rows.argmax(-1) == targets).all())


@pytest.mark.parametrize("k", [1, 2])
def test_attention_pruning_equals_the_shortened_sequence_by_hand(tiny, case, k):
    inputs, embeds, per_token, positions, out, _ = case
    ids = inputs.input_ids[0]
    answer = inputs.layout.answer_mask[0].nonzero().flatten()
    img = ref.image_positions(tiny.reference, inputs.input_ids)
    n_img, length = img.numel(), ids.numel()
    query = int(answer[0]) - 1
    keep = [0.25, 0.5]
    reversed_order = list(range(n_img))[::-1]
    result = va.prune_visual_tokens(tiny.model, inputs, layers=[k], keep=keep,
                                    rankings=["attention", "random", reversed_order])
    assert result.rankings == ("attention", "random", "given")
    row = result.row(0)
    assert torch.equal(row.order[2, 0], img.flip(0))
    received = out.attentions[k - 1][0, :, query, img].float().mean(0)
    expected_order = img[torch.sort(-received, stable=True).indices]
    assert torch.equal(row.order[0, 0], expected_order)
    assert sorted(row.order[1, 0].tolist()) == img.tolist()
    assert int(row.query_positions) == query
    for i, fraction in enumerate(keep):
        n_keep = int(fraction * n_img + 0.5)
        assert int(row.kept[i]) == n_keep
        for r in range(3):
            dropped = set(row.order[r, 0, n_keep:].tolist())
            kept = torch.tensor([p for p in range(length) if p not in dropped])
            rows = torch.tensor([kept.tolist().index(int(t)) - 1 for t in answer])
            hand = _hand_logits(tiny, case, k, kept)[0, rows]
            loss, exact = _scores(hand, ids[answer])
            assert abs(float(row.loss[r, 0, i]) - loss) <= TOL, (tiny.name, r, fraction, float(row.loss[r, 0, i]), loss)
            assert bool(row.exact[r, 0, i]) == exact
            # Pruning at k is hiding the dropped keys from every query of layers k and later.
            drop_mask = torch.zeros(length, dtype=torch.bool)
            drop_mask[list(dropped)] = True
            masked = _masked_logits(tiny, case, k, drop_mask)[0, answer - 1]
            assert (masked - hand).abs().max() <= TOL


def test_nothing_pruned_equals_the_unpruned_forward(tiny, case):
    inputs, embeds, per_token, positions, out, _ = case
    ids = inputs.input_ids[0]
    answer = inputs.layout.answer_mask[0].nonzero().flatten()
    full_loss, full_exact = _scores(out.logits[0, answer - 1], ids[answer])
    n = tiny.model.n_layers
    result = va.prune_visual_tokens(tiny.model, inputs, layers=[1, n], keep=[0.0, 1.0], rankings=["random", "attention"])
    assert abs(float(result.full_loss[0]) - full_loss) <= TOL and bool(result.full_exact[0]) == full_exact
    # keep = 100% at any K, and K = n_layers at any keep, are the unpruned forward.
    for r in range(2):
        assert abs(float(result.loss[0, r, 0, 1]) - full_loss) <= TOL
        assert abs(float(result.loss[0, r, 1, 0]) - full_loss) <= TOL
    assert float(result.flops_ratio[0, 0, 1]) == 1.0 and float(result.flops_ratio[0, 1, 0]) == 1.0


def test_flops_ratio_counts_blocks_from_the_config(tiny, case):
    inputs = case[0]
    text = tiny.reference.config.get_text_config()
    layer = ref.decoder_layers(tiny.reference, tiny.model.n_layers)[0]
    d, h = text.hidden_size, text.num_attention_heads
    h_kv = getattr(text, "num_key_value_heads", None) or h
    d_head = getattr(text, "head_dim", None) or d // h
    m = getattr(text, "intermediate_size", None) or text.ffn_dim
    gated = any(name.endswith("gate_proj") for name, _ in layer.named_modules())

    def block(n):
        return 2 * n * d * (2 * h * d_head + 2 * h_kv * d_head) + 4 * n * n * h * d_head + 2 * (3 if gated else 2) * n * d * m

    length = int(inputs.layout.lengths[0])
    n_img = int(inputs.layout.image_mask[0].sum())
    n_layers = tiny.model.n_layers
    result = va.prune_visual_tokens(tiny.model, inputs, layers=[1], keep=[0.5], rankings=["random"])
    short = length - (n_img - int(0.5 * n_img + 0.5))
    expected = (block(length) + (n_layers - 1) * block(short)) / (n_layers * block(length))
    assert abs(float(result.flops_ratio[0, 0, 0]) - expected) <= 1e-6


def test_batched_pruning_equals_single_rows(tiny, photo, photo2):
    model = tiny.model
    images, prompts, answers = [photo, photo2], [PROMPT, "describe the image ."], [ANSWER, "a big blue square ."]
    batch = model.prepare(images, prompts, answer=answers)
    result = va.prune_visual_tokens(model, batch, layers=[1, 2], keep=[0.5], rankings=["attention", "random"])
    assert result.loss.shape == (2, 2, 2, 1)
    for row in range(2):
        single = model.prepare(images[row], prompts[row], answer=answers[row])
        # The random ranking is seeded by seed + row, so row 1 alone takes seed 1.
        one = va.prune_visual_tokens(model, single, layers=[1, 2], keep=[0.5], rankings=["attention", "random"],
                                     seed=row).row(0)
        assert (result.row(row).loss - one.loss).abs().max() <= TOL
        assert torch.equal(result.row(row).order, one.order)
    frame = result.to_frame()
    assert list(frame.columns) == ["batch", "ranking", "layer", "keep", "loss", "exact", "flops_ratio", "kept"]
    assert len(frame) == 2 * 2 * 2 and set(frame["ranking"]) == {"attention", "random"}


def test_bad_arguments_name_the_value(tiny, case, photo):
    inputs = case[0]
    model, n = tiny.model, tiny.model.n_layers
    with pytest.raises(AnalysisInputError, match="answer"):
        va.prune_visual_tokens(model, model.prepare(photo, PROMPT))
    with pytest.raises(AnalysisInputError, match=rf"\[{n + 1}\].*0\.\.{n}"):
        va.prune_visual_tokens(model, inputs, layers=[n + 1])
    with pytest.raises(AnalysisInputError, match="1.5"):
        va.prune_visual_tokens(model, inputs, keep=[1.5])
    with pytest.raises(AnalysisInputError, match="'fastest'"):
        va.prune_visual_tokens(model, inputs, rankings=["fastest"])
    with pytest.raises(AnalysisInputError, match="K = 0"):
        va.prune_visual_tokens(model, inputs, layers=[0], rankings=["attention"])
    with pytest.raises(AnalysisInputError, match="not a permutation"):
        va.prune_visual_tokens(model, inputs, rankings=[[0, 0, 1]])
    with pytest.raises(AnalysisInputError, match=r"rankings=\[order\]"):
        va.prune_visual_tokens(model, inputs, rankings=[2, 0, 1])


def _pruned_greedy(tiny, prompt_inputs, k, dropped, n_new):
    """A plain no-cache greedy loop of the reference whose layers k.. never see ``dropped``
    (hidden from every query, which equals dropping them, as tested above)."""
    layers = ref.decoder_layers(tiny.reference, tiny.model.n_layers)
    kwargs = prompt_inputs.model_kwargs()
    ids = kwargs.pop("input_ids")
    per_token = {name: v for name, v in kwargs.items() if torch.is_tensor(v) and v.shape == ids.shape}
    fixed = {name: v for name, v in kwargs.items() if name not in per_token}
    new = []
    for _ in range(n_new):
        hidden = torch.zeros(ids.shape[1], dtype=torch.bool)
        hidden[list(dropped)] = True

        def hide(_m, args, kw, hidden=hidden):
            m = kw["attention_mask"]
            kw["attention_mask"] = (m & ~hidden) if m.dtype == torch.bool else m.masked_fill(hidden, torch.finfo(m.dtype).min)
            return args, kw

        handles = [layers[j].register_forward_pre_hook(hide, with_kwargs=True) for j in range(k, len(layers))]
        try:
            with torch.no_grad():
                logits = tiny.reference(input_ids=ids, **per_token, **fixed, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        token = logits[:, -1].argmax(-1, keepdim=True)
        new.append(int(token))
        ids = torch.cat([ids, token], 1)
        per_token = {name: torch.cat([v, torch.ones_like(v[:, :1]) if name == "attention_mask" else v[:, -1:]], 1)
                     for name, v in per_token.items()}
    return new


def test_exact_match_is_what_pruned_greedy_decoding_gives(tiny, photo):
    """The answer is the unpruned model's own greedy continuation, so the unpruned exact match
    holds; pruned, exact match says whether a real greedy loop under pruning reproduces it."""
    from tests.parity.helpers import greedy_without_cache

    model = tiny.model
    prompt = model.prepare(photo, PROMPT)
    n_new = 3
    continuation = greedy_without_cache(tiny.reference, prompt.model_kwargs(), n_new)
    answer_text = model.tokenizer.decode(continuation, skip_special_tokens=False)
    inputs = model.prepare(photo, PROMPT, answer=answer_text)
    answer = inputs.layout.answer_mask[0].nonzero().flatten()
    if not torch.equal(inputs.input_ids[0, answer], continuation):
        pytest.skip(f"{tiny.name}: the greedy continuation {continuation.tolist()} does not re-tokenize to itself")
    result = va.prune_visual_tokens(model, inputs, layers=[1, 2], keep=[0.0, 0.5, 1.0], rankings=["attention", "random"])
    assert bool(result.full_exact[0])
    print(f"\n{tiny.name}: exact match under pruning {result.exact[0].flatten().tolist()}")
    for r in range(2):
        for j, k in enumerate([1, 2]):
            for i in range(3):
                n_keep = int(result.kept[0, i])
                dropped = set(result.row(0).order[r, j, n_keep:].tolist())
                greedy = _pruned_greedy(tiny, prompt, k, dropped, n_new)
                assert bool(result.exact[0, r, j, i]) == (greedy == continuation.tolist()), (r, k, n_keep, greedy)


def test_the_shortening_hooks_keeping_every_token_change_nothing(tiny, case):
    """The mechanism itself, not the keep = 100% shortcut: blocks >= k run through the hooks on
    every position (two identical variants) and give the unpruned forward's logits."""
    from vlens.analysis._shorten import shortened_after
    from vlens.analysis.knockout import row_problems

    inputs = case[0]
    (problem,) = row_problems(tiny.model, inputs, "test")
    n = problem.ids.shape[0]
    ones = torch.ones(1, n, dtype=torch.long)
    extras = {name: v[None] for name, v in problem.extras.items()} or None
    with torch.no_grad():
        full, _ = tiny.model.run_language_model(problem.embeds[None], problem.positions[None], attention_mask=ones,
                                                extras=extras)
        for k in (0, 1, tiny.model.n_layers - 1):
            with shortened_after(list(tiny.model.bridge.blocks), k, torch.arange(n).expand(2, n), n):
                both, _ = tiny.model.run_language_model(problem.embeds[None], problem.positions[None],
                                                        attention_mask=ones, extras=extras)
            assert both.shape[0] == 2 and (both - full).abs().max() <= TOL, k


def test_pruning_is_undefined_where_the_language_model_adds_features_between_layers(tmp_path_factory, photo):
    """Qwen3-VL's DeepStack adds features to the image positions between decoder layers, which
    tokens dropped inside the stack cannot take along: pruning says so instead of running."""
    from vlens.errors import AnalysisUndefinedError

    tiny = ref.load_tiny("qwen3_vl", tmp_path_factory.mktemp("qwen3_vl"))
    inputs = tiny.model.prepare(photo, "what is in the image ?", answer="a red circle .")
    with pytest.raises(AnalysisUndefinedError, match="deepstack_visual_embeds"):
        va.prune_visual_tokens(tiny.model, inputs, layers=[1], keep=[0.5])
