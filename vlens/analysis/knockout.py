"""Answer loss with some visual tokens removed from the sequence: the shared engine.

Removing a token means the model is given the sequence without it: later tokens move
one position earlier, exactly as if the processor had produced the shorter sequence.
Everything runs on what the language model received in the full forward pass
(``HookedVLM.input_embeddings``: merged embeddings, the model's own positions, per-token
inputs), so the vision stack runs once, and a shortened sequence's positions are the
family's to state (``adapter.positions_after_removal``).

Two engines give the same losses:

* ``"naive"``: one forward of the language model per variant, on the reduced
  embeddings at the positions the adapter gives the reduced sequence (logits computed
  only where the loss reads them, as in ``"kv"``, so timings compare the prefix reuse
  alone).
* ``"kv"``: in a language model that is causal over the image
  (``adapter.causal_over_image``) the state of position p depends only on positions
  <= p, so for a variant whose first removed position is c, positions < c have exactly
  the full sequence's keys and values (same tokens, same positions). The full sequence
  runs once with a key/value cache; each variant then runs only its suffix (kept tokens
  from c on, at the reduced sequence's positions from c on), batched with other
  variants: the chunk attends to the cache up to its largest c (held in buffers filled
  once per call, see `_PrefixBuffers`) and each row's attention mask hides the cache
  entries at or after its own c.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Optional

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from vlens._compat import layer_cache_problem
from vlens.errors import AnalysisInputError

if TYPE_CHECKING:
    from vlens.inputs import VLMInputs
    from vlens.model import HookedVLM

Engine = Literal["kv", "naive"]
ENGINES = ("kv", "naive")


@dataclass(frozen=True)
class RowProblem:
    """One batch row, ready for knock-outs.

    Attributes:
        embeds: The row's merged input embeddings (real tokens only), model dtype.
        positions: The position ids the model gave them (``[pos]``, or ``[axes, pos]``).
        ids: Its token ids.
        answer: Positions t of the answer tokens (each predicted from t - 1).
        image: Positions of its image tokens, ascending.
        extras: The family's per-token inputs (``adapter.per_token_inputs``), ``[pos]`` each.
    """

    embeds: Float[Tensor, "pos d_model"]
    positions: Int[Tensor, "*axes pos"]
    ids: Int[Tensor, " pos"]
    answer: Int[Tensor, " n_answer"]
    image: Int[Tensor, " img"]
    extras: dict[str, Tensor]


def row_problems(model: "HookedVLM", inputs: "VLMInputs", analysis: str) -> list[RowProblem]:
    """Embeddings, ids, answer and image positions of every row of a batch."""
    layout = inputs.layout
    missing = [row for row in range(layout.batch_size) if not bool(layout.answer_mask[row].any())]
    if missing:
        raise AnalysisInputError(
            f"{analysis} measures the answer's loss, but row(s) {missing} have no answer tokens; "
            "pass answer= to model.prepare"
        )
    lm = model.input_embeddings(inputs)
    embeds = lm.embeds
    problems = []
    for row in range(layout.batch_size):
        length = int(layout.lengths[row])
        image = layout.image_positions(row)
        if image.numel() == 0:
            raise AnalysisInputError(f"{analysis}: row {row} has no image tokens to remove")
        answer = layout.answer_mask[row, :length].nonzero().flatten()
        if int(answer[0]) == 0:
            raise AnalysisInputError(f"{analysis}: row {row}'s answer starts at position 0; nothing predicts it")
        problems.append(
            RowProblem(
                embeds=embeds[row, :length],
                positions=lm.position_ids[row, ..., :length],
                ids=inputs.input_ids[row, :length].to(embeds.device),
                answer=answer.to(embeds.device),
                image=image.to(embeds.device),
                extras={name: value[row, :length] for name, value in lm.extras.items()},
            )
        )
    return problems


def answer_loss(
    logits: Float[Tensor, "*rows m vocab"],
    targets: Int[Tensor, "*rows n"],
    at: Optional[Int[Tensor, "*rows n"]] = None,
) -> Float[Tensor, " *rows"]:
    """The answer loss: mean cross-entropy (natural log, float32) of the targets.

    The one definition every analysis, the sweep and the report use. Target i is predicted
    by ``logits[..., at[..., i], :]`` (default: by row i), read as logsumexp minus the
    target's logit, so no ``[..., n, vocab]`` copy of the logits is made.
    """
    logits = logits.float()
    m, vocab = logits.shape[-2], logits.shape[-1]
    if at is None:
        at = torch.arange(targets.shape[-1], device=logits.device).expand_as(targets)
    if bool((at < 0).any()) or bool((at >= m).any()):
        raise AnalysisInputError(f"answer positions {at.tolist()} fall outside the {m} logit rows")
    lse = logits.logsumexp(-1).gather(-1, at)
    target_logit = logits.flatten(-2).gather(-1, at * vocab + targets.to(at.device))
    return (lse - target_logit).mean(-1)


def answer_losses(logits: Float[Tensor, "batch pos vocab"], inputs: "VLMInputs") -> list[float]:
    """Per row of a batch, the answer loss from its full-sequence logits (NaN without an answer)."""
    layout = inputs.layout
    out = []
    for row in range(layout.batch_size):
        pos = layout.answer_mask[row].nonzero().flatten().to(logits.device)
        if pos.numel() == 0:
            out.append(float("nan"))
            continue
        targets = inputs.input_ids[row, pos.cpu()].to(logits.device)
        out.append(float(answer_loss(logits[row], targets, at=pos - 1)))
    return out


MAX_TOKENS = 2048
"""Default bound on a suffix batch's padded size (variants x longest suffix)."""


