"""FastV-style visual-token pruning inside the language model.

Definition (Chen et al. 2024, "An Image is Worth 1/2 Tokens After Layer 2", read from their code):
for a layer K (1 <= K <= n_layers, or 0 for rankings that need no attention) and a keep fraction
R, blocks ``0..K-1`` run on the full sequence; the visual tokens are ranked; only the first
``round(R * n_img)`` of them stay for blocks ``K..n_layers-1``, every text token stays. The kept
tokens keep the positions the model gave them in the full sequence (FastV sets ``position_ids``
to the kept indices) and the mask entries it built for them, so pruning at K is the same as
hiding the dropped tokens' keys from every query in blocks K and later. Rankings:

* ``"attention"`` (FastV): the attention the *query* token pays each visual token in block K-1
  (``blocks.{K-1}.attn.hook_pattern``), averaged over heads; the query is the last token before
  the answer (the last prompt token, the one that generates the answer's first token).
* ``"random"``: a random order seeded by ``seed`` plus the row index (that of
  ``token_count_curve(order="random")``).
* ``"contribution"``: ``token_contributions(estimator="drop")``'s loss change, largest first.
  It reads the answer, so it is an oracle ranking, not a deployable one.
* a given order: a permutation of ``0..n_img-1`` (indices into the row's visual tokens in
  sequence order), most important first.

Visual tokens are every image position of the row (``TokenLayout.image_positions``: every image,
separators included); the answer loss is :func:`vlens.analysis.knockout.answer_loss`, the one
every token analysis uses. ``exact[...]`` is whether greedy decoding reproduces the given answer
token for token: greedy decoding emits answer token i exactly when it emitted tokens ``< i`` and
token i is the argmax given them, so this is the argmax of the teacher-forced logits at every
answer position (the ranking reads only the prompt, so it is the same during generation).

FLOPs (:func:`forward_flops`) are counted for the blocks only (embedding, final norm and head are
the same with and without pruning): per block on n tokens, ``2 n P + 4 n^2 h d_h`` with P the
block's weight-matrix entries (for a rotary block with a gated MLP ``d (2 h d_h + 2 h_kv d_h) + 3 d m``:
query and output, key and value of h_kv heads, three MLP matrices of width m; an ungated MLP has 2) and
``4 n^2 h d_h`` the scores and the weighted sum of h heads of size d_h (every entry of the n x n
matrix counted, as a dense kernel computes it). ``flops_ratio`` is
``(K F(n) + (L - K) F(n')) / (L F(n))`` with n' the kept length.

It is defined the same way in every family. In one not causal over the image (whose
image tokens attend to each other, ``adapter.causal_over_image`` False) the kept image tokens still attend to each other after K,
and the dropped ones no longer reach them. What differs there is only that the states of blocks
< K of *every* image token, not only of later ones, were computed with the dropped tokens present.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence, Union

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from vlens.analysis._common import BatchedResult, long_frame, stack_rows, typechecked
from vlens.analysis._shorten import shortened_after
from vlens.analysis.knockout import answer_loss, kept_extras, row_problems
from vlens.analysis.tokens import _order as given_order
from vlens.errors import AnalysisInputError, AnalysisUndefinedError

if TYPE_CHECKING:
    from vlens.analysis.knockout import RowProblem
    from vlens.inputs import VLMInputs
    from vlens.model import HookedVLM

Ranking = Union[str, Sequence[int], Tensor]
RANKINGS = ("attention", "random", "contribution")


def required_hooks(model: "HookedVLM") -> list[str]:
    """Hooks pruning reads from a cache: none (it runs the model itself)."""
    return []


@typechecked
@dataclass(frozen=True, eq=False, repr=False)
class PruningResult(BatchedResult):
    """Answer loss and exact-match accuracy with visual tokens pruned after layer K (module doc).

    Axes: ``ranking`` (``rankings``), ``layer`` (the K of ``layers``: blocks before K see every
    token), ``keep`` (the fractions of visual tokens kept, ``keep``). Every field but those three
    has a leading ``batch`` axis; ``row(b)`` gives one example's values.

    Attributes:
        loss: Mean answer cross-entropy, ``[batch, ranking, layer, keep]``.
        exact: Whether greedy decoding reproduces the answer token for token.
        flops_ratio: FLOPs of the pruned blocks over the unpruned ones, ``[batch, layer, keep]``.
        kept: Visual tokens kept, ``[batch, keep]``.
        full_loss: The unpruned answer loss, ``[batch]``; full_exact: its exact match.
        order: Per ranking and K, the row's visual-token positions most important first
            (the first ``kept`` stay), ``[batch, ranking, layer, img]``.
        image_positions: The row's visual-token positions in sequence order.
        query_positions: The token whose attention ranks (``"attention"``), ``[batch]``.
        layers: K of each ``layer`` entry; keep: each ``keep`` fraction; rankings: names.
    """

    ragged = {"img": "image_positions"}

    loss: Float[Tensor, "batch ranking layer keep"]
    exact: Bool[Tensor, "batch ranking layer keep"]
    flops_ratio: Float[Tensor, "batch layer keep"]
    kept: Int[Tensor, "batch keep"]
    full_loss: Float[Tensor, " batch"]
    full_exact: Bool[Tensor, " batch"]
    order: Int[Tensor, "batch ranking layer img"]
    image_positions: Int[Tensor, "batch img"]
    query_positions: Int[Tensor, " batch"]
    layers: Int[Tensor, " layer"]
    keep: Float[Tensor, " keep"]
    rankings: tuple[str, ...]

    def accuracy(self) -> Float[Tensor, "ranking layer keep"]:
        """Exact-match accuracy over the batch."""
        return self.exact.float().mean(0)

    def to_frame(self) -> pd.DataFrame:
        """Long format: batch, ranking (its name), layer (K), keep, kept, loss, exact, flops_ratio."""
        shape = self.loss.shape
        frame = long_frame(
            {
                "loss": self.loss,
                "exact": self.exact,
                "flops_ratio": self.flops_ratio[:, None].expand(shape),
                "kept": self.kept[:, None, None].expand(shape),
            },
            dims=("ranking", "layer", "keep"),
            coords={"layer": self.layers, "keep": self.keep},
        )
        frame["ranking"] = [self.rankings[i] for i in frame["ranking"]]
        return frame


def block_flops(model: "HookedVLM", n: int, block: int = 0) -> float:
    """FLOPs of one language-model block on ``n`` tokens (module doc).

    The matrix products are read off the block's own weights (every ``nn.Linear`` in it acts
    on every token: ``2 n`` FLOPs per weight), the attention scores off the config (``n_heads``,
    ``d_head``): TransformerLens's config does not read every family's MLP width (for some it
    assumes 4 d_model, which a checkpoint need not have), and the weights cannot misstate it.
    """
    cfg = model.cfg
    if getattr(cfg, "num_experts", None):
        raise AnalysisInputError("FLOPs of mixture-of-experts blocks are not counted: not every expert sees every token")
    seen: dict[int, int] = {}
    for module in model.bridge.blocks[block].modules():
        if isinstance(module, torch.nn.Linear):
            seen.setdefault(id(module), module.in_features * module.out_features)
    scores = 4 * n * n * int(cfg.n_heads) * int(cfg.d_head)
    return float(2 * n * sum(seen.values()) + scores)


def forward_flops(model: "HookedVLM", n: int, layer: int, n_kept: int) -> float:
    """FLOPs of the blocks when the first ``layer`` see ``n`` tokens and the rest ``n_kept``."""
    return sum(block_flops(model, n if b < layer else n_kept, b) for b in range(model.n_layers))


def kept_count(keep: float, n: int) -> int:
    """Visual tokens a fraction keeps: ``round(keep * n)``, halves rounded up."""
    return int(math.floor(keep * n + 0.5))


def _check_grid(
    model: "HookedVLM", layers: Union[int, Sequence[int]], keep: Union[float, Sequence[float]]
) -> tuple[list[int], list[float]]:
    n_layers = model.n_layers
    ks = [int(layers)] if isinstance(layers, int) else [int(k) for k in layers]
    bad = [k for k in ks if not 0 <= k <= n_layers]
    if not ks or bad:
        raise AnalysisInputError(f"layers {bad or ks} are out of range; K runs 0..{n_layers} (blocks before K see every token)")
    fractions = [float(r) for r in ([keep] if isinstance(keep, (int, float)) else keep)]
    bad_r = [r for r in fractions if not (0.0 <= r <= 1.0)]
    if not fractions or bad_r:
        raise AnalysisInputError(f"keep fractions {bad_r or fractions} must lie in [0, 1]")
    return ks, fractions


def _ranking_names(rankings: Sequence[Ranking]) -> list[str]:
    if isinstance(rankings, (str, Tensor)):
        rankings = [rankings]
    names: list[str] = []
    if any(isinstance(r, int) for r in rankings):
        raise AnalysisInputError(
            f"rankings {list(rankings)[:8]} holds bare ints; a given order is one entry: rankings=[order] "
            "(a permutation of 0..n_img-1), beside names such as 'attention'"
        )
    for i, r in enumerate(rankings):
        if isinstance(r, str):
            if r not in RANKINGS:
                raise AnalysisInputError(f"unknown ranking {r!r}; choose from {list(RANKINGS)} or give an order (a permutation)")
            names.append(r)
        else:
            names.append("given" if sum(not isinstance(x, str) for x in rankings) == 1 else f"given{i}")
    if not names:
        raise AnalysisInputError("rankings is empty; pass at least one of " + str(list(RANKINGS)))
    if len(set(names)) != len(names):
        raise AnalysisInputError(f"rankings {names} name one ranking twice")
    return names


def prune_visual_tokens(
    model: "HookedVLM",
    inputs: "VLMInputs",
    layers: Union[int, Sequence[int]] = (2,),
    keep: Union[float, Sequence[float]] = (0.5,),
    rankings: Sequence[Ranking] = ("attention", "random"),
    seed: int = 0,
) -> PruningResult:
    """FastV-style pruning over a grid of layers K and keep fractions (see :class:`PruningResult`).

    Args:
        model: A ``HookedVLM``.
        inputs: From ``model.prepare(image, prompt, answer=...)``; every row needs an answer.
        layers: The K values: blocks ``< K`` see every token, blocks ``>= K`` the kept ones
            (``n_layers``: nothing is pruned; 0: pruned before the first block, not with
            ``"attention"``, which reads block K-1).
        keep: Fractions of the row's visual tokens kept (``round(keep * n)`` tokens).
        rankings: Names in ``RANKINGS`` and/or explicit orders (permutations of ``0..n-1``).
        seed: Seed of the ``"random"`` ranking (plus the row index).
    """
    ks, fractions = _check_grid(model, layers, keep)
    names = _ranking_names(rankings)
    ranking_list: list[Ranking] = [rankings] if isinstance(rankings, (str, Tensor)) else list(rankings)
    if "attention" in names and 0 in ks:
        raise AnalysisInputError("the 'attention' ranking reads block K-1's attention, so K = 0 has none; use K >= 1")
    problems = row_problems(model, inputs, "prune_visual_tokens")
    featured = sorted({name for p in problems for name, v in p.extras.items() if v.ndim > 1})
    if featured:
        # DeepStack-style inputs: the text model adds these features to the image positions between
        # its layers, outside the blocks the shortening hooks cut, so a pruned run is undefined.
        raise AnalysisUndefinedError(
            f"prune_visual_tokens: the {model.adapter.family} language model adds per-token features {featured} "
            "to the image positions between its layers; vlens cannot drop them with the tokens from layer K on, "
            "so pruning is not defined for it (token_count_curve removes tokens from the input instead)"
        )
    contributions = None
    if "contribution" in names:
        from vlens.analysis.tokens import token_contributions

        contributions = token_contributions(model, inputs, estimator="drop")
    rows = []
    for row, problem in enumerate(problems):
        rows.append(_prune_row(model, problem, row, ks, fractions, names, ranking_list, seed, contributions))
    return PruningResult(
        loss=stack_rows([r["loss"] for r in rows]),
        exact=stack_rows([r["exact"] for r in rows]),
        flops_ratio=stack_rows([r["flops_ratio"] for r in rows]),
        kept=stack_rows([r["kept"] for r in rows]),
        full_loss=stack_rows([r["full_loss"] for r in rows]),
        full_exact=stack_rows([r["full_exact"] for r in rows]),
        order=stack_rows([r["order"] for r in rows]),
        image_positions=stack_rows([p.image.cpu() for p in problems]),
        query_positions=stack_rows([r["query"] for r in rows]),
        layers=torch.tensor(ks),
        keep=torch.tensor(fractions, dtype=torch.float32),
        rankings=tuple(names),
    )


def _attention_orders(model: "HookedVLM", problem: "RowProblem", query: int, ks: list[int]) -> tuple[dict[int, Tensor], Tensor]:
    """Per K, the visual tokens by the attention ``query`` pays them in block K-1 (mean over
    heads), and the unpruned logits at the answer positions, from one unpruned forward."""
    received: dict[int, Tensor] = {}
    image = problem.image

    def grab(block: int):
        def hook(pattern: Tensor, hook: Any) -> None:
            received[block] = pattern[0, :, query, image.to(pattern.device)].float().mean(0).cpu()

        return hook

    blocks = sorted({k - 1 for k in ks if k >= 1})
    hooks = [(f"blocks.{b}.attn.hook_pattern", grab(b)) for b in blocks]
    with torch.no_grad(), model.hooks(hooks):
        logits, _ = _forward(model, problem, problem.answer - 1)
    # Ties (equal attention) keep sequence order: a stable sort of the negated scores.
    orders = {b + 1: image.cpu()[torch.sort(-received[b], stable=True).indices] for b in blocks}
    return orders, logits


def _forward(model: "HookedVLM", problem: "RowProblem", logits_at: Tensor) -> tuple[Tensor, Any]:
    n = problem.embeds.shape[0]
    return model.run_language_model(
        problem.embeds[None],
        problem.positions[None],
        attention_mask=torch.ones(1, n, dtype=torch.long, device=problem.embeds.device),
        logits_to_keep=logits_at,
        extras=kept_extras(problem, None),
    )


def _scores(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Answer loss and exact match of ``[variant, n_answer, vocab]`` logits."""
    loss = answer_loss(logits, targets.expand(logits.shape[0], -1))
    exact = (logits.argmax(-1) == targets.to(logits.device)).all(-1)
    return loss.cpu(), exact.cpu()


