"""Token spans for the causal tools: segment names, grid cells, masks, indices.

The causal tools (attention knockout, activation and attribution patching) choose positions
the way every analysis does (:func:`vlens.analysis._common.row_positions`: a segment name, a
boolean mask or explicit positions) and add two things they need:

* ``"predictor"``: the position whose logits predict the first answer token (the last
  token of the prompt, ``answer_start - 1``; the last real token when there is no answer).
  With an answer in the sequence, ``"last"`` is the answer's last token, which predicts
  nothing the answer's log-probability reads, so Zhang et al.'s "last position" is this one.
* :func:`grid_cells`: the positions of chosen cells of an image's patch grid, e.g. the
  cells an object covers.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from vlens.analysis._common import SEGMENTS, PositionSpec, row_positions
from vlens.errors import AnalysisInputError
from vlens.layout import TokenLayout

SPAN_NAMES = (*SEGMENTS, "predictor")
SpanSpec = Union[str, Tensor, Sequence[int]]


def predictor_positions(layout: TokenLayout) -> Int[Tensor, " batch"]:
    """Per row, the position predicting the first answer token (the last prompt token)."""
    has_answer = layout.answer_mask.any(1)
    return torch.where(has_answer, layout.answer_start - 1, layout.lengths - 1)


def span_positions(layout: TokenLayout, spec: SpanSpec, row: int, what: str) -> Int[Tensor, " n"]:
    """Sequence positions of one row: a span name in ``SPAN_NAMES``, a mask or indices."""
    if isinstance(spec, str) and spec == "predictor":
        return predictor_positions(layout)[row : row + 1].clone()
    if isinstance(spec, str) and spec not in SEGMENTS:
        raise AnalysisInputError(f"unknown {what} {spec!r}; choose a span in {list(SPAN_NAMES)}, a mask or indices")
    positions = row_positions(layout, spec, row, what=what)
    if positions.numel() == 0:
        raise AnalysisInputError(f"{what}={_shown(spec)} selects no position in row {row}")
    return positions


def grid_cells(layout: TokenLayout, cells: Sequence[tuple[int, int]], image: int = 0) -> Bool[Tensor, "batch pos"]:
    """A mask of the tokens at the given (row, col) cells of image ``image``'s patch grid
    (tile 0), in every batch row; pass it as a span.

    Raises:
        AnalysisInputError: for a row without that image, an image without a grid (query
            tokens), or a cell off the grid.
    """
    out = torch.zeros_like(layout.attention_mask)
    wanted = [(int(r), int(c)) for r, c in cells]
    if not wanted:
        raise AnalysisInputError("grid_cells needs at least one (row, col) cell")
    for b, spans in enumerate(layout.images):
        if image >= len(spans):
            raise AnalysisInputError(f"row {b} has {len(spans)} image(s); there is no image {image}")
        span = spans[image]
        if span.grid is None:
            raise AnalysisInputError(
                f"image {image} of row {b} has no patch grid ({span.tokens_name}); choose its tokens by position"
            )
        rows, cols = span.grid
        off = [(r, c) for r, c in wanted if not (0 <= r < rows and 0 <= c < cols)]
        if off:
            raise AnalysisInputError(f"cells {off} are off image {image}'s {rows}x{cols} grid")
        on = span.on_grid
        rc = span.row_col
        for r, c in wanted:
            hit = on & (rc[:, 0] == r) & (rc[:, 1] == c)
            out[b, span.positions[hit]] = True
    return out


def _shown(spec: PositionSpec) -> str:
    if isinstance(spec, Tensor):
        return f"<{'mask' if spec.dtype == torch.bool else 'positions'} {tuple(spec.shape)}>"
    return repr(spec)