@dataclass(frozen=True)
class EngineRun:
    """Which token-removal engine ran, and why when it is not the one asked for.

    Attributes:
        engine: ``"kv"`` or ``"naive"``, the engine that computed the losses.
        reason: Why the ``"kv"`` engine did not run (empty when it did, or when ``"naive"``
            was asked for).
        expected: False when the fallback was not expected for the family (the key/value cache
            did not work as the family's contract says it should): such a run also warns.
    """

    engine: Engine
    reason: str = ""
    expected: bool = True


def engine_for(model: "HookedVLM", length: int, requested: Engine) -> EngineRun:
    """The engine that gives exact losses for this model on a sequence of ``length`` tokens.

    Reads the family's contract only. ``"kv"`` needs a language model that is causal over
    the image (``adapter.causal_over_image``), whose states depend only on earlier
    embeddings and positions: per-token inputs (``adapter.per_token_inputs``) rule it out,
    and so do sliding-window layers shorter than the sequence (``adapter.attention_window``):
    their masks count cache slots, which the padding of a suffix batch shifts. These are
    expected fallbacks. A key/value cache that does not work
    (:func:`vlens._compat.layer_cache_problem`) is an unexpected one, and warns once.
    """
    if requested not in ENGINES:
        raise AnalysisInputError(f"unknown engine {requested!r}; choose one of {list(ENGINES)}")
    if requested == "naive":
        return EngineRun("naive")
    adapter = model.adapter
    if not adapter.causal_over_image:
        return EngineRun("naive", f"the {adapter.family} language model is not causal over the image")
    if adapter.per_token_inputs:
        names = list(adapter.per_token_inputs)
        return EngineRun("naive", f"the {adapter.family} language model reads per-token inputs {names}")
    window = adapter.attention_window
    if window is not None and window < length:
        return EngineRun("naive", f"sliding-window layers ({window} tokens) are shorter than the sequence ({length})")
    problem = layer_cache_problem(model)
    if problem is not None:
        return _unexpected(model, problem)
    return EngineRun("kv")


