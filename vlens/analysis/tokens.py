"""How many visual tokens the answer needs, and which ones it uses.

Both analyses measure the answer's loss: the mean cross-entropy (natural log) of the
answer tokens, each predicted from the position before it, computed in float32.
Removing a visual token means the model is given the sequence without it, later tokens
moving one position earlier (see :mod:`vlens.analysis.knockout`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional, Sequence, Union

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from vlens.analysis._common import BatchedResult, long_frame, stack_rows, typechecked
from vlens.analysis.knockout import (
    ENGINES,
    Engine,
    answer_loss,
    kept_extras,
    merge_runs,
    row_problems,
    variant_losses,
)
from vlens.errors import AnalysisInputError

if TYPE_CHECKING:
    from vlens.analysis.knockout import RowProblem
    from vlens.inputs import VLMInputs
    from vlens.model import HookedVLM

Order = Union[Literal["raster", "random"], Sequence[int], Tensor]
Estimator = Literal["drop", "gradient"]
ESTIMATORS = ("drop", "gradient")


def required_hooks(model: "HookedVLM") -> list[str]:
    """Hooks these analyses read from a cache: none (they run the model themselves)."""
    return []


@typechecked
@dataclass(frozen=True, eq=False, repr=False)
class CountCurveResult(BatchedResult):
    """Answer loss as a function of how many visual tokens the model is given.

    ``loss[i]`` is the answer loss when only the first ``counts[i]`` image tokens of
    ``order`` are kept and every other image token is removed from the sequence (later
    positions shift down, as if the model had been given only those tokens). Image
    tokens are all of a row's image positions (every image, separators included).

    ``loss``, ``full_loss`` and ``order`` have a leading ``batch`` axis, whatever the batch
    size; ``counts`` is shared, and ``loss`` is NaN where a count exceeds a row's image
    tokens. ``row(b)`` gives one example's values.

    Attributes:
        counts: How many image tokens are kept, ``[n]``.
        loss: Mean cross-entropy over the answer tokens, ``[batch, n]``.
        full_loss: The loss with every image token kept.
        order: Image-token sequence positions in the order they are kept.
        engine: The engine that ran: ``"kv"`` (prefix reuse) or ``"naive"`` (one forward
            per count).
        engine_reason: Why ``"kv"`` did not run when it was asked for (empty otherwise).
    """

    ragged = {"img": "order"}

    counts: Int[Tensor, " n"]
    loss: Float[Tensor, "batch n"]
    full_loss: Float[Tensor, " batch"]
    order: Int[Tensor, "batch img"]
    engine: Engine
    engine_reason: str = ""

    def to_frame(self) -> pd.DataFrame:
        """Long format: batch, count, loss."""
        return long_frame({"loss": self.loss}, dims=("count",), coords={"count": self.counts})


@typechecked
@dataclass(frozen=True, eq=False, repr=False)
class ContributionResult(BatchedResult):
    """How much each visual token matters to the answer.

    ``estimator="drop"``: ``delta_loss[i]`` is the answer loss with image token i alone
    removed from the sequence, minus the loss with every token (positive: the answer
    needed it).

    ``estimator="gradient"``: the first-order (Taylor) estimate of that change for zeroing
    the token's input embedding instead of removing it:
    ``delta_loss[i] = grad_e L · (0 - e_i)`` with ``e_i`` the merged input embedding at
    the token's position and ``grad_e L`` the gradient of the answer loss there, from
    one forward and one backward pass.

    Every field but the names has a leading ``batch`` axis (ragged image axes padded at the
    end with NaN / -1); ``row(b)`` gives one example's values.

    Attributes:
        delta_loss: ``[batch, img]``.
        image_positions: Sequence position of each ``img`` entry.
        full_loss: The answer loss with every token, ``[batch]``.
        estimator: ``"drop"`` or ``"gradient"``.
        engine: For ``"drop"``, the engine that ran (``"kv"`` or ``"naive"``); None for
            ``"gradient"``, which removes nothing.
        engine_reason: Why ``"kv"`` did not run when it was asked for (empty otherwise).
    """

    ragged = {"img": "image_positions"}

    delta_loss: Float[Tensor, "batch img"]
    image_positions: Int[Tensor, "batch img"]
    full_loss: Float[Tensor, " batch"]
    estimator: Estimator
    engine: Optional[Engine] = None
    engine_reason: str = ""

    def to_frame(self) -> pd.DataFrame:
        """Long format: batch, pos (sequence position), delta_loss; ``estimator`` names the estimate."""
        frame = long_frame({"delta_loss": self.delta_loss}, dims=("pos",), coords={"pos": self.image_positions})
        frame["estimator"] = self.estimator
        return frame


def _order(order: Order, n: int, seed: int, row: int) -> Tensor:
    if isinstance(order, str):
        if order == "raster":
            return torch.arange(n)
        if order == "random":
            return torch.randperm(n, generator=torch.Generator().manual_seed(seed + row))
        raise AnalysisInputError(f"unknown order {order!r}; choose 'raster', 'random' or a permutation of 0..n-1")
    perm = torch.as_tensor(order)
    if perm.dtype.is_floating_point or perm.dtype == torch.bool or perm.ndim != 1:
        raise AnalysisInputError(f"order must be 'raster', 'random' or a 1-d permutation of ints, got {perm!r}")
    perm = perm.long().cpu()
    if perm.numel() != n or not torch.equal(perm.sort().values, torch.arange(n)):
        raise AnalysisInputError(
            f"order {perm.tolist()[:12]}{'...' if perm.numel() > 12 else ''} is not a permutation of 0..{n - 1} "
            f"(row {row} has {n} image tokens)"
        )
    return perm


def _counts(counts: Optional[Sequence[int]], n_max: int) -> Tensor:
    if counts is None:
        return torch.arange(n_max + 1)
    t = torch.as_tensor(counts)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.ndim != 1 or t.numel() == 0:
        raise AnalysisInputError(f"counts must be a non-empty 1-d list of ints, got {counts!r}")
    t = t.long().cpu()
    bad = t[(t < 0) | (t > n_max)]
    if bad.numel():
        raise AnalysisInputError(f"counts {bad.tolist()} are out of range; a row has at most {n_max} image tokens (0..{n_max})")
    return t


def token_count_curve(
    model: "HookedVLM",
    inputs: "VLMInputs",
    counts: Optional[Sequence[int]] = None,
    order: Order = "raster",
    engine: Engine = "kv",
    seed: int = 0,
    batch_size: int = 32,
) -> CountCurveResult:
    """Answer loss when only k visual tokens are kept, for each k (see :class:`CountCurveResult`).

    Args:
        model: A ``HookedVLM``.
        inputs: From ``model.prepare(image, prompt, answer=...)``; every row needs an answer.
        counts: The k values (default every k from 0 to the number of image tokens).
        order: ``"raster"`` (sequence order), ``"random"`` (seeded by ``seed`` plus the
            row index) or a permutation of ``0..n-1`` (indices into the row's image
            tokens in sequence order), shared by every row.
        engine: ``"kv"`` computes the full sequence's key/value cache once and runs
            only each count's suffix, batched (with the raster order the suffix is the
            text after the image); ``"naive"`` runs one full forward per count. Both give
            the same losses. Families whose language model is not causal over the image
            fall back to ``"naive"`` (``engine`` and ``engine_reason`` in the result say
            which ran and why).
        seed: Seed of the random order.
        batch_size: At most how many counts run together with ``"kv"`` (a batch also
            stays within ``knockout.MAX_TOKENS`` padded suffix tokens).
    """
    if engine not in ENGINES:
        raise AnalysisInputError(f"unknown engine {engine!r}; choose one of {list(ENGINES)}")
    problems = row_problems(model, inputs, "token_count_curve")
    n_max = max(p.image.numel() for p in problems)
    ks = _counts(counts, n_max)
    losses, fulls, orders, runs = [], [], [], []
    for row, problem in enumerate(problems):
        n = problem.image.numel()
        perm = _order(order, n, seed, row)
        ranked = problem.image.cpu()[perm]
        keeps = torch.ones(len(ks), problem.ids.shape[0], dtype=torch.bool)
        valid = ks <= n
        for i, k in enumerate(ks.tolist()):
            if k <= n:
                keeps[i, ranked[k:]] = False
        row_loss = torch.full((len(ks),), float("nan"))
        everything = torch.ones(1, problem.ids.shape[0], dtype=torch.bool)
        found, run = variant_losses(
            model, problem, torch.cat([keeps[valid], everything]), engine=engine, batch_size=batch_size
        )
        row_loss[valid] = found[:-1]
        losses.append(row_loss)
        fulls.append(found[-1])
        orders.append(ranked)
        runs.append(run)
    run = merge_runs(runs)
    return CountCurveResult(
        counts=ks,
        loss=stack_rows(losses),
        full_loss=stack_rows(fulls),
        order=stack_rows(orders),
        engine=run.engine,
        engine_reason=run.reason,
    )


def token_contributions(
    model: "HookedVLM",
    inputs: "VLMInputs",
    estimator: Estimator = "drop",
    engine: Engine = "kv",
    batch_size: int = 32,
) -> ContributionResult:
    """The answer-loss change from removing each visual token (see :class:`ContributionResult`).

    Args:
        model: A ``HookedVLM``.
        inputs: From ``model.prepare(image, prompt, answer=...)``; every row needs an answer.
        estimator: ``"drop"`` removes each token in turn; ``"gradient"`` is the
            one-backward first-order estimate.
        engine: For ``"drop"``: ``"kv"`` shares the prefix before each dropped token
            (one full forward, then each token's suffix, batched); ``"naive"`` runs one
            full forward per token. Same losses.
        batch_size: At most how many dropped tokens run together with ``"kv"`` (a batch
            also stays within ``knockout.MAX_TOKENS`` padded suffix tokens).
    """
    if estimator not in ESTIMATORS:
        raise AnalysisInputError(f"unknown estimator {estimator!r}; choose one of {list(ESTIMATORS)}")
    if engine not in ENGINES:
        raise AnalysisInputError(f"unknown engine {engine!r}; choose one of {list(ENGINES)}")
    problems = row_problems(model, inputs, "token_contributions")
    deltas, fulls, positions, runs = [], [], [], []
    for problem in problems:
        if estimator == "gradient":
            delta, full = _gradient(model, problem)
        else:
            n = problem.image.numel()
            keeps = torch.ones(n + 1, problem.ids.shape[0], dtype=torch.bool)  # the last keeps everything
            keeps[torch.arange(n), problem.image.cpu()] = False
            found, run = variant_losses(model, problem, keeps, engine=engine, batch_size=batch_size)
            runs.append(run)
            full = found[-1]
            delta = found[:-1] - full
        deltas.append(delta.float().cpu())
        fulls.append(torch.tensor(float(full)))
        positions.append(problem.image.cpu())
    run = merge_runs(runs) if runs else None
    return ContributionResult(
        delta_loss=stack_rows(deltas),
        image_positions=stack_rows(positions),
        full_loss=stack_rows(fulls),
        estimator=estimator,
        engine=None if run is None else run.engine,
        engine_reason="" if run is None else run.reason,
    )


def _gradient(model: "HookedVLM", problem: "RowProblem") -> tuple[Tensor, float]:
    embeds = problem.embeds.detach().float().requires_grad_(True)
    with torch.enable_grad():
        logits, _ = model.run_language_model(
            embeds[None], problem.positions[None], logits_to_keep=problem.answer - 1, extras=kept_extras(problem, None)
        )
        loss = answer_loss(logits[0], problem.ids[problem.answer])
        (grad,) = torch.autograd.grad(loss, embeds)
    e = problem.embeds[problem.image].float()
    delta = (grad[problem.image].float() * (0.0 - e)).sum(-1)
    return delta.detach(), float(loss.detach())
