"""Activation patching between a clean and a corrupted input, per layer and position.

For each kind of activation (``resid_pre``: the residual stream entering layer l;
``attn_out`` and ``mlp_out``: what layer l's attention and MLP add to it), each layer and
each chosen position, the corrupted input runs with that one activation replaced by the
clean run's value at the same layer and position (TransformerLens hooks
``blocks.{l}.hook_{kind}``), and the prediction of the first answer token is read: the
logit difference ``logit[target] - logit[foil]`` and the target's probability. The clean
and corrupted inputs must be tokenised alike (:func:`vlens.analysis._pairs.check_aligned`).

Engines (same numbers): in a language model causal over the image, a patch at position p
changes nothing before p, so with ``"kv"`` the corrupted sequence runs once with a key/value
cache and the variants, sorted by position and batched, run only their suffix from the
chunk's first position (the corrupted prefix comes from the cache). ``"naive"`` runs the
whole sequence per variant, batched. Only the logits at the read position are computed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from vlens.analysis._common import BatchedResult, long_frame, stack_rows, typechecked
from vlens.analysis._pairs import (
    KINDS,
    Kind,
    RowPair,
    TokenSpec,
    batch_extras,
    check_aligned,
    check_kinds,
    check_layers,
    first_answer_ids,
    hook_name,
    metrics,
    row_pairs,
    token_ids,
)
from vlens.analysis._replay import LayerReplay
from vlens.analysis._spans import SpanSpec, span_positions
from vlens.analysis.knockout import ENGINES, Engine, _PrefixBuffers, _unexpected, engine_for, merge_runs
from vlens.errors import AnalysisInputError

if TYPE_CHECKING:
    from vlens.inputs import VLMInputs
    from vlens.model import HookedVLM


def required_hooks(model: "HookedVLM") -> list[str]:
    """Hooks read from a cache: none (patching runs the model itself)."""
    return []


@typechecked
@dataclass(frozen=True, eq=False, repr=False)
class PatchingResult(BatchedResult):
    """The corrupted run's prediction with one clean activation patched in, per kind, layer, position.

    ``logit_diff[b, k, l, i]`` is ``logit[target] - logit[foil]`` at row ``b``'s read position
    (the token predicting the first answer token) when activation ``kinds[k]`` of layer
    ``layers[l]`` at sequence position ``positions[b, i]`` comes from the clean run; ``prob``
    is the target's probability. ``clean_*`` and ``corrupted_*`` are the unpatched runs.
    ``normalized`` puts the logit difference on the scale 0 (corrupted) .. 1 (clean).

    Attributes:
        kinds: The activation kinds, in axis order.
        layers: ``[layer]``.
        positions: Sequence positions patched, ``[batch, pos]`` (-1: padding of a shorter row).
        logit_diff, prob: ``[batch, kind, layer, pos]``.
        clean_logit_diff, corrupted_logit_diff, clean_prob, corrupted_prob: ``[batch]``.
        target, foil: Token ids per row (``foil`` -1 without one: ``logit_diff`` is NaN then).
        predictor: The read position per row.
        engine, engine_reason: Which engine ran, and why ``"kv"`` did not when asked for.
    """

    ragged = {"pos": "positions"}

    kinds: tuple[str, ...]
    layers: Int[Tensor, " layer"]
    positions: Int[Tensor, "batch pos"]
    logit_diff: Float[Tensor, "batch kind layer pos"]
    prob: Float[Tensor, "batch kind layer pos"]
    clean_logit_diff: Float[Tensor, " batch"]
    corrupted_logit_diff: Float[Tensor, " batch"]
    clean_prob: Float[Tensor, " batch"]
    corrupted_prob: Float[Tensor, " batch"]
    target: Int[Tensor, " batch"]
    foil: Int[Tensor, " batch"]
    predictor: Int[Tensor, " batch"]
    engine: Engine
    engine_reason: str = ""

    @property
    def normalized(self) -> Float[Tensor, "batch kind layer pos"]:
        """``(patched - corrupted) / (clean - corrupted)`` of the logit difference."""
        span = (self.clean_logit_diff - self.corrupted_logit_diff)[:, None, None, None]
        return (self.logit_diff - self.corrupted_logit_diff[:, None, None, None]) / span

    def to_frame(self) -> pd.DataFrame:
        """Long format: batch, kind, layer, pos (sequence position), logit_diff, prob, normalized."""
        frame = long_frame(
            {"logit_diff": self.logit_diff, "prob": self.prob, "normalized": self.normalized},
            dims=("kind", "layer", "pos"),
            coords={"layer": self.layers, "pos": self.positions},
        )
        frame["kind"] = [self.kinds[k] for k in frame["kind"]]
        return pd.DataFrame(frame[frame["pos"] >= 0]).reset_index(drop=True)


def activation_patching(
    model: "HookedVLM",
    clean: "VLMInputs",
    corrupted: "VLMInputs",
    target: TokenSpec = None,
    foil: TokenSpec = None,
    positions: SpanSpec = "image",
    kinds: Sequence[str] = KINDS,
    layers: Optional[Sequence[int]] = None,
    engine: Engine = "kv",
    batch_size: int = 32,
) -> PatchingResult:
    """Patch each clean activation into the corrupted run (see :class:`PatchingResult`).

    Args:
        model: A ``HookedVLM``.
        clean, corrupted: From ``model.prepare``, tokenised alike (e.g. another image of the
            same size with the same prompt, or a prompt with as many tokens); row b of one is
            paired with row b of the other.
        target: The answer token whose logit and probability are read: a token id, a
            one-token string, or one per row (default: clean's first answer token).
        foil: The token the logit difference is taken against (default: corrupted's first
            answer token, when it has an answer).
        positions: Where to patch: a span name, mask or positions (default the image tokens).
        kinds: Any of ``"resid_pre"``, ``"attn_out"``, ``"mlp_out"``.
        layers: Layers to patch (default all).
        engine: ``"kv"`` (corrupted prefix shared) or ``"naive"``; same numbers.
        batch_size: Variants run together in one forward.
    """
    setup = _setup(model, clean, corrupted, target, foil, positions, kinds, layers, engine, batch_size)
    kinds_t, layer_t, pairs, targets, foils = setup
    diffs, probs, base, runs = [], [], [], []
    for row, pair in enumerate(pairs):
        foil_id = None if foils is None else int(foils[row])
        d, p, b, run = _row_patching(model, pair, kinds_t, layer_t, int(targets[row]), foil_id, engine, batch_size)
        diffs.append(d)
        probs.append(p)
        base.append(b)
        runs.append(run)
    run = merge_runs(runs)
    return PatchingResult(
        kinds=kinds_t,
        layers=layer_t,
        positions=stack_rows([p.patch.cpu() for p in pairs]),
        logit_diff=stack_rows(diffs),
        prob=stack_rows(probs),
        clean_logit_diff=torch.stack([b[0] for b in base]),
        corrupted_logit_diff=torch.stack([b[1] for b in base]),
        clean_prob=torch.stack([b[2] for b in base]),
        corrupted_prob=torch.stack([b[3] for b in base]),
        target=targets,
        foil=foils if foils is not None else torch.full_like(targets, -1),
        predictor=torch.tensor([p.predictor for p in pairs], dtype=torch.long),
        engine=run.engine,
        engine_reason=run.reason,
    )


def _setup(model, clean, corrupted, target, foil, positions, kinds, layers, engine, batch_size):
    """Every argument checked before any forward; then the row pairs."""
    if engine not in ENGINES:
        raise AnalysisInputError(f"unknown engine {engine!r}; choose one of {list(ENGINES)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise AnalysisInputError(f"batch_size must be a positive int, got {batch_size!r}")
    kinds_t = check_kinds(kinds)
    layer_t = check_layers(layers, model.n_layers)
    check_aligned(clean.layout, corrupted.layout)
    n = clean.batch_size
    targets = token_ids(model, target, first_answer_ids(clean), n, "target")
    if targets is None:
        raise AnalysisInputError("pass target= (a token or id): the clean input has no answer to take it from")
    default_foil = first_answer_ids(corrupted)
    if default_foil is not None and bool((default_foil == targets).any()):
        default_foil = None  # the same answer is no foil
    foils = token_ids(model, foil, default_foil, n, "foil")
    patch = [span_positions(clean.layout, positions, row, "positions") for row in range(n)]
    pairs = row_pairs(model, clean, corrupted, patch)
    return kinds_t, layer_t, pairs, targets, foils


def clean_activations(
    model: "HookedVLM", pair: RowPair, kinds: tuple[Kind, ...], layers: Tensor
) -> tuple[Float[Tensor, "kind layer pos d_model"], Tensor]:
    """The clean run's activations at the patched positions, and its logits at the read position."""
    device = pair.clean.device
    store: dict[tuple[int, int], Tensor] = {}

    def grab(k: int, l: int):
        def fn(x: Any, hook: Any) -> None:
            store[(k, l)] = x[0, pair.patch].detach()

        return fn

    hooks = [(hook_name(kind, int(layer)), grab(k, i)) for k, kind in enumerate(kinds) for i, layer in enumerate(layers)]
    n = pair.clean.shape[0]
    with torch.no_grad(), model.hooks(hooks):
        logits, _ = model.run_language_model(
            pair.clean[None],
            pair.positions[None],
            attention_mask=torch.ones(1, n, dtype=torch.long, device=device),
            logits_to_keep=torch.tensor([pair.predictor], device=device),
            extras=batch_extras(pair.extras_clean, 1, slice(0, n)),
        )
    acts = torch.stack([torch.stack([store[(k, i)] for i in range(len(layers))]) for k in range(len(kinds))])
    return acts, logits[0, 0]


def _row_patching(
    model: "HookedVLM",
    pair: RowPair,
    kinds: tuple[Kind, ...],
    layers: Tensor,
    target: int,
    foil: Optional[int],
    engine: Engine,
    batch_size: int,
):
    device = pair.clean.device
    n = pair.corrupted.shape[0]
    acts, clean_logits = clean_activations(model, pair, kinds, layers)
    run = engine_for(model, n, engine)
    with torch.no_grad():
        (logits, cache), replay = LayerReplay.record(
            model,
            lambda: model.run_language_model(
                pair.corrupted[None],
                pair.positions[None],
                attention_mask=torch.ones(1, n, dtype=torch.long, device=device),
                use_cache=run.engine == "kv",
                logits_to_keep=torch.tensor([pair.predictor], device=device),
                extras=batch_extras(pair.extras, 1, slice(0, n)),
            ),
        )
    clean_diff, clean_prob = metrics(clean_logits[None], target, foil)
    corr_diff, corr_prob = metrics(logits[0], target, foil)
    buffers = None
    if run.engine == "kv":
        kv = [(layer.keys, layer.values) for layer in cache.layers] if cache is not None else []
        if not kv or any(k is None or int(k.shape[-2]) != n for k, _ in kv):
            run = _unexpected(model, f"the corrupted sequence's key/value cache does not hold {n} positions")
        else:
            buffers = _PrefixBuffers(kv, batch_size, n)
    if any(v.ndim > 1 for v in pair.extras.values()):
        # Per-token inputs with a feature axis (e.g. DeepStack features) are added to the stream by
        # the text model between its layers, which a replay of single layers would skip.
        replay = "the per-token inputs carry features the language model adds between its layers"
    if engine == "kv" and isinstance(replay, LayerReplay):
        replay = _checked(replay, model, pair, logits[0, 0], buffers)
    if isinstance(replay, str):
        replay_reason = f"layers below a patch re-run: {replay}"
        run = dataclasses.replace(run, reason="; ".join(r for r in (run.reason, replay_reason) if r))
        replay = None
    if engine != "kv":
        replay = None  # "naive" runs the whole language model per variant
    n_kind, n_layer, n_pos = len(kinds), len(layers), pair.patch.numel()
    # Variants (kind, layer, position index): sorted by layer, then position, where the layers
    # below a patch are replayed (a chunk starts at its lowest layer); else by position only.
    k_idx, l_idx, p_idx = torch.meshgrid(torch.arange(n_kind), torch.arange(n_layer), torch.arange(n_pos), indexing="ij")
    k_idx, l_idx, p_idx = k_idx.flatten(), l_idx.flatten(), p_idx.flatten()
    key = p_idx if replay is None else l_idx * n_pos + p_idx
    order = key.argsort(stable=True)
    diff = torch.full((n_kind * n_layer * n_pos,), float("nan"))
    prob = torch.full_like(diff, float("nan"))
    patch_cpu = pair.patch.cpu()
    for chunk in order.split(batch_size):
        where = patch_cpu[p_idx[chunk]]
        start = int(where.min()) if buffers is not None else 0
        if buffers is not None and start > pair.predictor:
            # Causal: a patch after the read position cannot change it.
            diff[chunk], prob[chunk] = corr_diff.cpu(), corr_prob.cpu()
            continue
        args = (model, pair, acts, kinds, layers, k_idx[chunk], l_idx[chunk], p_idx[chunk], start, buffers, target, foil)
        d, p = _chunk(*args) if replay is None else _replayed_chunk(replay, *args)
        diff[chunk], prob[chunk] = d.cpu(), p.cpu()
    shape = (n_kind, n_layer, n_pos)
    base = (clean_diff[0].cpu(), corr_diff[0].cpu(), clean_prob[0].cpu(), corr_prob[0].cpu())
    return diff.view(shape), prob.view(shape), base, run


def _patch_hooks(pair, acts, kinds, layers, k_idx, l_idx, p_idx, start) -> list[tuple[str, Any]]:
    """Hooks writing each row's clean activation at its kind, layer and position (suffix index)."""
    device = pair.clean.device
    where = pair.patch[p_idx.to(device)] - start  # index into the suffix
    p_dev = p_idx.to(device)

    def patcher(k: int, l: int):
        rows_here = ((k_idx == k) & (l_idx == l)).nonzero().flatten().to(device)

        def fn(x: Tensor, hook: Any) -> Tensor:
            x = x.clone()
            x[rows_here, where[rows_here]] = acts[k, l, p_dev[rows_here]].to(x.dtype)
            return x

        return fn

    used = sorted({(int(k), int(l)) for k, l in zip(k_idx, l_idx)})
    return [(hook_name(kinds[k], int(layers[l])), patcher(k, l)) for k, l in used]


def _chunk(model, pair, acts, kinds, layers, k_idx, l_idx, p_idx, start, buffers, target, foil):
    device = pair.clean.device
    n = pair.corrupted.shape[0]
    rows = k_idx.numel()
    hooks = _patch_hooks(pair, acts, kinds, layers, k_idx, l_idx, p_idx, start)
    suffix = slice(start, n)
    past = buffers.cache(rows, start) if (buffers is not None and start > 0) else None
    with torch.no_grad(), model.hooks(hooks):
        logits, _ = model.run_language_model(
            pair.corrupted[None, suffix].expand(rows, -1, -1),
            pair.positions[None, ..., suffix].expand(rows, *pair.positions.shape[:-1], -1),
            attention_mask=torch.ones(rows, n, dtype=torch.long, device=device),
            past_key_values=past,
            use_cache=past is not None,
            logits_to_keep=torch.tensor([pair.predictor - start], device=device),
            extras=batch_extras(pair.extras, rows, suffix),
        )
    if past is not None and buffers is not None:
        buffers.restore(start, n)
    return metrics(logits[:, 0], target, foil)


def _replayed_chunk(replay, model, pair, acts, kinds, layers, k_idx, l_idx, p_idx, start, buffers, target, foil):
    hooks = _patch_hooks(pair, acts, kinds, layers, k_idx, l_idx, p_idx, start)
    first = int(layers[l_idx].min())
    with torch.no_grad(), model.hooks(hooks):
        logits = replay.logits(first, start, k_idx.numel(), pair.predictor, buffers)
    return metrics(logits, target, foil)


def _checked(replay: LayerReplay, model, pair: RowPair, expected: Tensor, buffers) -> "LayerReplay | str":
    """The replay, if re-running the last block on the read position's suffix gives the
    corrupted run's own logits; else why not (then every variant runs every layer)."""
    start = pair.predictor if buffers is not None else 0
    with torch.no_grad():
        got = replay.logits(model.n_layers - 1, start, 1, pair.predictor, buffers)[0]
    expected = expected.float()
    gap = float((got - expected).abs().max())
    if not gap <= 1e-4 * max(1.0, float(expected.abs().max())):
        return f"re-running the last block gives logits {gap:.3g} away from the model's own"
    return replay