def _unexpected(model: "HookedVLM", reason: str) -> EngineRun:
    warned = model.__dict__.setdefault("_engine_fallbacks_warned", set())  # once per model and reason
    if reason not in warned:
        warned.add(reason)
        warnings.warn(
            f"token-removal analyses fall back from the kv engine to the naive one (same losses, one full "
            f"forward per variant): {reason}",
            EngineFallbackWarning,
            stacklevel=4,
        )
    return EngineRun("naive", reason, expected=False)


class EngineFallbackWarning(UserWarning):
    """The kv engine could not run where the family's contract says it should."""


def merge_runs(runs: list[EngineRun]) -> EngineRun:
    """One record for a result whose rows ran separately: the first fallback, if any."""
    return next((run for run in runs if run.engine != "kv"), runs[0])


def variant_losses(
    model: "HookedVLM",
    problem: RowProblem,
    keeps: Bool[Tensor, "variant pos"],
    engine: Engine = "kv",
    batch_size: int = 32,
    max_tokens: int = MAX_TOKENS,
) -> tuple[Float[Tensor, " variant"], EngineRun]:
    """The answer loss of each variant of a row (``keeps[v]``: positions it keeps), and the
    engine that computed them.

    Every variant must keep every answer token and the token before the first one.
    Identical variants run once; with ``"kv"`` a variant that keeps everything costs
    nothing beyond the shared full forward.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise AnalysisInputError(f"batch_size must be a positive int, got {batch_size!r}")
    run = engine_for(model, problem.ids.shape[0], engine)
    keeps = keeps.to(problem.embeds.device)
    if not bool(keeps[:, problem.answer].all()):
        raise AnalysisInputError("a variant removes an answer token; only non-answer tokens can be removed")
    unique, inverse = keeps.unique(dim=0, return_inverse=True)  # run each distinct variant once
    with torch.no_grad():
        losses = None
        if run.engine == "kv":
            losses, problem_found = _kv_losses(model, problem, unique, batch_size, max_tokens)
            if problem_found is not None:
                run = _unexpected(model, problem_found)
        if losses is None:
            losses = torch.stack([_naive_loss(model, problem, keep) for keep in unique])
    return losses[inverse].cpu(), run


def _naive_loss(model: "HookedVLM", problem: RowProblem, keep: Tensor) -> Tensor:
    embeds = problem.embeds[keep][None]
    n = embeds.shape[1]
    new_index = keep.long().cumsum(0) - 1
    logits, _ = model.run_language_model(
        embeds,
        model.adapter.positions_after_removal(problem.positions, keep)[None],
        attention_mask=torch.ones(1, n, dtype=torch.long, device=embeds.device),
        logits_to_keep=new_index[problem.answer] - 1,  # only the logits the loss reads
        extras=kept_extras(problem, keep),
    )
    return answer_loss(logits[0], problem.ids[problem.answer])


def _kv_losses(
    model: "HookedVLM", problem: RowProblem, keeps: Tensor, batch_size: int, max_tokens: int
) -> tuple[Optional[Tensor], Optional[str]]:
    """The kv engine's losses, or None and the reason when the cache it needs is not there."""
    device = problem.embeds.device
    length = problem.embeds.shape[0]
    targets = problem.ids[problem.answer]
    # First removed position of each variant (the row length when it removes nothing).
    removed = ~keeps
    first = torch.where(removed.any(1), removed.float().argmax(1), torch.full_like(keeps[:, 0], length, dtype=torch.long))
    logits, cache = model.run_language_model(
        problem.embeds[None],
        problem.positions[None],
        attention_mask=torch.ones(1, length, dtype=torch.long, device=device),
        use_cache=True,
        logits_to_keep=problem.answer - 1,
        extras=kept_extras(problem, None),
    )
    full = answer_loss(logits[0], targets)
    kv = [(layer.keys, layer.values) for layer in cache.layers] if cache is not None else []
    cached = [None if k is None else int(k.shape[-2]) for k, _ in kv]
    if not kv or any(n != length for n in cached):
        return None, f"the full sequence's key/value cache holds {cached} positions per layer, not {length}"
    losses = torch.full((keeps.shape[0],), float("nan"), device=device)
    losses[first == length] = full
    todo = (first < length).nonzero().flatten()
    todo = todo[first[todo].argsort()]  # neighbours share cache length and suffix length
    if bool((first[todo] > problem.answer[0] - 1).any()):
        raise AnalysisInputError("a variant removes a token after the answer starts; only earlier tokens can go")
    suffix_len = keeps[todo].sum(1) - first[todo]  # every position before the first removed one is kept
    groups = _chunks(todo, suffix_len.tolist(), batch_size, max_tokens)
    if groups:
        rows = max(len(g) for g in groups)
        # Slots a chunk uses: its largest c plus its longest suffix (at most ~length).
        suffix_of = torch.zeros_like(first)
        suffix_of[todo] = suffix_len
        room = max(int(first[g].max() + suffix_of[g].max()) for g in groups)
        buffers = _PrefixBuffers(kv, rows, max(room, length))
        for chunk in groups:
            losses[chunk] = _suffix_losses(model, problem, keeps[chunk], first[chunk], buffers, targets)
    return losses, None


