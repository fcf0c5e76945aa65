"""A clean and a corrupted batch, row by row, for activation and attribution patching.

Patching moves one activation from the clean run into the corrupted run at the same layer
and position, so the two inputs must put the same kind of token at every position: same
length, same image positions on the same grids, same text segments. :func:`check_aligned`
refuses anything else, saying what differs and how to align it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vlens.analysis._spans import predictor_positions
from vlens.errors import AnalysisInputError

if TYPE_CHECKING:
    from vlens.inputs import VLMInputs
    from vlens.layout import TokenLayout
    from vlens.model import HookedVLM

Kind = Literal["resid_pre", "attn_out", "mlp_out"]
KINDS: tuple[Kind, ...] = ("resid_pre", "attn_out", "mlp_out")
Metric = Literal["logit_diff", "prob"]
METRICS = ("logit_diff", "prob")
TokenSpec = Union[None, int, str, Sequence[Union[int, str]]]

_ALIGN_HINT = (
    "Patching needs both inputs tokenised alike. For another image with the same prompt, give both images "
    "the same size and aspect ratio (tiling families pick their tile grid, and so their token "
    "count, from it: resize or pad the corrupted image to the clean one's size). For another prompt, use one "
    "with the same number of tokens in each segment (swap words for words of the same token length), and "
    "give both the same answer or none."
)


def hook_name(kind: Kind, layer: int) -> str:
    """The TransformerLens hook a kind of activation is read and patched at."""
    return f"blocks.{layer}.hook_{kind}"


def check_kinds(kinds: Sequence[str]) -> tuple[Kind, ...]:
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise AnalysisInputError(f"unknown activation kind(s) {bad or kinds}; choose from {list(KINDS)}")
    return kinds  # type: ignore[return-value]


def check_layers(layers: Optional[Sequence[int]], n_layers: int) -> Int[Tensor, " layer"]:
    if layers is None:
        return torch.arange(n_layers)
    t = torch.as_tensor(list(layers), dtype=torch.long)
    bad = t[(t < 0) | (t >= n_layers)]
    if t.numel() == 0 or bad.numel():
        raise AnalysisInputError(f"layers {bad.tolist() or list(layers)} must be a non-empty list in 0..{n_layers - 1}")
    return t


def check_aligned(clean: "TokenLayout", corrupted: "TokenLayout") -> None:
    """Raise ``AnalysisInputError`` naming the first difference between two batches' layouts."""
    if clean.batch_size != corrupted.batch_size:
        raise AnalysisInputError(
            f"clean has {clean.batch_size} rows and corrupted {corrupted.batch_size}; patching pairs them row by row"
        )
    for row in range(clean.batch_size):
        a, b = int(clean.lengths[row]), int(corrupted.lengths[row])
        problems = []
        if a != b:
            problems.append(f"{a} tokens against {b}")
        else:
            for name in ("image", "marker", "prefix", "instruction", "answer"):
                if not torch.equal(clean.mask(name)[row, :a], corrupted.mask(name)[row, :a]):
                    problems.append(f"their {name} positions differ")
        grids_a = [dict(s.tile_grids) for s in clean.images[row]]
        grids_b = [dict(s.tile_grids) for s in corrupted.images[row]]
        if grids_a != grids_b:
            problems.append(f"image grids {grids_a} against {grids_b}")
        if problems:
            raise AnalysisInputError(
                f"row {row}: the clean and corrupted inputs are tokenised differently ({'; '.join(problems)}). "
                + _ALIGN_HINT
            )


