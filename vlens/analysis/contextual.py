"""A contextual lens for visual tokens (LatentLens-style, training-free).

Definition (after Krojer et al., "LatentLens"): a *bank* is the text-token hidden states of
contexts the user gives (e.g. a data set's captions) run through the same language model,
text only. For a visual token's residual stream ``v`` at layer index l (the layer-axis
convention: 0 = ``blocks.0.hook_resid_pre``, l = ``blocks.{l-1}.hook_resid_post``), its
neighbours are the bank states ``h`` *of the same layer* with the largest ``cos(v, h)``
(float32, raw residual stream); each neighbour's word is the token whose state it is. The k
nearest are kept, in order, with their context and position in it (one word may appear more
than once, from different contexts).

The bank: each context is tokenized by the model's tokenizer (its special tokens added as it
adds them), run through the language model alone (``HookedVLM.run_language_model`` on the token
embeddings at ``adapter.text_positions``, right-padded), and every real token that is not a
special token (BOS, padding, ...) is a bank entry. Contexts are text, so no image tokens and no
per-token inputs (those mark image tokens) are given.

Memory: the bank is never held. It is run in chunks of ``chunk_size`` contexts; inside each
layer's hook the chunk's states are compared with the queries and merged into a running top-k,
then dropped. What is held at once beyond one chunk's forward pass: the query states
(``layers x n_query x d_model`` float32), one layer's similarity block
(``n_query x chunk_tokens`` float32, chunk_tokens <= chunk_size x the longest context) and the
running top-k (``layers x n_query x k``, four tensors); it does not grow with the bank.

Same positions, labels and match rate as :func:`vlens.analysis.logit_lens`: ``match_rate[l]`` is
the fraction of labelled positions whose label id is among the k neighbours' words, and
``hit_rate(ids)`` the lens's :func:`vlens.analysis.lens.hit_rate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from vlens._modules import input_embeddings
from vlens.analysis._common import (
    BatchedResult,
    PositionSpec,
    check_cached,
    check_nonempty,
    long_frame,
    resid_hooks,
    row_positions,
    stack_optional,
    stack_rows,
    typechecked,
)
from vlens.analysis.lens import _check_layers, _label_ids, _match_rate, hit_rate
from vlens.analysis.similarity import unit
from vlens.errors import AnalysisInputError

if TYPE_CHECKING:
    from vlens.cache import VLMCache
    from vlens.model import HookedVLM


def required_hooks(model: "HookedVLM") -> list[str]:
    """Hooks :func:`contextual_lens` reads from the cache: the residual stream at every layer boundary."""
    return resid_hooks(model.n_layers)


@typechecked
@dataclass(frozen=True, eq=False, repr=False)
class ContextualLensResult(BatchedResult):
    """The k nearest bank states of each chosen position's residual stream, per layer (module doc).

    Every field but ``layers``, ``n_contexts`` and ``n_bank_tokens`` has a leading ``batch`` axis;
    rows with fewer positions are padded at the end with -1 / NaN. ``row(b)`` gives one example's values.

    Attributes:
        top_ids: The word (token id) of each neighbour, nearest first, ``[layer, pos, k]``.
        top_similarity: Its cosine similarity.
        top_context: Index of its context in ``contexts``.
        top_offset: Its token position in that context.
        positions: The sequence position of each analysed ``pos`` index.
        layers: The layer index of each ``layer`` entry.
        n_contexts: Contexts in the bank (``top_context`` indexes the list given).
        n_bank_tokens: Bank entries per layer.
        label_ids: The expected token id per position (-1: no label), or None.
        match_rate: Per layer, the fraction of labelled positions whose label is among the
            neighbours' words (NaN when none is labelled), or None.
    """

    ragged = {"pos": "positions"}

    top_ids: Int[Tensor, "batch layer pos k"]
    top_similarity: Float[Tensor, "batch layer pos k"]
    top_context: Int[Tensor, "batch layer pos k"]
    top_offset: Int[Tensor, "batch layer pos k"]
    positions: Int[Tensor, "batch pos"]
    layers: Int[Tensor, " layer"]
    n_contexts: int
    n_bank_tokens: int
    label_ids: Optional[Int[Tensor, "batch pos"]] = None
    match_rate: Optional[Float[Tensor, "batch layer"]] = None

    @property
    def k(self) -> int:
        return int(self.top_ids.shape[-1])

    def match(self, label_ids: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch layer"]:
        """Per layer, the fraction of positions whose label (-1: none) is among the neighbours' words."""
        return _match_rate(self.top_ids, torch.as_tensor(label_ids))

    def hit_rate(self, ids: Sequence[Int[Tensor, " n"]]) -> Float[Tensor, "batch layer"]:
        """Per layer, the fraction of a row's positions whose neighbours' words hold any of ``ids[b]``."""
        return hit_rate(self.top_ids, self.positions, ids)

    def to_frame(self) -> pd.DataFrame:
        """Long format: batch, layer, pos, rank, token_id, similarity, context, offset."""
        return long_frame(
            {"token_id": self.top_ids, "similarity": self.top_similarity, "context": self.top_context,
             "offset": self.top_offset},
            dims=("layer", "pos", "rank"),
            coords={"layer": self.layers, "pos": self.positions},
        )