class _PrefixBuffers:
    """Per layer, one key and one value buffer ``[rows, heads, room, head_dim]`` whose first
    ``length`` slots hold the full sequence's cache, copied to every row once.

    A chunk whose largest first-removed position is c writes its suffix's keys and values at
    slots c, c+1, ... and attends to slots ``< c + suffix``; rows with a smaller c hide the
    slots between their own c and the chunk's through the attention mask. This replaces
    concatenating a per-chunk copy of the prefix (``batch x c`` per layer, each chunk), which
    dominated the engine's time, with one copy per call plus restoring the few slots a suffix
    overwrote.
    """

    def __init__(self, kv: list[tuple[Tensor, Tensor]], rows: int, room: int) -> None:
        self.prefix = kv
        self.buffers = []
        for k, v in kv:
            kb = k.new_empty(rows, k.shape[1], room, k.shape[3])
            vb = v.new_empty(rows, v.shape[1], room, v.shape[3])
            kb[:, :, : k.shape[2]] = k
            vb[:, :, : v.shape[2]] = v
            self.buffers.append((kb, vb))

    def cache(self, rows: int, prefix_len: int) -> Any:
        """A Hugging Face cache over the first ``rows`` rows holding ``prefix_len`` slots."""
        from transformers.cache_utils import Cache, DynamicCache

        layer_class = _buffer_layer_class()
        layers = [layer_class(kb, vb, rows, prefix_len) for kb, vb in self.buffers]
        cache = DynamicCache.__new__(DynamicCache)
        Cache.__init__(cache, layers=layers)
        return cache

    def restore(self, start: int, stop: int) -> None:
        """Puts the full sequence's entries back into slots ``start..stop-1`` after a chunk."""
        for (k, v), (kb, vb) in zip(self.prefix, self.buffers):
            stop_here = min(stop, k.shape[2])
            if start < stop_here:
                kb[:, :, start:stop_here] = k[:, :, start:stop_here]
                vb[:, :, start:stop_here] = v[:, :, start:stop_here]


@functools.cache
def _buffer_layer_class() -> type:
    # Defined on first use: vlens imports transformers only when a model is used.
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        """A cache layer whose ``update`` writes into a `_PrefixBuffers` slot range."""

        def __init__(self, keys: Tensor, values: Tensor, rows: int, prefix_len: int) -> None:
            super().__init__()
            self._key_buffer, self._value_buffer = keys, values
            self._rows, self._prefix_len = rows, prefix_len
            self.dtype, self.device = keys.dtype, keys.device
            self.keys = keys[:rows, :, :prefix_len]
            self.values = values[:rows, :, :prefix_len]
            self.is_initialized = True

        def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
            stop = self._prefix_len + key_states.shape[-2]
            self._key_buffer[: self._rows, :, self._prefix_len : stop] = key_states
            self._value_buffer[: self._rows, :, self._prefix_len : stop] = value_states
            self.keys = self._key_buffer[: self._rows, :, :stop]
            self.values = self._value_buffer[: self._rows, :, :stop]
            return self.keys, self.values

    return BufferLayer