def _prune_row(
    model: "HookedVLM",
    problem: "RowProblem",
    row: int,
    ks: list[int],
    fractions: list[float],
    names: list[str],
    rankings: list[Ranking],
    seed: int,
    contributions: Any,
) -> dict[str, Tensor]:
    n_img = problem.image.numel()
    length = problem.ids.shape[0]
    query = int(problem.answer[0]) - 1
    if bool((problem.image > query).any()):
        raise AnalysisInputError(f"row {row}: a visual token comes after the answer starts; pruning ranks the prompt's images only")
    targets = problem.ids[problem.answer]
    attention_orders, full_logits = _attention_orders(model, problem, query, ks if "attention" in names else [])
    full_loss, full_exact = _scores(full_logits, targets)
    fixed: dict[str, Tensor] = {}
    for name, spec in zip(names, rankings):
        if name == "random":
            fixed[name] = problem.image.cpu()[given_order("random", n_img, seed, row)]
        elif name == "contribution":
            delta = contributions.row(row).delta_loss.float()
            fixed[name] = problem.image.cpu()[torch.sort(-delta, stable=True).indices]
        elif name != "attention":
            fixed[name] = problem.image.cpu()[given_order(spec, n_img, seed, row)]  # type: ignore[arg-type]
    orders = torch.stack([
        torch.stack([attention_orders[k] if name == "attention" else fixed[name] for k in ks]) for name in names
    ])  # [ranking, layer, img]
    counts = torch.tensor([kept_count(r, n_img) for r in fractions])
    loss = torch.empty(len(names), len(ks), len(fractions))
    exact = torch.empty(len(names), len(ks), len(fractions), dtype=torch.bool)
    flops = torch.empty(len(ks), len(fractions))
    blocks = list(model.bridge.blocks)
    for j, k in enumerate(ks):
        for i, n_keep in enumerate(counts.tolist()):
            n_short = length - (n_img - n_keep)
            flops[j, i] = forward_flops(model, length, k, n_short) / forward_flops(model, length, k, length)
            if k == model.n_layers or n_keep == n_img:
                loss[:, j, i], exact[:, j, i] = full_loss, full_exact  # nothing is pruned
                continue
            keeps = torch.ones(len(names), length, dtype=torch.bool)
            for v in range(len(names)):
                keeps[v, orders[v, j, n_keep:]] = False
            index = torch.stack([kp.nonzero().flatten() for kp in keeps]).to(problem.embeds.device)
            # Every dropped token precedes the answer, so the answer's rows move by the same amount.
            at = problem.answer - (n_img - n_keep) - 1
            with torch.no_grad(), shortened_after(blocks, k, index, length):
                logits, _ = _forward(model, problem, at)
            loss[:, j, i], exact[:, j, i] = _scores(logits, targets)
    return {
        "loss": loss,
        "exact": exact,
        "flops_ratio": flops,
        "kept": counts,
        "full_loss": full_loss[0],
        "full_exact": full_exact[0],
        "order": orders,
        "query": torch.tensor(query),
    }
