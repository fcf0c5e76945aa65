"""Views of the causal tools: patching effects over the image per layer, knockout windows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import numpy as np
import PIL.Image
import torch

from vlens.errors import AnalysisInputError
from vlens.viz._mpl import new_figure
from vlens.viz.heatmap import heatmap_grid

if TYPE_CHECKING:
    from vlens.analysis.attribution import AttributionResult
    from vlens.analysis.flow_knockout import KnockoutResult
    from vlens.analysis.patching import PatchingResult
    from vlens.layout import TokenLayout

PatchValue = Literal["logit_diff", "prob", "normalized"]


def patching_values(
    result: "Union[PatchingResult, AttributionResult]", layout: "TokenLayout", kind: str, value: str, row: int = 0, image: int = 0
) -> list[tuple[str, torch.Tensor]]:
    """Per layer, one value per token of image ``image`` (NaN where a token was not patched)."""
    if kind not in result.kinds:
        raise AnalysisInputError(f"this result has kinds {list(result.kinds)}, not {kind!r}")
    k = result.kinds.index(kind)
    values = getattr(result, value)[row, k].float()  # [layer, pos]
    span = layout.images[row][image]
    positions = result.positions[row]
    index = {int(p): i for i, p in enumerate(positions.tolist()) if p >= 0}
    hit = [index.get(int(p)) for p in span.positions.tolist()]
    if all(h is None for h in hit):
        raise AnalysisInputError(f"the result patched none of image {image}'s tokens; patch positions='image'")
    out = []
    for l, layer in enumerate(result.layers.tolist()):
        per_token = torch.tensor([float("nan") if h is None else float(values[l, h]) for h in hit])
        out.append((f"layer {layer}", per_token))
    return out


def patching_heatmaps(
    result: "Union[PatchingResult, AttributionResult]",
    layout: "TokenLayout",
    image: Optional[PIL.Image.Image] = None,
    *,
    kind: str = "resid_pre",
    value: str = "normalized",
    row: int = 0,
    ncols: int = 4,
) -> Any:
    """One heatmap over the image per layer: the effect of patching each visual token's
    ``kind`` activation (``value``: ``"logit_diff"``, ``"prob"`` or ``"normalized"`` for
    patching, ``"estimate"`` for attribution). Query tokens without a grid are spread over
    the patches they attend to (:meth:`vlens.layout.ImageSpan.to_grid`)."""
    panels = patching_values(result, layout, kind, value, row)
    return heatmap_grid(panels, layout.images[row][0], image, label=f"{kind}: {value}", cmap="RdBu_r", ncols=ncols)


def knockout_figure(result: "KnockoutResult", row: int = 0, value: str = "delta_logprob") -> Any:
    """The knockout's effect against the window's first layer, one line per window size."""
    values = getattr(result, value)[row].float().numpy()
    fig = new_figure(5.0, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    starts, sizes = result.window_start.numpy(), result.window_size.numpy()
    for size in np.unique(sizes):
        pick = sizes == size
        ax.plot(starts[pick], values[pick], marker="o", label=f"{size} layer{'s' if size > 1 else ''}")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("first layer of the window")
    ax.set_ylabel(value.replace("_", " "))
    ax.set_title(f"knockout {result.query} -> {result.key}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