@dataclass(frozen=True)
class BankChunk:
    """One chunk of the bank at one layer: unit-norm states and where each came from."""

    states: Float[Tensor, "m d_model"]
    ids: Int[Tensor, " m"]
    context: Int[Tensor, " m"]
    offset: Int[Tensor, " m"]


class NearestStates:
    """A running top-k of the bank entries nearest (cosine) to fixed queries, one layer at a time.

    Args:
        queries: Per layer, ``[n, d_model]`` query states (any norm).
        k: Neighbours kept.
    """

    def __init__(self, queries: Sequence[Tensor], k: int) -> None:
        self.queries = [unit(q.float()) for q in queries]
        n = self.queries[0].shape[0] if self.queries else 0
        self.k = k
        self.sim = [torch.full((n, k), -float("inf"), device=q.device) for q in self.queries]
        self.ids = [torch.full((n, k), -1, dtype=torch.long, device=q.device) for q in self.queries]
        self.context = [torch.full((n, k), -1, dtype=torch.long, device=q.device) for q in self.queries]
        self.offset = [torch.full((n, k), -1, dtype=torch.long, device=q.device) for q in self.queries]

    def add(self, layer: int, chunk: BankChunk) -> None:
        """Merge one chunk of bank states of layer ``layer`` (index into ``queries``) into its top-k."""
        q = self.queries[layer]
        states = unit(chunk.states.float().to(q.device))
        sim = torch.cat([self.sim[layer], q @ states.T], dim=1)
        n = q.shape[0]

        def joined(running: Tensor, new: Tensor) -> Tensor:
            return torch.cat([running, new.to(q.device).expand(n, -1)], dim=1)

        top = sim.topk(self.k, dim=1)
        self.sim[layer] = top.values
        self.ids[layer] = joined(self.ids[layer], chunk.ids).gather(1, top.indices)
        self.context[layer] = joined(self.context[layer], chunk.context).gather(1, top.indices)
        self.offset[layer] = joined(self.offset[layer], chunk.offset).gather(1, top.indices)


def tokenize_contexts(model: "HookedVLM", contexts: Sequence[str]) -> list[list[int]]:
    """Each context's token ids as the model's tokenizer gives them (special tokens included)."""
    if isinstance(contexts, str) or not contexts:
        raise AnalysisInputError("contexts must be a non-empty list of strings (e.g. captions)")
    bad = [i for i, c in enumerate(contexts) if not isinstance(c, str) or not c.strip()]
    if bad:
        raise AnalysisInputError(f"contexts {bad[:8]} are empty or not strings; every context must be non-empty text")
    return [list(model.tokenizer(c)["input_ids"]) for c in contexts]


def bank_mask(model: "HookedVLM", ids: Sequence[int]) -> list[bool]:
    """Which tokens of a context are bank entries: every one that is not a special token."""
    special = set(model.tokenizer.all_special_ids)
    return [i not in special for i in ids]


