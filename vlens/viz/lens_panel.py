"""The logit-lens panel: per layer, each visual token's top decoded word, on the image grid.

One small map per layer (layer axis as in DESIGN.md: 0 is the input embeddings, l the
output of block l-1). Each cell is a visual token at its (row, col); its text is the
lens's top-1 word and its shade the top-1 probability. Query tokens (a connector's learned
queries) have no grid: they are laid out in query order on a near-square grid, and the
panel says so, calling them what their span calls them (``ImageSpan.tokens_name``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union, cast

import numpy as np
import torch

from vlens.errors import AnalysisInputError
from vlens.viz._mpl import colormap, new_figure

if TYPE_CHECKING:
    from vlens.layout import TokenLayout

Decoder = Union[Callable[[int], str], Any]
MAX_WORD = 8  # characters of a word drawn in a cell


def decoder(tokenizer_or_fn: Decoder) -> Callable[[int], str]:
    """A function id -> readable word from a tokenizer (or a function, returned as is)."""
    if callable(tokenizer_or_fn) and not hasattr(tokenizer_or_fn, "decode"):
        return cast(Callable[[int], str], tokenizer_or_fn)  # the caller's own id -> word function
    tok = tokenizer_or_fn

    def decode(token_id: int) -> str:
        text = tok.decode([int(token_id)], clean_up_tokenization_spaces=False)
        return text.strip() or repr(text)

    return decode


def layer_labels(n: int, layers: Optional[Sequence[int]] = None) -> list[str]:
    """Labels of residual-stream layer indices (0 = embeddings)."""
    idx = list(range(n)) if layers is None else list(layers)
    return ["embeddings" if l == 0 else f"layer {l}" for l in idx]


def lens_grid(
    result: Any,
    layout: "TokenLayout",
    decode: Decoder,
    *,
    row: int = 0,
    image: int = 0,
) -> tuple[list[int], np.ndarray, np.ndarray, tuple[int, int], bool]:
    """The panel's data: per layer, per cell, the top-1 word and its probability.

    Returns:
        ``(layers, words[layer, rows, cols], probs[layer, rows, cols], (rows, cols),
        on_grid)``; cells without an analysed token hold ``""`` and NaN. ``on_grid`` is
        False for query tokens laid out in query order.
    """
    top_ids = torch.as_tensor(result.top_ids)
    top_lp = torch.as_tensor(result.top_logprobs)
    positions = torch.as_tensor(result.positions)
    if top_ids.ndim == 4:  # batched results carry a leading batch axis
        top_ids, top_lp = top_ids[row], top_lp[row]
        positions = positions[row] if positions.ndim == 2 else positions
    if top_ids.ndim != 3:
        raise AnalysisInputError(f"LensResult.top_ids must be [layer, pos, k], got shape {tuple(top_ids.shape)}")
    span = layout.images[row][image]
    decode_fn = decoder(decode)
    where = {int(p): i for i, p in enumerate(positions.tolist())}
    n_layers = top_ids.shape[0]
    layers = [int(l) for l in getattr(result, "layers", range(n_layers))]
    if span.grid is not None:
        rows, cols = span.grid
        cells = [(int(r), int(c)) if bool(ok) else None for (r, c), ok in zip(span.row_col.tolist(), span.on_grid.tolist())]
        on_grid = True
    else:
        cols = math.ceil(math.sqrt(span.n_tokens))
        rows = math.ceil(span.n_tokens / cols)
        cells = [(k // cols, k % cols) for k in range(span.n_tokens)]
        on_grid = False
    words = np.full((n_layers, rows, cols), "", dtype=object)
    probs = np.full((n_layers, rows, cols), np.nan)
    cache: dict[int, str] = {}
    for tok_index, pos in enumerate(span.positions.tolist()):
        cell = cells[tok_index]
        if cell is None or pos not in where:
            continue
        i = where[pos]
        for l in range(n_layers):
            tid = int(top_ids[l, i, 0])
            if tid not in cache:
                cache[tid] = decode_fn(tid)
            words[l, cell[0], cell[1]] = cache[tid]
            probs[l, cell[0], cell[1]] = math.exp(float(top_lp[l, i, 0]))
    if np.isnan(probs).all():
        raise AnalysisInputError(
            f"the lens result covers none of the tokens of image {image} in row {row}; run logit_lens with positions='image'"
        )
    return layers, words, probs, (rows, cols), on_grid


def pick_layers(n: int, max_layers: int) -> list[int]:
    """Up to ``max_layers`` evenly spaced indices of ``range(n)``, first and last included."""
    if n <= max_layers:
        return list(range(n))
    return sorted({round(i * (n - 1) / (max_layers - 1)) for i in range(max_layers)})


def lens_panel(
    result: Any,
    layout: "TokenLayout",
    decode: Decoder,
    *,
    row: int = 0,
    image: int = 0,
    layers: Optional[Sequence[int]] = None,
    max_layers: int = 6,
    ncols: Optional[int] = None,
    panel_size: Optional[float] = None,
    cmap: str = "Blues",
) -> Any:
    """A matplotlib figure: the lens's top-1 word of every visual token, per layer.

    Args:
        result: A ``LensResult`` over (at least) the image's positions.
        layout: The batch's ``TokenLayout``.
        decode: The tokenizer (``model.tokenizer``) or a function id -> str.
        row: Which example of the batch.
        image: Which image of the example.
        layers: Indices along the result's layer axis (default: up to ``max_layers``
            evenly spaced, embeddings and last layer included).
        ncols: Panels per figure row (default: one row for up to 4 panels, else 3).
        panel_size: Inches per panel (default: 3.2, more for grids wider than 11
            tokens, so each word keeps a legible size).
        cmap: Colour map of the top-1 probability.
    """
    all_layers, words, probs, (rows, cols), on_grid = lens_grid(result, layout, decode, row=row, image=image)
    chosen = pick_layers(len(all_layers), max_layers) if layers is None else list(layers)
    bad = [l for l in chosen if not 0 <= l < len(all_layers)]
    if bad:
        raise AnalysisInputError(f"layers {bad} out of range: the lens result has {len(all_layers)} layers")
    if panel_size is None:
        panel_size = max(3.2, 0.3 * max(rows, cols))
    if ncols is None:
        ncols = len(chosen) if len(chosen) <= 4 else 3
    ncols = max(1, min(ncols, len(chosen)))
    nrows = math.ceil(len(chosen) / ncols)
    panel_height = panel_size * max(0.35, min(1.0, rows / cols))
    fig_height = (panel_height + 0.45) * nrows + 0.35
    fig = new_figure(panel_size * ncols + 0.8, fig_height)
    cm = colormap(cmap)
    cell_pt = panel_size * 72 / max(rows, cols)
    for k, l in enumerate(chosen):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        shade = np.where(np.isnan(probs[l]), np.nan, 0.15 + 0.6 * np.nan_to_num(probs[l]))
        ax.imshow(shade, cmap=cm, vmin=0, vmax=1, interpolation="nearest")
        for r in range(rows):
            for c in range(cols):
                word = words[l, r, c]
                if not word:
                    continue
                if len(word) > MAX_WORD:  # keep cells legible; the data files hold every word whole
                    word = word[: MAX_WORD - 1] + "…"
                size = max(2.5, min(9.0, cell_pt * 0.85 / max(1.0, 0.62 * len(word))))
                ax.text(c, r, word, ha="center", va="center", fontsize=size, color="black", clip_on=True)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(layer_labels(len(all_layers), [all_layers[l]])[0], fontsize=10)
    note = "" if on_grid else f" ({layout.images[row][image].tokens_name} in query order: no image grid)"
    fig.suptitle(f"Logit lens: top-1 word per visual token, shade = its probability{note}", fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.5 / fig_height, wspace=0.05, hspace=0.35)
    return fig
