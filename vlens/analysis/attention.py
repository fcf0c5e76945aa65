"""How much text tokens read the image: attention mass on image keys, per layer and head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from vlens.analysis._common import (
    BatchedResult,
    PositionSpec,
    ShortRepr,
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
from vlens.analysis.streaming import Reduction, Stream
from vlens.errors import AnalysisInputError

if TYPE_CHECKING:
    from vlens.cache import VLMCache
    from vlens.layout import TokenLayout
    from vlens.model import HookedVLM


def required_hooks(model: "HookedVLM") -> list[str]:
    """Hooks :func:`attention_to_image` reads: every block's attention pattern."""
    return pattern_hooks(model.n_layers)


@typechecked
@dataclass(frozen=True, eq=False, repr=False)
class AttentionResult(BatchedResult):
    """Attention from chosen query positions to the image tokens.

    With ``A[l, h, q, k]`` the attention pattern of block l (``blocks.{l}.attn.hook_pattern``,
    post-softmax, one entry per block: the layer axis has ``n_layers`` entries here),
    Q the chosen query positions and I the row's image-token positions, in float32:

    * ``mass[l, h] = mean_{q in Q} sum_{k in I} A[l, h, q, k]``: the share of attention
      the queries put on the image (1 when they look only at it, 0 when never).
    * ``received[l, i] = mean_{h, q in Q} A[l, h, q, I[i]]``: the attention each image
      token gets (``layout.images[b][j].to_grid`` draws it on the image).

    Every field has a leading ``batch`` axis (ragged axes padded at the end with NaN / -1);
    ``row(b)`` gives one example's values.

    Attributes:
        mass: ``[batch, layer, head]``.
        received: ``[batch, layer, img]``.
        image_positions: Sequence position of each ``img`` entry.
        query_positions: The query positions averaged over.
    """

    ragged = {"img": "image_positions", "q": "query_positions"}

    mass: Float[Tensor, "batch layer head"]
    received: Float[Tensor, "batch layer img"]
    image_positions: Int[Tensor, "batch img"]
    query_positions: Int[Tensor, "batch q"]

    def to_frame(self) -> pd.DataFrame:
        """Long format of ``mass``: batch, layer, head, mass."""
        return long_frame({"mass": self.mass}, dims=("layer", "head"))

    def received_frame(self) -> pd.DataFrame:
        """Long format of ``received``: batch, layer, pos (sequence position), received."""
        return long_frame({"received": self.received}, dims=("layer", "pos"), coords={"pos": self.image_positions})


@typechecked
@dataclass(frozen=True, eq=False, repr=False)
class SinkTokens(BatchedResult):
    """Image tokens that receive far more attention than the rest ("attention sinks").

    ``ratio[l, i] = received[l, i] / median_j received[l, j]`` (the median over the row's
    image tokens at layer l); ``is_sink = ratio > factor``.

    Attributes:
        ratio: ``[batch, layer, img]``.
        is_sink: ``[batch, layer, img]``.
        image_positions: Sequence position of each ``img`` entry.
        factor: The threshold used.
    """

    ragged = {"img": "image_positions"}

    ratio: Float[Tensor, "batch layer img"]
    is_sink: Bool[Tensor, "batch layer img"]
    image_positions: Int[Tensor, "batch img"]
    factor: float

    def positions(self, layer: int, row: int = 0) -> Int[Tensor, " n"]:
        """Sequence positions of the sinks at one layer of one row."""
        return self.image_positions[row][self.is_sink[row, layer]]

    def to_frame(self) -> pd.DataFrame:
        """Long format: batch, layer, pos, ratio, is_sink."""
        return long_frame(
            {"ratio": self.ratio, "is_sink": self.is_sink}, dims=("layer", "pos"), coords={"pos": self.image_positions}
        )