def stream_bank(
    model: "HookedVLM", contexts: Sequence[str], nearest: NearestStates, layers: Sequence[int], chunk_size: int = 16
) -> int:
    """Run the bank's contexts through the language model in chunks, merging each layer's states
    into ``nearest`` inside its hook; returns the number of bank entries per layer."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise AnalysisInputError(f"chunk_size must be a positive int, got {chunk_size!r}")
    tokens = tokenize_contexts(model, contexts)
    masks = [bank_mask(model, t) for t in tokens]
    total = sum(sum(m) for m in masks)
    if total < nearest.k:
        raise AnalysisInputError(f"the bank has {total} text tokens (special tokens excluded), fewer than k = {nearest.k}")
    names = resid_hooks(model.n_layers)
    device = model.device
    embed = input_embeddings(model.hf_model)
    for start in range(0, len(tokens), chunk_size):
        chunk = tokens[start : start + chunk_size]
        width = max(len(t) for t in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        attention = torch.zeros(len(chunk), width, dtype=torch.long)
        entry = torch.zeros(len(chunk), width, dtype=torch.bool)
        for i, t in enumerate(chunk):
            ids[i, : len(t)] = torch.tensor(t)
            attention[i, : len(t)] = 1
            entry[i, : len(t)] = torch.tensor(masks[start + i])
        where = entry.nonzero()
        context = where[:, 0] + start
        info = (ids[entry], context, where[:, 1])

        hooks = [(names[l], _merge_hook(nearest, i, entry, info)) for i, l in enumerate(layers)]
        positions = model.adapter.text_positions(width, device)
        with torch.no_grad(), model.hooks(hooks):
            model.run_language_model(
                embed(ids.to(device)),
                positions.expand(len(chunk), *positions.shape),
                attention_mask=attention.to(device),
                logits_to_keep=torch.zeros(1, dtype=torch.long, device=device),  # no vocabulary-wide logits
            )
    return total


def _merge_hook(nearest: NearestStates, layer: int, entry: Tensor, info: tuple[Tensor, Tensor, Tensor]) -> Any:
    def hook(activation: Any, hook: Any) -> None:
        states = activation.detach()[entry.to(activation.device)]
        nearest.add(layer, BankChunk(states, *info))

    return hook


def contextual_lens(
    model: "HookedVLM",
    cache: "VLMCache",
    contexts: Sequence[str],
    positions: PositionSpec = "image",
    layers: Optional[Sequence[int]] = None,
    k: int = 5,
    labels: Any = None,
    chunk_size: int = 16,
) -> ContextualLensResult:
    """The k nearest text-token states of the same layer, from a bank of contexts (module doc).

    Args:
        model: The ``HookedVLM`` the cache came from.
        cache: From ``model.run_with_cache(inputs, names_filter=contextual.required_hooks(model))``.
        contexts: The bank's texts (e.g. captions); each runs through the same language model.
        positions: Which positions' states are looked up (as in ``logit_lens``; default every image token).
        layers: Layer indices in ``0..n_layers`` (default all).
        k: Neighbours per position and layer.
        labels: Expected word per position, for ``match_rate`` (the forms ``logit_lens`` takes).
        chunk_size: Contexts per forward pass of the bank.
    """
    chosen = _check_layers(model.n_layers, layers)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise AnalysisInputError(f"k must be a positive int, got {k!r}")
    names = [resid_hooks(model.n_layers)[l] for l in chosen]
    check_cached(cache, names, "contextual_lens", "contextual")
    layout = cache.layout
    batch = layout.batch_size
    if labels is not None and batch > 1 and not isinstance(labels, Tensor) and len(labels) != batch:
        raise AnalysisInputError(f"labels has {len(labels)} rows but the batch has {batch}")
    rows = []
    for row in range(batch):
        pos = row_positions(layout, positions, row)
        check_nonempty(pos, "positions", positions, row)
        rows.append(pos)
    label_rows = None
    if labels is not None:
        label_rows = [
            _label_ids(model.tokenizer, labels if (isinstance(labels, Tensor) or batch == 1) else labels[row], p.numel(), row)
            for row, p in enumerate(rows)
        ]
    queries = [torch.cat([cache[name][row, pos.to(cache[name].device)] for row, pos in enumerate(rows)]) for name in names]
    nearest = NearestStates(queries, k)
    n_bank = stream_bank(model, contexts, nearest, chosen, chunk_size)
    bounds = torch.tensor([0] + [p.numel() for p in rows]).cumsum(0).tolist()

    def per_row(values: list[Tensor]) -> Tensor:
        stacked = torch.stack([v.cpu() for v in values])  # [layer, n_query, k]
        return stack_rows([stacked[:, bounds[r] : bounds[r + 1]] for r in range(batch)])

    top_ids = per_row(nearest.ids)
    label_ids = None if label_rows is None else stack_optional(label_rows)
    match = None
    if label_rows is not None:
        match = stack_rows([_match_rate(top_ids[r, :, : rows[r].numel()], label_rows[r]) for r in range(batch)])
    return ContextualLensResult(
        top_ids=top_ids,
        top_similarity=per_row(nearest.sim),
        top_context=per_row(nearest.context),
        top_offset=per_row(nearest.offset),
        positions=stack_rows(rows),
        layers=torch.tensor(chosen),
        n_contexts=len(contexts),
        n_bank_tokens=n_bank,
        label_ids=label_ids,
        match_rate=match,
    )


def scene_captions(n: int = 200, seed: int = 7) -> list[str]:
    """A default bank: the captions of the first ``n`` training-split generated scenes of stream
    ``seed`` (``vlens.data.make_scenes``), the language of the synthetic scenes' prompts."""
    from vlens.data import make_scenes

    return [scene.caption for scene in make_scenes(n, seed=seed, split="train", image_size=16, patch_size=8)]
