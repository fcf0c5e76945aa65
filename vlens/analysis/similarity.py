"""How close visual-token hidden states come to text, layer by layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Optional, cast

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from vlens.analysis._common import (
    BatchedResult,
    PositionSpec,
    check_cached,
    check_nonempty,
    image_positions,
    long_frame,
    resid_hooks,
    row_positions,
    stack_optional,
    stack_rows,
    typechecked,
)
from vlens.analysis.streaming import CurveStats, Reduction, Stream
from vlens.errors import AnalysisInputError

if TYPE_CHECKING:
    from vlens.cache import VLMCache
    from vlens.layout import TokenLayout
    from vlens.model import HookedVLM

Against = Literal["text_states", "text_embeddings", "vocab"]
AGAINST = ("text_states", "text_embeddings", "vocab")
EPS = 1e-8


def required_hooks(model: "HookedVLM", against: Against = "text_states") -> list[str]:
    """Hooks :func:`modality_similarity` reads: the residual stream at every layer
    boundary, plus the token ids (``embed.hook_in``) for ``"text_embeddings"``."""
    check_against(against)
    return resid_hooks(model.n_layers) + (["embed.hook_in"] if against == "text_embeddings" else [])


@typechecked
@dataclass(frozen=True, eq=False, repr=False)
class SimilarityResult(BatchedResult):
    """Cosine similarity of visual-token hidden states to text, per layer.

    Layer index l: 0 = ``blocks.0.hook_resid_pre`` (input embeddings, image features
    included), l >= 1 = ``blocks.{l-1}.hook_resid_post``; ``n_layers + 1`` entries. All
    in float32 on the raw residual stream. With ``v`` an image token's state at layer l:

    * ``"text_states"``: ``per_token[l, i]`` is the mean over the chosen text positions t
      of ``cos(v_i, h_t)`` with ``h_t`` the text token's state at the same layer;
      ``per_layer[l]`` the mean over all (image, text) pairs.
    * ``"text_embeddings"``: as above with ``h_t`` the input embedding (row of the
      embedding matrix) of each chosen text token, the same at every layer.
    * ``"vocab"``: ``per_token[l, i]`` is the maximum over the embedding matrix's rows
      e of ``cos(v_i, e)`` (``nearest_ids`` holds the argmax); ``per_layer[l]`` is the
      mean over image tokens.

    Every field but ``against`` has a leading ``batch`` axis (image and text axes padded
    at the end with NaN / -1); ``row(b)`` gives one example's values.

    Attributes:
        per_layer: The curve, ``[batch, layer]``.
        per_token: Per image token, ``[batch, layer, img]``.
        image_positions: Sequence position of each ``img`` entry.
        text_positions: The text positions compared against (None for ``"vocab"``).
        nearest_ids: For ``"vocab"``, the most similar vocabulary id, ``[batch, layer, img]``.
        against: Which comparison.
    """

    ragged = {"img": "image_positions", "txt": "text_positions"}

    per_layer: Float[Tensor, "batch layer"]
    per_token: Float[Tensor, "batch layer img"]
    image_positions: Int[Tensor, "batch img"]
    text_positions: Optional[Int[Tensor, "batch txt"]]
    nearest_ids: Optional[Int[Tensor, "batch layer img"]]
    against: str

    def to_frame(self) -> pd.DataFrame:
        """Long format, per image token: batch, layer, pos (sequence position), similarity,
        plus ``nearest_id`` for ``"vocab"``; ``against`` names the comparison."""
        values = {"similarity": self.per_token}
        if self.nearest_ids is not None:
            values["nearest_id"] = self.nearest_ids
        frame = long_frame(values, dims=("layer", "pos"), coords={"pos": self.image_positions})
        frame["against"] = self.against
        return frame

    def curve_frame(self) -> pd.DataFrame:
        """Long format of the curve: batch, layer, similarity."""
        frame = long_frame({"similarity": self.per_layer}, dims=("layer",))
        frame["against"] = self.against
        return frame


def unit(x: Tensor) -> Tensor:
    """Each row scaled to unit norm (a zero row stays near zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def max_cosine_to_vocab(
    states: Float[Tensor, "n d"], vocab_unit: Float[Tensor, "vocab d"], chunk: int = 8192
) -> tuple[Float[Tensor, " n"], Int[Tensor, " n"]]:
    """Maximum cosine of each state to any (unit-normalised) vocabulary row, and its id."""
    s = unit(states.float())
    best = torch.full((s.shape[0],), -float("inf"), device=s.device)
    arg = torch.zeros(s.shape[0], dtype=torch.long, device=s.device)
    for start in range(0, vocab_unit.shape[0], chunk):
        block = s @ vocab_unit[start : start + chunk].T
        value, idx = block.max(-1)
        better = value > best
        best = torch.where(better, value, best)
        arg = torch.where(better, idx + start, arg)
    return best, arg


def vocab_unit(model: "HookedVLM") -> Float[Tensor, "vocab d_model"]:
    """The embedding matrix, rows normalised, in float32."""
    return unit(model.W_E.detach().float())


def check_against(against: str) -> None:
    """Raise ``AnalysisInputError`` for an unknown comparison."""
    if against not in AGAINST:
        raise AnalysisInputError(f"unknown against={against!r}; choose one of {list(AGAINST)}")


@dataclass(frozen=True)
class _Row:
    img: Tensor
    txt: Optional[Tensor]
    text_unit: Optional[Tensor]  # unit input embeddings of the text tokens ("text_embeddings")


class SimilarityReduction(Reduction[SimilarityResult]):
    """Per example and layer, the cosine of each image token's state to text (the definition
    in :class:`SimilarityResult`), shared by :func:`modality_similarity` and :class:`SimilarityStream`."""

    def __init__(self, model: "HookedVLM", against: Against = "text_states", text: PositionSpec = "instruction") -> None:
        check_against(against)
        self.model = model
        self.against = against
        self.text = text
        self.names = resid_hooks(model.n_layers)
        self.needs_ids = against == "text_embeddings"
        self._vocab = vocab_unit(model) if against == "vocab" else None

    def context(self, layout: "TokenLayout", row: int, input_ids: Optional[Tensor]) -> _Row:
        img = image_positions(layout, row)
        if self.against == "vocab":
            return _Row(img, None, None)
        txt = row_positions(layout, self.text, row, what="text")
        check_nonempty(txt, "text", self.text, row)
        text_unit = None
        if input_ids is not None and self.needs_ids:
            w = self.model.W_E.detach()
            text_unit = unit(w[input_ids[row, txt.to(input_ids.device)].long().to(w.device)].float())
        return _Row(img, txt, text_unit)

    def reduce(self, index: int, states: Tensor, ctx: _Row) -> tuple[Tensor, Optional[Tensor]]:
        v = unit(states[ctx.img.to(states.device)].float())  # [img, d]
        if self.against == "vocab":
            assert self._vocab is not None  # built in __init__ for against="vocab"
            best, arg = max_cosine_to_vocab(v, self._vocab.to(v.device))
            return best.cpu(), arg.cpu()
        if self.against == "text_states":
            assert ctx.txt is not None  # context() sets it for every against but "vocab"
            t = unit(states[ctx.txt.to(states.device)].float())
        else:
            # "text_embeddings": needs_ids, so contexts() had the token ids and context() set it.
            assert ctx.text_unit is not None
            t = ctx.text_unit.to(v.device)
        return (v @ t.T).mean(-1).cpu(), None

    def assemble(self, ctx: _Row, pieces: list[tuple[Tensor, Optional[Tensor]]]) -> dict[str, Any]:
        per_token = torch.stack([p[0] for p in pieces])  # [layer, img]
        return {
            "per_layer": per_token.mean(-1),
            "per_token": per_token,
            "image_positions": ctx.img,
            "text_positions": ctx.txt,
            # Every layer's piece has nearest ids (against="vocab") or none has.
            "nearest_ids": None if pieces[0][1] is None else torch.stack([cast(Tensor, p[1]) for p in pieces]),
        }

    def result(self, rows: list[dict[str, Any]]) -> SimilarityResult:
        return SimilarityResult(
            per_layer=stack_rows([r["per_layer"] for r in rows]),
            per_token=stack_rows([r["per_token"] for r in rows]),
            image_positions=stack_rows([r["image_positions"] for r in rows]),
            text_positions=stack_optional([r["text_positions"] for r in rows]),
            nearest_ids=stack_optional([r["nearest_ids"] for r in rows]),
            against=self.against,
        )


def modality_similarity(
    model: "HookedVLM",
    cache: "VLMCache",
    against: Against = "text_states",
    text: PositionSpec = "instruction",
) -> SimilarityResult:
    """Per layer, the cosine similarity of visual-token states to text (see :class:`SimilarityResult`).

    Args:
        model: The ``HookedVLM`` the cache came from.
        cache: From ``model.run_with_cache(inputs, names_filter=similarity.required_hooks(model))``.
        against: ``"text_states"``, ``"text_embeddings"`` or ``"vocab"``.
        text: The text positions compared against (segment name, mask or positions);
            ignored for ``"vocab"``. Default: the instruction segment.
    """
    check_against(against)
    check_cached(cache, required_hooks(model, against), f"modality_similarity(against={against!r})",
                 "similarity", hint=f"required_hooks(model, against={against!r})")
    return SimilarityReduction(model, against, text).on_cache(cache)


class SimilarityStream(Stream[SimilarityResult]):
    """Streaming :func:`modality_similarity`: the same per-example values (``last_batch``)
    from hooks, and the per-layer curve's mean and std over examples (:meth:`result`)."""

    def __init__(self, model: "HookedVLM", against: Against = "text_states", text: PositionSpec = "instruction") -> None:
        super().__init__(model, SimilarityReduction(model, against, text))
        self.against = against

    def summarise(self, row: dict[str, Any]) -> dict[str, Optional[Tensor]]:
        return {"per_layer": row["per_layer"]}

    def result(self) -> CurveStats:
        mean, std, n = self.mean_std("per_layer")
        return CurveStats(per_layer=mean, std=std, n_examples=n, name=f"similarity:{self.against}")