class AttentionReduction(Reduction[AttentionResult]):
    """Per example and block, the attention of the query positions to the image (the
    definition in :class:`AttentionResult`), shared by :func:`attention_to_image` and
    :class:`AttentionStream`."""

    def __init__(self, n_layers: int, query: PositionSpec = "instruction") -> None:
        self.query = query
        self.names = pattern_hooks(n_layers)

    def context(self, layout: "TokenLayout", row: int, input_ids: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        img = image_positions(layout, row)
        q = row_positions(layout, self.query, row, what="query")
        check_nonempty(q, "query", self.query, row)
        return q, img

    def reduce(self, index: int, pattern: Tensor, ctx: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        q, img = ctx
        a = pattern[:, q.to(pattern.device)][:, :, img.to(pattern.device)].float()  # [head, q, img]
        return a.sum(-1).mean(-1).cpu(), a.mean((0, 1)).cpu()

    def assemble(self, ctx: tuple[Tensor, Tensor], pieces: list[tuple[Tensor, Tensor]]) -> dict[str, Any]:
        q, img = ctx
        return {
            "mass": torch.stack([p[0] for p in pieces]),
            "received": torch.stack([p[1] for p in pieces]),
            "image_positions": img,
            "query_positions": q,
        }

    def result(self, rows: list[dict[str, Any]]) -> AttentionResult:
        return AttentionResult(**{key: stack_rows([r[key] for r in rows]) for key in rows[0]})


def attention_to_image(cache: "VLMCache", query: PositionSpec = "instruction") -> AttentionResult:
    """Attention mass on image keys per layer and head (see :class:`AttentionResult`).

    Args:
        cache: From ``model.run_with_cache(inputs, names_filter=attention.required_hooks(model))``.
        query: Query positions: a segment name (``"instruction"``, ``"answer"``, ``"last"``,
            ``"image"``, ...), a bool mask or positions.
    """
    reduction = AttentionReduction(n_layers_of(cache), query)
    check_cached(cache, reduction.names, "attention_to_image", "attention")
    return reduction.on_cache(cache)


@typechecked
@dataclass(frozen=True, eq=False, repr=False)
class AttentionStats(ShortRepr):
    """Attention to the image averaged over examples.

    Attributes:
        mass: Mean over examples of ``AttentionResult.mass``, ``[layer, head]``.
        received: Mean over examples of ``AttentionResult.received``, ``[layer, img]``,
            over the examples with as many image tokens as the first one (None if none).
        n_examples: Examples in ``mass``.
        n_received: Examples in ``received``.
    """

    mass: Float[Tensor, "layer head"]
    received: Optional[Float[Tensor, "layer img"]]
    n_examples: int
    n_received: int

    @property
    def per_layer(self) -> Float[Tensor, " layer"]:
        """Mass on the image per layer, mean over heads."""
        return self.mass.mean(-1)

    def to_frame(self) -> pd.DataFrame:
        """Long format of ``mass``: layer, head, mass."""
        return long_frame({"mass": self.mass}, dims=("layer", "head"), batched=False)


class AttentionStream(Stream[AttentionResult]):
    """Streaming :func:`attention_to_image`: the same per-example values (``last_batch``) from
    hooks, and over examples the mean mass per layer and head and the mean attention each
    image token receives (over the examples with as many image tokens as the first one,
    e.g. every image of a fixed-resolution family)."""

    def __init__(self, model: "HookedVLM", query: PositionSpec = "instruction") -> None:
        super().__init__(model, AttentionReduction(model.n_layers, query))

    def summarise(self, row: dict[str, Any]) -> dict[str, Optional[Tensor]]:
        return {"mass": row["mass"], "received": row["received"]}

    def result(self) -> AttentionStats:
        mass, _, n = self.mean_std("mass")
        received, n_received = None, 0
        if self.has("received"):
            received, _, n_received = self.mean_std("received")
        return AttentionStats(mass=mass, received=received, n_examples=n, n_received=n_received)


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
