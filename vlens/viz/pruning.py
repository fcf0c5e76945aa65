"""Views of the pruning and contextual-lens results (figures only: no printing, no state)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Optional

import pandas as pd

from vlens.viz._mpl import new_figure
from vlens.viz.lens_panel import decoder, lens_panel

if TYPE_CHECKING:
    from vlens.analysis.contextual import ContextualLensResult
    from vlens.analysis.pruning import PruningResult
    from vlens.layout import TokenLayout


def pruning_figure(result: "PruningResult", row: Optional[int] = None) -> Any:
    """Answer loss (left) and exact-match accuracy (right) against the fraction of visual tokens
    kept, one line per ranking and K; the batch mean unless ``row`` is given."""
    loss = result.loss.float() if row is None else result.loss[row : row + 1].float()
    exact = result.exact.float() if row is None else result.exact[row : row + 1].float()
    loss, acc = loss.nanmean(0), exact.mean(0)  # [ranking, layer, keep]
    keep = result.keep.tolist()
    fig = new_figure(9.0, 3.4)
    ax_loss, ax_acc = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    styles = ["-", "--", ":", "-."]
    for r, name in enumerate(result.rankings):
        for j, k in enumerate(result.layers.tolist()):
            label = f"{name}, K={k}"
            style = styles[j % len(styles)]
            ax_loss.plot(keep, loss[r, j].tolist(), style, marker="o", color=f"C{r}", label=label)
            ax_acc.plot(keep, acc[r, j].tolist(), style, marker="o", color=f"C{r}", label=label)
    full = float(result.full_loss.float().nanmean()) if row is None else float(result.full_loss[row])
    ax_loss.axhline(full, color="grey", lw=0.8, label="unpruned")
    ax_loss.set_xlabel("fraction of visual tokens kept after layer K")
    ax_loss.set_ylabel("answer loss (nats)")
    ax_acc.set_xlabel("fraction of visual tokens kept after layer K")
    ax_acc.set_ylabel("exact-match accuracy")
    ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.legend(fontsize=7, loc="lower right")
    fig.suptitle("Visual-token pruning (FastV): blocks >= K see only the kept tokens", fontsize=10)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.15, top=0.88, wspace=0.3)
    return fig


def pruning_summary(result: "PruningResult") -> pd.DataFrame:
    """One row per ranking, K and keep fraction: mean loss, accuracy and FLOPs ratio over the batch."""
    frame = result.to_frame()
    return (
        frame.groupby(["ranking", "layer", "keep"], sort=False)
        .agg(kept=("kept", "mean"), loss=("loss", "mean"), accuracy=("exact", "mean"), flops_ratio=("flops_ratio", "mean"))
        .reset_index()
    )


def contextual_panel(result: "ContextualLensResult", layout: "TokenLayout", tokenizer: Any, row: int = 0) -> Any:
    """The lens panel of the contextual lens: each visual token's nearest bank word per layer,
    shaded by its cosine similarity."""
    view = SimpleNamespace(
        top_ids=result.top_ids[row],
        top_logprobs=result.top_similarity[row].clamp_min(1e-6).log(),  # the panel shades by exp(.)
        positions=result.positions[row],
        layers=result.layers,
    )
    fig = lens_panel(view, layout, tokenizer, row=row)
    fig.suptitle("Contextual lens: nearest bank word per visual token, shade = cosine similarity", fontsize=10)
    return fig


def contextual_summary(result: "ContextualLensResult", layout: "TokenLayout", tokenizer: Any,
                       lens: Optional[Any] = None, row: int = 0) -> pd.DataFrame:
    """Per layer, the most frequent nearest words and mean top-1 cosine (and, beside them, the
    logit lens's match rate when ``lens`` is given, with the contextual lens's own)."""
    decode = decoder(tokenizer)
    one = result.row(row)
    rows = []
    for i, layer in enumerate(one.layers.tolist()):
        counts = pd.Series([decode(int(t)) for t in one.top_ids[i, :, 0].tolist()]).value_counts().head(3)
        entry = {"layer": layer, "nearest words (count)": ", ".join(f"{w} ({n})" for w, n in counts.items()),
                 "mean top-1 cosine": float(one.top_similarity[i, :, 0].mean())}
        if one.match_rate is not None:
            entry["contextual match rate"] = float(one.match_rate[i])
        if lens is not None and getattr(lens, "match_rate", None) is not None:
            entry["logit-lens match rate"] = float(lens.match_rate[row, i])
        rows.append(entry)
    return pd.DataFrame(rows)