def token_ids(model: "HookedVLM", spec: TokenSpec, default: Optional[Tensor], n_rows: int, what: str) -> Optional[Tensor]:
    """One token id per row from an id, a single-token string, a list of them, or a default."""
    if spec is None:
        return default
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec] * n_rows
    if len(items) != n_rows:
        raise AnalysisInputError(f"{what} has {len(items)} entries for {n_rows} rows")
    out = []
    for item in items:
        if isinstance(item, str):
            ids = model.tokenizer.encode(item, add_special_tokens=False)
            if len(ids) != 1:
                raise AnalysisInputError(f"{what} {item!r} is {len(ids)} tokens {ids}; give one token (or its id)")
            item = ids[0]
        if not isinstance(item, int) or not 0 <= item < model.cfg.d_vocab:
            raise AnalysisInputError(f"{what} {item!r} is not a token id in 0..{model.cfg.d_vocab - 1}")
        out.append(item)
    return torch.tensor(out, dtype=torch.long)


def first_answer_ids(inputs: "VLMInputs") -> Optional[Tensor]:
    """Each row's first answer token, or None when a row has no answer."""
    layout = inputs.layout
    if not bool(layout.answer_mask.any(1).all()):
        return None
    return inputs.input_ids[torch.arange(layout.batch_size), layout.answer_start]


@dataclass(frozen=True)
class RowPair:
    """One row of a clean/corrupted pair, ready for the language model.

    Attributes:
        clean, corrupted: Merged input embeddings of the row's real tokens.
        positions: The model's positions for them (the same in both, the layouts being equal).
        extras: Per-token inputs of the corrupted row (``[pos]`` each).
        extras_clean: Those of the clean row.
        predictor: The position whose logits are read.
        patch: The positions patched, ascending.
    """

    clean: Float[Tensor, "pos d_model"]
    corrupted: Float[Tensor, "pos d_model"]
    positions: Int[Tensor, "*axes pos"]
    extras: dict[str, Tensor]
    extras_clean: dict[str, Tensor]
    predictor: int
    patch: Int[Tensor, " n"]


def row_pairs(
    model: "HookedVLM", clean: "VLMInputs", corrupted: "VLMInputs", patch: list[Tensor]
) -> list[RowPair]:
    lm_clean = model.input_embeddings(clean)
    lm_corrupted = model.input_embeddings(corrupted)
    predictors = predictor_positions(clean.layout)
    pairs = []
    for row in range(clean.batch_size):
        n = int(clean.layout.lengths[row])
        pc = lm_clean.position_ids[row, ..., :n]
        pr = lm_corrupted.position_ids[row, ..., :n]
        if not torch.equal(pc, pr):
            raise AnalysisInputError(f"row {row}: the model numbers the clean and corrupted tokens differently. " + _ALIGN_HINT)
        pairs.append(
            RowPair(
                clean=lm_clean.embeds[row, :n],
                corrupted=lm_corrupted.embeds[row, :n],
                positions=pr,
                extras={k: v[row, :n] for k, v in lm_corrupted.extras.items()},
                extras_clean={k: v[row, :n] for k, v in lm_clean.extras.items()},
                predictor=int(predictors[row]),
                patch=patch[row].to(lm_clean.embeds.device),
            )
        )
    return pairs


def metrics(logits: Float[Tensor, "rows vocab"], target: int, foil: Optional[int]) -> tuple[Tensor, Tensor]:
    """Logit difference (target minus foil; NaN without a foil) and the target's probability."""
    logits = logits.float()
    prob = logits.softmax(-1)[:, target]
    diff = logits[:, target] - logits[:, foil] if foil is not None else torch.full_like(prob, float("nan"))
    return diff, prob


def rows_of(value: Tensor, rows: int) -> Tensor:
    """A one-row per-token input ``[1, pos, *rest]`` repeated for ``rows`` rows (per-token inputs
    may carry trailing axes, e.g. DeepStack features ``[pos, levels, d_model]``)."""
    return value.expand(rows, *value.shape[1:])


def batch_extras(extras: dict[str, Tensor], rows: int, suffix: slice) -> Optional[dict[str, Tensor]]:
    if not extras:
        return None
    return {k: rows_of(v[None, suffix], rows) for k, v in extras.items()}
