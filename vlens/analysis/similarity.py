"""How close visual-token hidden states come to text, layer by layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from vlens.analysis._common import (
    PositionSpec,
    check_nonempty,
    image_positions,
    long_frame,
    resid_hooks,
    row_positions,
    stack_optional,
    stack_rows,
    typechecked,
)
from vlens.errors import AnalysisInputError

Against = Literal["text_states", "text_embeddings", "vocab"]
AGAINST = ("text_states", "text_embeddings", "vocab")
EPS = 1e-8


def required_hooks(model: Any, against: Against = "text_states") -> list[str]:
    """Hooks :func:`modality_similarity` reads: the residual stream at every layer
    boundary, plus the token ids (``embed.hook_in``) for ``"text_embeddings"``."""
    check_against(against)
    return resid_hooks(model.n_layers) + (["embed.hook_in"] if against == "text_embeddings" else [])


@typechecked
@dataclass(frozen=True, eq=False)
class SimilarityResult:
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

    Batched inputs add a leading ``batch`` axis (image axes padded with NaN / -1).

    Attributes:
        per_layer: The curve, ``[layer]``.
        per_token: Per image token, ``[layer, img]``.
        image_positions: Sequence position of each ``img`` entry.
        text_positions: The text positions compared against (None for ``"vocab"``).
        nearest_ids: For ``"vocab"``, the most similar vocabulary id, ``[layer, img]``.
        against: Which comparison.
    """

    per_layer: Float[Tensor, "*batch layer"]
    per_token: Float[Tensor, "*batch layer img"]
    image_positions: Int[Tensor, "*batch img"]
    text_positions: Optional[Int[Tensor, "*batch txt"]]
    nearest_ids: Optional[Int[Tensor, "*batch layer img"]]
    against: str

    @property
    def batched(self) -> bool:
        return self.per_layer.ndim == 2

    def to_frame(self) -> pd.DataFrame:
        """Long format, per image token: layer, pos (sequence position), similarity,
        plus ``nearest_id`` for ``"vocab"``; ``against`` names the comparison."""
        values = {"similarity": self.per_token}
        if self.nearest_ids is not None:
            values["nearest_id"] = self.nearest_ids
        frame = long_frame(values, dims=("layer", "pos"), coords={"pos": self.image_positions}, batched=self.batched)
        frame["against"] = self.against
        return frame

    def curve_frame(self) -> pd.DataFrame:
        """Long format of the curve: layer, similarity."""
        frame = long_frame({"similarity": self.per_layer}, dims=("layer",), batched=self.batched)
        frame["against"] = self.against
        return frame


def unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def max_cosine_to_vocab(
    states: Float[Tensor, "n d"], vocab_unit: Float[Tensor, "vocab d"], chunk: int = 8192
) -> tuple[Float[Tensor, "n"], Int[Tensor, "n"]]:
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


def vocab_unit(model: Any) -> Float[Tensor, "vocab d_model"]:
    """The embedding matrix, rows normalised, in float32."""
    return unit(model.W_E.detach().float())


def check_against(against: str) -> None:
    if against not in AGAINST:
        raise AnalysisInputError(f"unknown against={against!r}; choose one of {list(AGAINST)}")


def modality_similarity(
    model: Any,
    cache: Any,
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
    names = resid_hooks(model.n_layers)
    needed = required_hooks(model, against)
    missing = [n for n in needed if n not in cache]
    if missing:
        raise AnalysisInputError(
            f"modality_similarity(against={against!r}) needs hooks this cache does not hold: {missing[:4]}"
            f"{' ...' if len(missing) > 4 else ''}. Cache them with model.run_with_cache(inputs, "
            f"names_filter=vlens.analysis.similarity.required_hooks(model, against={against!r}))"
        )
    layout = cache.layout
    vocab = vocab_unit(model) if against == "vocab" else None
    out: dict[str, list] = {key: [] for key in ("layer", "token", "img", "txt", "near")}
    with torch.no_grad():
        for row in range(layout.batch_size):
            img = image_positions(layout, row)
            states = torch.stack([cache[n][row].float() for n in names])  # [layer, pos, d]
            v = states[:, img.to(states.device)]
            if against == "vocab":
                flat_best, flat_arg = max_cosine_to_vocab(v.flatten(0, 1), vocab.to(v.device))
                per_token = flat_best.view(v.shape[:2]).cpu()
                out["near"].append(flat_arg.view(v.shape[:2]).cpu())
                out["txt"].append(None)
            else:
                txt = row_positions(layout, text, row, what="text")
                check_nonempty(txt, "text", text, row)
                if against == "text_states":
                    t = states[:, txt.to(states.device)]
                    cos = unit(v) @ unit(t).transpose(1, 2)  # [layer, img, txt]
                else:
                    ids = _text_ids(model, cache, row, txt)
                    emb = unit(model.W_E.detach()[ids.to(model.W_E.device)].float()).to(v.device)
                    cos = unit(v) @ emb.T
                per_token = cos.mean(-1).cpu()
                out["txt"].append(txt)
                out["near"].append(None)
            out["token"].append(per_token)
            out["layer"].append(per_token.mean(-1))
            out["img"].append(img)
    return SimilarityResult(
        per_layer=stack_rows(out["layer"]),
        per_token=stack_rows(out["token"]),
        image_positions=stack_rows(out["img"]),
        text_positions=stack_optional(out["txt"]),
        nearest_ids=stack_optional(out["near"]),
        against=against,
    )


def _text_ids(model: Any, cache: Any, row: int, txt: Tensor) -> Tensor:
    """Token ids at text positions (the input of the token embedding, ``embed.hook_in``)."""
    ids = cache["embed.hook_in"]
    return ids[row, txt.to(ids.device)].long()
