"""Attribution patching: the first-order estimate of activation patching from two forwards and one backward.

For an activation ``a`` (kind, layer, position) the effect of patching the clean value into
the corrupted run is estimated by the metric's gradient on the corrupted run:
``metric(patched) - metric(corrupted) ~= (a_clean - a_corrupted) . d metric / d a``, from one
clean forward (the clean activations), one corrupted forward and one backward (every
gradient at once; ``torch.autograd.grad`` computes none for the weights). How well it ranks
the positions as exact patching does is measured, not assumed: :func:`rank_agreement` gives
the Spearman correlation with a :class:`~vlens.analysis.patching.PatchingResult`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from vlens.analysis._common import BatchedResult, long_frame, stack_rows, typechecked
from vlens.analysis._pairs import KINDS, METRICS, Metric, TokenSpec, batch_extras, hook_name, metrics
from vlens.analysis._spans import SpanSpec
from vlens.analysis.patching import PatchingResult, _setup, clean_activations
from vlens.errors import AnalysisInputError

if TYPE_CHECKING:
    from vlens.inputs import VLMInputs
    from vlens.model import HookedVLM


@typechecked
@dataclass(frozen=True, eq=False, repr=False)
class AttributionResult(BatchedResult):
    """Estimated change of the metric when each clean activation is patched into the corrupted run.

    Attributes:
        metric: ``"logit_diff"`` or ``"prob"``, the metric differentiated.
        kinds, layers, positions: As in :class:`~vlens.analysis.patching.PatchingResult`.
        estimate: ``[batch, kind, layer, pos]``, patched minus corrupted, first order.
        clean_metric, corrupted_metric: The unpatched runs' metric, ``[batch]``.
        target, foil: Token ids per row (``foil`` -1 without one).
    """

    ragged = {"pos": "positions"}

    metric: str
    kinds: tuple[str, ...]
    layers: Int[Tensor, " layer"]
    positions: Int[Tensor, "batch pos"]
    estimate: Float[Tensor, "batch kind layer pos"]
    clean_metric: Float[Tensor, " batch"]
    corrupted_metric: Float[Tensor, " batch"]
    target: Int[Tensor, " batch"]
    foil: Int[Tensor, " batch"]

    def to_frame(self) -> pd.DataFrame:
        """Long format: batch, kind, layer, pos (sequence position), estimate."""
        frame = long_frame(
            {"estimate": self.estimate},
            dims=("kind", "layer", "pos"),
            coords={"layer": self.layers, "pos": self.positions},
        )
        frame["kind"] = [self.kinds[k] for k in frame["kind"]]
        frame["metric"] = self.metric
        return pd.DataFrame(frame[frame["pos"] >= 0]).reset_index(drop=True)


def attribution_patching(
    model: "HookedVLM",
    clean: "VLMInputs",
    corrupted: "VLMInputs",
    target: TokenSpec = None,
    foil: TokenSpec = None,
    metric: Metric = "logit_diff",
    positions: SpanSpec = "image",
    kinds: Sequence[str] = KINDS,
    layers: Optional[Sequence[int]] = None,
) -> AttributionResult:
    """The gradient estimate of :func:`~vlens.analysis.patching.activation_patching` (same arguments)."""
    if metric not in METRICS:
        raise AnalysisInputError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
    kinds_t, layer_t, pairs, targets, foils = _setup(model, clean, corrupted, target, foil, positions, kinds, layers, "naive", 1)
    if metric == "logit_diff" and foils is None:
        raise AnalysisInputError("metric='logit_diff' needs a foil: pass foil= (a token or id), or use metric='prob'")
    estimates, cleans, corrupts = [], [], []
    for row, pair in enumerate(pairs):
        foil_id = None if foils is None else int(foils[row])
        acts, clean_logits = clean_activations(model, pair, kinds_t, layer_t)
        captured: dict[tuple[int, int], Tensor] = {}

        def grab(k: int, l: int):
            def fn(x: Any, hook: Any) -> None:
                captured[(k, l)] = x
                return None

            return fn

        hooks = [(hook_name(kind, int(layer)), grab(k, i)) for k, kind in enumerate(kinds_t) for i, layer in enumerate(layer_t)]
        n = pair.corrupted.shape[0]
        device = pair.corrupted.device
        embeds = pair.corrupted.detach().clone().requires_grad_(True)  # the graph starts here
        with torch.enable_grad(), model.hooks(hooks):
            logits, _ = model.run_language_model(
                embeds[None],
                pair.positions[None],
                attention_mask=torch.ones(1, n, dtype=torch.long, device=device),
                logits_to_keep=torch.tensor([pair.predictor], device=device),
                extras=batch_extras(pair.extras, 1, slice(0, n)),
            )
            diff, prob = metrics(logits[0], int(targets[row]), foil_id)
            value = (diff if metric == "logit_diff" else prob)[0]
            order = [(k, i) for k in range(len(kinds_t)) for i in range(len(layer_t))]
            grads = torch.autograd.grad(value, [captured[key] for key in order], allow_unused=True)
        estimate = torch.zeros(len(kinds_t), len(layer_t), pair.patch.numel())
        for (k, i), grad in zip(order, grads):
            if grad is None:  # the activation does not reach the read position
                continue
            corrupted_act = captured[(k, i)][0, pair.patch].detach().float()
            estimate[k, i] = ((acts[k, i].float() - corrupted_act) * grad[0, pair.patch].float()).sum(-1).cpu()
        clean_diff, clean_prob = metrics(clean_logits[None], int(targets[row]), foil_id)
        estimates.append(estimate)
        cleans.append((clean_diff if metric == "logit_diff" else clean_prob)[0].detach().cpu())
        corrupts.append(value.detach().float().cpu())
    return AttributionResult(
        metric=metric,
        kinds=kinds_t,
        layers=layer_t,
        positions=stack_rows([p.patch.cpu() for p in pairs]),
        estimate=stack_rows(estimates),
        clean_metric=torch.stack(cleans),
        corrupted_metric=torch.stack(corrupts),
        target=targets,
        foil=foils if foils is not None else torch.full_like(targets, -1),
    )


def rank_agreement(attribution: AttributionResult, exact: PatchingResult) -> Float[Tensor, "batch kind"]:
    """Spearman's rank correlation, per row and kind, between the estimate and exact patching's
    effect (patched minus corrupted, of the same metric) over every layer and position."""
    if attribution.kinds != exact.kinds or not torch.equal(attribution.layers, exact.layers):
        raise AnalysisInputError(
            f"the results cover different activations: kinds {attribution.kinds} / {exact.kinds}, "
            f"layers {attribution.layers.tolist()} / {exact.layers.tolist()}"
        )
    if not torch.equal(attribution.positions, exact.positions):
        raise AnalysisInputError("the results patch different positions; run both with the same positions=")
    values = exact.logit_diff if attribution.metric == "logit_diff" else exact.prob
    base = exact.corrupted_logit_diff if attribution.metric == "logit_diff" else exact.corrupted_prob
    effect = values - base[:, None, None, None]
    out = torch.full((attribution.batch_size, len(attribution.kinds)), float("nan"))
    for b in range(attribution.batch_size):
        keep = attribution.positions[b] >= 0
        for k in range(len(attribution.kinds)):
            out[b, k] = spearman(attribution.estimate[b, k][:, keep].flatten(), effect[b, k][:, keep].flatten())
    return out


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rho (average ranks for ties) of two 1-d tensors."""
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


def _ranks(x: Tensor) -> Tensor:
    ranks = torch.empty_like(x)
    ranks[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
    _, group = x.unique(return_inverse=True)  # ties share their mean rank
    sums = torch.zeros(int(group.max()) + 1, dtype=x.dtype).scatter_add(0, group, ranks)
    return (sums / torch.bincount(group).to(x.dtype))[group]