def _chunks(order: Tensor, lengths: list[int], batch_size: int, max_tokens: int) -> list[Tensor]:
    """Consecutive groups of at most ``batch_size`` variants whose padded suffix batch
    (rows x longest suffix) stays within ``max_tokens`` (a single long one may exceed it)."""
    groups, start, longest = [], 0, 0
    for i, n in enumerate(lengths):
        longest_with = max(longest, n)
        if i > start and ((i - start + 1) * longest_with > max_tokens or i - start == batch_size):
            groups.append(order[start:i])
            start, longest_with = i, n
        longest = longest_with
    if lengths:
        groups.append(order[start:])
    return groups


def _suffix_losses(
    model: "HookedVLM", problem: RowProblem, keeps: Tensor, starts: Tensor, buffers: _PrefixBuffers, targets: Tensor
) -> Tensor:
    device = problem.embeds.device
    batch = keeps.shape[0]
    c_max = int(starts.max())
    suffixes = [keep[c:].nonzero().flatten() + c for keep, c in zip(keeps, starts.tolist())]
    s_max = max(len(s) for s in suffixes)
    d_model = problem.embeds.shape[-1]
    embeds = problem.embeds.new_zeros(batch, s_max, d_model)
    mask = torch.zeros(batch, c_max + s_max, dtype=torch.long, device=device)
    # The suffix's positions are those of the reduced sequence from c on (the prefix before c is
    # the full sequence's own); padded slots repeat the last real position (masked keys, and
    # queries whose logits are never read).
    position_ids = problem.positions.new_zeros(batch, *problem.positions.shape[:-1], s_max)
    # Where each answer target is predicted from, as an index into the suffix.
    pred = torch.empty(batch, len(problem.answer), dtype=torch.long, device=device)
    extras = {name: value.new_zeros(batch, s_max) for name, value in problem.extras.items()}
    for i, (suffix, c) in enumerate(zip(suffixes, starts.tolist())):
        n = len(suffix)
        # Right padding: padded queries come after every real one, so no real query sees
        # them, and each still attends to something (no fully masked, NaN rows).
        embeds[i, :n] = problem.embeds[suffix]
        mask[i, :c] = 1
        mask[i, c_max : c_max + n] = 1
        suffix_positions = model.adapter.positions_after_removal(problem.positions, keeps[i])[..., c:]
        position_ids[i, ..., :n] = suffix_positions
        position_ids[i, ..., n:] = suffix_positions[..., -1:]
        for name, value in problem.extras.items():
            extras[name][i, :n] = value[suffix]
        index_in_suffix = torch.searchsorted(suffix, problem.answer)  # answer tokens are all kept
        pred[i] = index_in_suffix - 1
    if bool((pred < 0).any()):
        raise AnalysisInputError("a variant's first removed token is the one right before the answer")
    keep_idx, inverse = pred.flatten().unique(return_inverse=True)
    past = buffers.cache(batch, c_max) if c_max > 0 else None
    logits, _ = model.run_language_model(
        embeds,
        position_ids,
        attention_mask=mask,
        past_key_values=past,
        use_cache=past is not None,
        logits_to_keep=keep_idx,
        extras=extras or None,
    )
    if past is not None:
        buffers.restore(c_max, c_max + s_max)
    # Each row predicts each target at its own index into the kept logits.
    return answer_loss(logits, targets[None, :].expand(batch, -1), at=inverse.view(batch, -1))


def kept_extras(problem: RowProblem, keep: Tensor | None) -> dict[str, Tensor] | None:
    """The per-token inputs of the kept positions, as a batch of one."""
    if not problem.extras:
        return None
    return {name: (value if keep is None else value[keep])[None] for name, value in problem.extras.items()}
