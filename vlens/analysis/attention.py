"""How much text tokens read the image: attention mass on image keys, per layer and head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from vlens.analysis._common import (
    PositionSpec,
    check_cached,
    check_nonempty,
    image_positions,
    long_frame,
    n_layers_of,
    pattern_hooks,
    row_positions,
    stack_rows,
    typechecked,
)
from vlens.errors import AnalysisInputError


def required_hooks(model: Any) -> list[str]:
    """Hooks :func:`attention_to_image` reads: every block's attention pattern."""
    return pattern_hooks(model.n_layers)


@typechecked
@dataclass(frozen=True, eq=False)
class AttentionResult:
    """Attention from chosen query positions to the image tokens.

    With ``A[l, h, q, k]`` the attention pattern of block l (``blocks.{l}.attn.hook_pattern``,
    post-softmax, one entry per block: the layer axis has ``n_layers`` entries here),
    Q the chosen query positions and I the row's image-token positions, in float32:

    * ``mass[l, h] = mean_{q in Q} sum_{k in I} A[l, h, q, k]``: the share of attention
      the queries put on the image (1 when they look only at it, 0 when never).
    * ``received[l, i] = mean_{h, q in Q} A[l, h, q, I[i]]``: the attention each image
      token gets (``layout.images[b][j].to_grid`` draws it on the image).

    Batched inputs add a leading ``batch`` axis (ragged axes padded with NaN / -1).

    Attributes:
        mass: ``[layer, head]``.
        received: ``[layer, img]``.
        image_positions: Sequence position of each ``img`` entry.
        query_positions: The query positions averaged over.
    """

    mass: Float[Tensor, "*batch layer head"]
    received: Float[Tensor, "*batch layer img"]
    image_positions: Int[Tensor, "*batch img"]
    query_positions: Int[Tensor, "*batch q"]

    @property
    def batched(self) -> bool:
        return self.mass.ndim == 3

    def to_frame(self) -> pd.DataFrame:
        """Long format of ``mass``: layer, head, mass."""
        return long_frame({"mass": self.mass}, dims=("layer", "head"), batched=self.batched)

    def received_frame(self) -> pd.DataFrame:
        """Long format of ``received``: layer, pos (sequence position), received."""
        return long_frame(
            {"received": self.received}, dims=("layer", "pos"), coords={"pos": self.image_positions}, batched=self.batched
        )


@typechecked
@dataclass(frozen=True, eq=False)
class SinkTokens:
    """Image tokens that receive far more attention than the rest ("attention sinks").

    ``ratio[l, i] = received[l, i] / median_j received[l, j]`` (the median over the row's
    image tokens at layer l); ``is_sink = ratio > factor``.

    Attributes:
        ratio: ``[layer, img]``.
        is_sink: ``[layer, img]``.
        image_positions: Sequence position of each ``img`` entry.
        factor: The threshold used.
    """

    ratio: Float[Tensor, "*batch layer img"]
    is_sink: Bool[Tensor, "*batch layer img"]
    image_positions: Int[Tensor, "*batch img"]
    factor: float

    def positions(self, layer: int, row: Optional[int] = None) -> Int[Tensor, "n"]:
        """Sequence positions of the sinks at one layer (of one row when batched)."""
        flags, pos = self.is_sink, self.image_positions
        if flags.ndim == 3:
            if row is None:
                raise AnalysisInputError("this result is batched; pass row=")
            flags, pos = flags[row], pos[row]
        return pos[flags[layer]]

    def to_frame(self) -> pd.DataFrame:
        """Long format: layer, pos, ratio, is_sink."""
        return long_frame(
            {"ratio": self.ratio, "is_sink": self.is_sink},
            dims=("layer", "pos"),
            coords={"pos": self.image_positions},
            batched=self.ratio.ndim == 3,
        )


def attention_to_image(cache: Any, query: PositionSpec = "instruction") -> AttentionResult:
    """Attention mass on image keys per layer and head (see :class:`AttentionResult`).

    Args:
        cache: From ``model.run_with_cache(inputs, names_filter=attention.required_hooks(model))``.
        query: Query positions: a segment name (``"instruction"``, ``"answer"``, ``"last"``,
            ``"image"``, ...), a bool mask or positions.
    """
    n_layers = n_layers_of(cache)
    names = pattern_hooks(n_layers)
    check_cached(cache, names, "attention_to_image", "attention")
    layout = cache.layout
    masses, received, imgs, queries = [], [], [], []
    with torch.no_grad():
        for row in range(layout.batch_size):
            img = image_positions(layout, row)
            q = row_positions(layout, query, row, what="query")
            check_nonempty(q, "query", query, row)
            row_mass, row_recv = [], []
            for name in names:
                pattern = cache[name]
                a = pattern[row][:, q.to(pattern.device)][:, :, img.to(pattern.device)].float()  # [head, q, img]
                row_mass.append(a.sum(-1).mean(-1).cpu())
                row_recv.append(a.mean((0, 1)).cpu())
            masses.append(torch.stack(row_mass))
            received.append(torch.stack(row_recv))
            imgs.append(img)
            queries.append(q)
    return AttentionResult(
        mass=stack_rows(masses),
        received=stack_rows(received),
        image_positions=stack_rows(imgs),
        query_positions=stack_rows(queries),
    )


def find_sink_tokens(result: AttentionResult, factor: float = 5.0) -> SinkTokens:
    """Flag image tokens receiving more than ``factor`` times the median attention.

    Args:
        result: From :func:`attention_to_image`.
        factor: Threshold on ``received / median(received)`` at the same layer.
    """
    if not factor > 0:
        raise AnalysisInputError(f"factor must be a positive number, got {factor!r}")
    recv = result.received
    median = recv.nanmedian(dim=-1, keepdim=True).values
    ratio = recv / median.clamp_min(1e-12)
    return SinkTokens(
        ratio=ratio,
        is_sink=(ratio > factor) & ~ratio.isnan(),
        image_positions=result.image_positions,
        factor=float(factor),
    )
