"""Layer curves and the other small figures of the analyses.

Layer axis (DESIGN.md): per-layer residual-stream results have ``n_layers + 1`` entries,
index 0 the input embeddings (``blocks.0.hook_resid_pre``) and index l the output of
block l-1; their x axis is labelled "embeddings, 1, 2, ...". Per-block results
(attention mass of block l's heads) have ``n_layers`` entries and an x axis of block
indices; :func:`layer_curve` says which in its axis label.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from vlens.errors import AnalysisInputError
from vlens.viz._mpl import colormap, new_figure

Axis = Literal["resid", "block"]


def _np(values: Any) -> np.ndarray:
    return torch.as_tensor(values).detach().float().cpu().numpy()


def layer_ticks(n: int, axis: Axis = "resid", max_ticks: int = 12) -> tuple[list[int], list[str]]:
    """Tick positions and labels for a layer axis of ``n`` entries."""
    step = max(1, int(np.ceil(n / max_ticks)))
    ticks = list(range(0, n, step))
    if ticks[-1] != n - 1:
        ticks.append(n - 1)
    if axis == "resid":
        return ticks, ["emb" if t == 0 else str(t) for t in ticks]
    return ticks, [str(t) for t in ticks]


def layer_curve(
    curves: Union[Mapping[str, Any], Any],
    *,
    axis: Axis = "resid",
    ylabel: str = "value",
    title: Optional[str] = None,
    ylim: Optional[tuple[float, float]] = None,
    size: tuple[float, float] = (6.0, 3.4),
) -> Any:
    """Per-layer curves on one axes.

    Args:
        curves: ``{name: values}`` with one value per layer each, or a single tensor.
        axis: ``"resid"`` (n_layers + 1 entries, index 0 = embeddings) or ``"block"``
            (one entry per transformer block).
        ylabel: Label of the y axis.
        title: Axes title.
        ylim: Limits of the y axis.
        size: Figure size in inches.
    """
    if not isinstance(curves, Mapping):
        curves = {ylabel: curves}
    if not curves:
        raise AnalysisInputError("layer_curve needs at least one curve")
    fig = new_figure(*size)
    ax = fig.add_subplot(1, 1, 1)
    n_max = 0
    for name, values in curves.items():
        y = _np(values).reshape(-1)
        n_max = max(n_max, y.size)
        ax.plot(np.arange(y.size), y, marker="o", markersize=3, label=str(name))
    ticks, labels = layer_ticks(n_max, axis)
    ax.set_xticks(ticks, labels)
    ax.set_xlabel("residual stream after layer (emb = input embeddings)" if axis == "resid" else "transformer block")
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title, fontsize=10)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def similarity_figure(result: Any, title: Optional[str] = None) -> Any:
    """The per-layer curve of a ``SimilarityResult`` (``per_layer``, n_layers + 1 entries)."""
    against = getattr(result, "against", None)
    label = "cosine similarity" + (f" to {against}" if isinstance(against, str) else "")
    per_layer = _np(result.per_layer)
    if per_layer.ndim == 2:  # batched: mean over the batch
        per_layer = per_layer.mean(0)
    return layer_curve({"image tokens": per_layer}, axis="resid", ylabel=label,
                       title=title or "Visual tokens vs text: similarity per layer")


def attention_mass_figure(result: Any, title: Optional[str] = None, cmap: str = "viridis") -> Any:
    """An ``AttentionResult``: mass on image keys per layer and head, and its mean per layer."""
    mass = _np(result.mass)
    if mass.ndim == 3:  # batched: mean over the batch
        mass = mass.mean(0)
    if mass.ndim != 2:
        raise AnalysisInputError(f"AttentionResult.mass must be [layer, head], got shape {mass.shape}")
    n_layers, n_heads = mass.shape
    fig = new_figure(10.0, 3.6)
    ax1 = fig.add_subplot(1, 2, 1)
    im = ax1.imshow(mass.T, aspect="auto", cmap=colormap(cmap), vmin=0.0, vmax=1.0, origin="lower")
    ax1.set_xlabel("transformer block")
    ax1.set_ylabel("head")
    ticks, labels = layer_ticks(n_layers, "block")
    ax1.set_xticks(ticks, labels)
    head_ticks, head_labels = layer_ticks(n_heads, "block", max_ticks=16)
    ax1.set_yticks(head_ticks, head_labels)
    ax1.set_title("attention mass on image tokens (0 to 1)", fontsize=10)
    fig.colorbar(im, ax=ax1, fraction=0.046)
    ax2 = fig.add_subplot(1, 2, 2)
    ax2.plot(np.arange(n_layers), mass.mean(1), marker="o", markersize=3, label="mean over heads")
    ax2.plot(np.arange(n_layers), mass.max(1), marker=".", linestyle="--", label="max over heads")
    ax2.set_xticks(ticks, labels)
    ax2.set_xlabel("transformer block")
    ax2.set_ylabel("share of attention on image tokens")
    ax2.set_ylim(0, 1.02)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def count_curve_figure(result: Any, title: Optional[str] = None) -> Any:
    """A ``CountCurveResult``: answer loss against the number of visual tokens kept."""
    counts = _np(result.counts)
    loss = _np(result.loss)
    if loss.ndim == 2:
        loss = loss.mean(0)
    fig = new_figure(6.0, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(counts, loss, marker="o", markersize=4)
    ax.set_xlabel("visual tokens kept")
    ax.set_ylabel("answer loss (mean CE, nats)")
    order = getattr(result, "order", None)
    ax.set_title(title or f"Loss vs visual-token count{f' ({order} order)' if isinstance(order, str) else ''}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def bar_figure(labels: Sequence[str], values: Any, *, ylabel: str, title: Optional[str] = None) -> Any:
    """A plain bar chart (e.g. contributions of query tokens, which have no grid)."""
    y = _np(values).reshape(-1)
    fig = new_figure(max(4.0, 0.25 * y.size + 1.5), 3.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(np.arange(y.size), y)
    ax.set_xticks(np.arange(y.size), list(labels), rotation=90, fontsize=6)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
