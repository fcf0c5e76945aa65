"""Attention knockout between token spans over windows of layers (Neo et al. 2024, Zhang et al. 2024).

In the layers of a window, the queries of one span may not attend to the keys of another:
their scores are masked before the softmax (see :mod:`vlens.analysis._attention_mask`), so
the blocked weights are exactly zero and each query's remaining weights renormalise. A query
is never blocked from its own position (a softmax over no key is undefined), so knocking out
every key of a query leaves it attending to itself alone. The measure is the answer's
log-probability: the sum over answer tokens of ``log p(token)`` (``-n * answer_loss``, the
one answer-loss definition of :mod:`vlens.analysis.knockout`), and its probability.

Reuse across a sweep of windows: positions before the first blocked query (or the first
answer predictor, whichever is earlier) are identical in every variant, in a language model
causal over the image. With ``engine="kv"`` the full sequence runs once with a key/value
cache, and every window runs only the suffix from there, windows batched; ``"naive"`` runs
the full sequence per window (also batched). Both give the same numbers; where the family's
contract rules the cache out (:func:`vlens.analysis.knockout.engine_for`) ``"naive"`` runs and
the result says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from vlens.analysis._attention_mask import Route, blocked_attention, knockout_route
from vlens.analysis._common import BatchedResult, long_frame, stack_rows, typechecked
from vlens.analysis._pairs import rows_of
from vlens.analysis._spans import SpanSpec, span_positions
from vlens.analysis.knockout import (
    ENGINES,
    Engine,
    RowProblem,
    _PrefixBuffers,
    answer_loss,
    engine_for,
    kept_extras,
    merge_runs,
    row_problems,
)
from vlens.errors import AnalysisInputError

if TYPE_CHECKING:
    from vlens.inputs import VLMInputs
    from vlens.model import HookedVLM


def required_hooks(model: "HookedVLM") -> list[str]:
    """Hooks read from a cache: none (knockout runs the model itself)."""
    return []


@typechecked
@dataclass(frozen=True, eq=False, repr=False)
class KnockoutResult(BatchedResult):
    """The answer's log-probability with ``query -> key`` attention blocked in windows of layers.

    Window ``i`` blocks layers ``window_start[i] .. window_start[i] + window_size[i] - 1``.
    ``logprob[b, i]`` is the answer's log-probability (sum over its tokens, natural log) in
    row ``b`` with that window blocked; ``clean_logprob[b]`` without any knockout. Deltas are
    knocked-out minus clean (negative: the flow mattered to the answer).

    Attributes:
        window_start, window_size: The windows, ``[window]``, shared by every row.
        logprob: ``[batch, window]``.
        clean_logprob: ``[batch]``.
        n_blocked: How many (query, key) pairs each row blocks per layer, ``[batch]`` (future keys
            included: a causal mask hides them already, a prefix-LM's image block does not).
        query, key: The spans, as given (a description for tensors).
        route: ``"scores"`` (``hook_attn_scores`` edited) or ``"mask"`` (the eager attention
            mask edited); see :mod:`vlens.analysis._attention_mask`.
        engine: ``"kv"`` (shared prefix) or ``"naive"``; ``engine_reason`` says why ``"kv"``
            did not run when it was asked for.
    """

    window_start: Int[Tensor, " window"]
    window_size: Int[Tensor, " window"]
    logprob: Float[Tensor, "batch window"]
    clean_logprob: Float[Tensor, " batch"]
    n_blocked: Int[Tensor, " batch"]
    query: str
    key: str
    route: Route
    engine: Engine
    engine_reason: str = ""

    @property
    def delta_logprob(self) -> Float[Tensor, "batch window"]:
        return self.logprob - self.clean_logprob[:, None]

    @property
    def prob(self) -> Float[Tensor, "batch window"]:
        return self.logprob.exp()

    @property
    def delta_prob(self) -> Float[Tensor, "batch window"]:
        return self.prob - self.clean_logprob.exp()[:, None]

    @property
    def relative_prob_drop(self) -> Float[Tensor, "batch window"]:
        """``1 - p_knocked / p_clean``: Neo et al.'s "drop" (0: no change, 1: answer gone)."""
        return 1.0 - (self.logprob - self.clean_logprob[:, None]).exp()

    def to_frame(self) -> pd.DataFrame:
        """Long format: batch, window, start, size, logprob, delta_logprob, prob, delta_prob."""
        frame = long_frame(
            {
                "logprob": self.logprob,
                "delta_logprob": self.delta_logprob,
                "prob": self.prob,
                "delta_prob": self.delta_prob,
            },
            dims=("window",),
        )
        frame.insert(2, "start", self.window_start.numpy()[frame["window"].to_numpy()])
        frame.insert(3, "size", self.window_size.numpy()[frame["window"].to_numpy()])
        frame["query"], frame["key"] = self.query, self.key
        return frame


def layer_windows(n_layers: int, sizes: Sequence[int] = (1,), stride: int = 1) -> list[tuple[int, int]]:
    """Every window of each size sliding over the layers: ``(start, size)`` pairs."""
    out = []
    for size in sizes:
        if not isinstance(size, int) or not 1 <= size <= n_layers:
            raise AnalysisInputError(f"window size {size!r} must be an int in 1..{n_layers}")
        out += [(start, size) for start in range(0, n_layers - size + 1, stride)]
    return out


def attention_knockout(
    model: "HookedVLM",
    inputs: "VLMInputs",
    query: SpanSpec = "predictor",
    key: SpanSpec = "image",
    windows: Optional[Sequence[tuple[int, int]]] = None,
    sizes: Sequence[int] = (1,),
    engine: Engine = "kv",
    batch_size: int = 16,
) -> KnockoutResult:
    """The answer's log-probability with attention from ``query`` to ``key`` blocked, per window.

    Args:
        model: A ``HookedVLM``.
        inputs: From ``model.prepare(image, prompt, answer=...)``; every row needs an answer.
        query, key: Spans: a segment name (``image``, ``instruction``, ``answer``, ``last``,
            ``predictor`` (the token predicting the first answer token), ...), a boolean mask
            (e.g. :func:`vlens.analysis._spans.grid_cells`) or positions.
        windows: ``(start, size)`` layer windows; default every window of ``sizes``.
        sizes: Window sizes when ``windows`` is not given.
        engine: ``"kv"`` (clean prefix shared) or ``"naive"``; same numbers.
        batch_size: Windows run together in one forward.
    """
    if engine not in ENGINES:
        raise AnalysisInputError(f"unknown engine {engine!r}; choose one of {list(ENGINES)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise AnalysisInputError(f"batch_size must be a positive int, got {batch_size!r}")
    n_layers = model.n_layers
    spans = windows if windows is not None else layer_windows(n_layers, sizes)
    for start, size in spans:
        if not (0 <= start and size >= 1 and start + size <= n_layers):
            raise AnalysisInputError(f"window (start={start}, size={size}) is outside layers 0..{n_layers - 1}")
    if not spans:
        raise AnalysisInputError("no window to run; pass windows=[(start, size), ...] or sizes")
    layout = inputs.layout
    # Spans are checked before any forward.
    queries = [span_positions(layout, query, row, "query") for row in range(layout.batch_size)]
    keys = [span_positions(layout, key, row, "key") for row in range(layout.batch_size)]
    route = knockout_route(model)
    problems = row_problems(model, inputs, "attention_knockout")
    active = torch.zeros(len(spans), n_layers, dtype=torch.bool)
    for i, (start, size) in enumerate(spans):
        active[i, start : start + size] = True
    rows, cleans, counts, runs = [], [], [], []
    for problem, q, k in zip(problems, queries, keys):
        logprob, clean, n_blocked, run = _row_knockout(model, problem, q, k, active, route, engine, batch_size)
        rows.append(logprob)
        cleans.append(clean)
        counts.append(n_blocked)
        runs.append(run)
    run = merge_runs(runs)
    return KnockoutResult(
        window_start=torch.tensor([s for s, _ in spans], dtype=torch.long),
        window_size=torch.tensor([w for _, w in spans], dtype=torch.long),
        logprob=stack_rows(rows),
        clean_logprob=torch.stack(cleans),
        n_blocked=torch.tensor(counts, dtype=torch.long),
        query=_describe(query),
        key=_describe(key),
        route=route,
        engine=run.engine,
        engine_reason=run.reason,
    )


def _describe(spec: SpanSpec) -> str:
    if isinstance(spec, str):
        return spec
    t = torch.as_tensor(spec)
    return f"mask({int(t.sum())})" if t.dtype == torch.bool else f"positions({t.numel()})"


def _row_knockout(
    model: "HookedVLM",
    problem: RowProblem,
    queries: Tensor,
    keys: Tensor,
    active: Tensor,
    route: Route,
    engine: Engine,
    batch_size: int,
):
    device = problem.embeds.device
    length = problem.ids.shape[0]
    block = torch.zeros(length, length, dtype=torch.bool)
    block[queries[:, None], keys[None, :]] = True
    block.fill_diagonal_(False)  # a query always keeps its own position
    n_blocked = int(block.sum())
    targets = problem.ids[problem.answer]
    n_answer = len(problem.answer)
    run = engine_for(model, length, engine)
    # Everything before the first blocked query (and the first answer predictor) is the clean run's.
    blocked_queries = block.any(1).nonzero().flatten()
    first = min(int(blocked_queries[0]) if blocked_queries.numel() else length, int(problem.answer[0]) - 1)
    with torch.no_grad():
        logits, cache = model.run_language_model(
            problem.embeds[None],
            problem.positions[None],
            attention_mask=torch.ones(1, length, dtype=torch.long, device=device),
            use_cache=run.engine == "kv",
            logits_to_keep=problem.answer - 1,
            extras=kept_extras(problem, None),
        )
        clean = -answer_loss(logits[0], targets) * n_answer
        buffers = None
        if run.engine == "kv" and first > 0:
            kv = [(layer.keys, layer.values) for layer in cache.layers] if cache is not None else []
            if not kv or any(k is None or int(k.shape[-2]) != length for k, _ in kv):
                from vlens.analysis.knockout import _unexpected

                run = _unexpected(model, f"the full sequence's key/value cache does not hold {length} positions")
            else:
                buffers = _PrefixBuffers(kv, min(batch_size, active.shape[0]), length)
        start = first if buffers is not None else 0
        out = torch.full((active.shape[0],), float("nan"))
        for chunk in torch.arange(active.shape[0]).split(batch_size):
            out[chunk] = _chunk_logprob(model, problem, block, active[chunk], start, buffers, route).cpu()
    return out, clean.float().cpu(), n_blocked, run


def _chunk_logprob(
    model: "HookedVLM",
    problem: RowProblem,
    block: Tensor,
    active: Tensor,
    start: int,
    buffers: Optional[_PrefixBuffers],
    route: Route,
) -> Float[Tensor, " rows"]:
    device = problem.embeds.device
    rows = active.shape[0]
    length = problem.ids.shape[0]
    per_layer = {
        layer: (block[None] & active[:, layer, None, None]).to(device)
        for layer in range(active.shape[1])
        if bool(active[:, layer].any())
    }
    suffix = slice(start, length)
    extras = kept_extras(problem, None)
    past = buffers.cache(rows, start) if buffers is not None else None
    with blocked_attention(model, per_layer, route):
        logits, _ = model.run_language_model(
            problem.embeds[None, suffix].expand(rows, -1, -1),
            problem.positions[None, ..., suffix].expand(rows, *problem.positions.shape[:-1], -1),
            attention_mask=torch.ones(rows, length, dtype=torch.long, device=device),
            past_key_values=past,
            use_cache=past is not None,
            logits_to_keep=problem.answer - 1 - start,
            extras=None if extras is None else {n: rows_of(v[:, suffix], rows) for n, v in extras.items()},
        )
    if buffers is not None:
        buffers.restore(start, length)
    targets = problem.ids[problem.answer]
    return -answer_loss(logits, targets[None].expand(rows, -1)) * len(targets)
