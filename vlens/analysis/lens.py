"""The logit lens: what the language model would predict from each layer's residual stream."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from vlens.analysis._common import (
    BatchedResult,
    PositionSpec,
    ShortRepr,
    check_cached,
    check_nonempty,
    fp32_final_norm,
    fp32_unembed,
    long_frame,
    resid_hooks,
    row_positions,
    stack_optional,
    stack_rows,
    typechecked,
)
from vlens.analysis.streaming import Reduction, Stream
from vlens.errors import AnalysisInputError

if TYPE_CHECKING:
    from vlens.cache import VLMCache
    from vlens.inputs import VLMInputs
    from vlens.layout import TokenLayout
    from vlens.model import HookedVLM

Word = Union[str, int]
LabelsFn = Callable[["VLMInputs", int], Tensor]
LENS_CHUNK_ELEMENTS = 1 << 20
"""At most this many logits (4 MiB in float32) are held at once per reduction."""


def required_hooks(model: "HookedVLM") -> list[str]:
    """Hooks :func:`logit_lens` reads: the residual stream at every layer boundary."""
    return resid_hooks(model.n_layers)


@typechecked
@dataclass(frozen=True, eq=False, repr=False)
class LensResult(BatchedResult):
    """The logit lens at chosen layers and positions.

    Definition: for layer index l (0 = ``blocks.0.hook_resid_pre``, the input
    embeddings; l >= 1 = ``blocks.{l-1}.hook_resid_post``) and position p, the
    distribution ``log_softmax(unembed(final_norm(resid[l, p])))`` in float32, the
    language model's own final norm and unembedding applied to the raw residual stream.
    Only the top-k of each distribution is kept, never the full vocabulary.

    Every field but ``layers`` and ``word_ids`` has a leading ``batch`` axis; rows with
    fewer positions are padded at the end with -1 / NaN. ``row(b)`` gives one example's values.

    Attributes:
        top_ids: The k most likely token ids, most likely first, ``[layer, pos, k]``.
        top_logprobs: Their log-probabilities, ``[layer, pos, k]``.
        positions: The sequence position of each analysed ``pos`` index.
        layers: The layer index (see above) of each ``layer`` entry.
        word_ids: Token ids of the ``words`` asked about (a word given as text is its
            first token when tokenized alone), or None.
        word_logprobs: Log-probability of each word, ``[layer, pos, word]``.
        word_ranks: Rank of each word, 0 for the most likely token: the number of
            vocabulary entries with a strictly higher log-probability.
        label_ids: The expected token id per position (-1: no label), or None.
        match_rate: Per layer, the fraction of labelled positions whose label is among
            the top-k ids (NaN when no position is labelled), or None.
    """

    ragged = {"pos": "positions"}

    top_ids: Int[Tensor, "batch layer pos k"]
    top_logprobs: Float[Tensor, "batch layer pos k"]
    positions: Int[Tensor, "batch pos"]
    layers: Int[Tensor, " layer"]
    word_ids: Optional[Int[Tensor, " word"]] = None
    word_logprobs: Optional[Float[Tensor, "batch layer pos word"]] = None
    word_ranks: Optional[Int[Tensor, "batch layer pos word"]] = None
    label_ids: Optional[Int[Tensor, "batch pos"]] = None
    match_rate: Optional[Float[Tensor, "batch layer"]] = None

    @property
    def k(self) -> int:
        return int(self.top_ids.shape[-1])

    def match(self, label_ids: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch layer"]:
        """Per layer, the fraction of positions whose label (-1: none) is in the top-k."""
        return _match_rate(self.top_ids, torch.as_tensor(label_ids))

    def hit_rate(self, ids: Sequence[Int[Tensor, " n"]]) -> Float[Tensor, "batch layer"]:
        """Per layer, the fraction of a row's positions whose top-k holds any of that row's
        ``ids[b]`` (e.g. the scene's object words; NaN for a row with no id)."""
        return hit_rate(self.top_ids, self.positions, ids)

    def final_agreement(self) -> Float[Tensor, "batch layer"]:
        """Per layer, the fraction of positions whose top-1 equals their top-1 at the last layer."""
        top1 = self.top_ids[..., 0]  # [batch, layer, pos]
        real = (self.positions >= 0).unsqueeze(1)
        agree = (top1 == top1[:, -1:]) & real
        return agree.sum(-1).float() / real.sum(-1).clamp_min(1).float()

    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per (batch,) layer, position, rank with ``token_id`` and
        ``logprob``; ``layer`` holds the layer index and ``pos`` the sequence position."""
        return long_frame(
            {"token_id": self.top_ids, "logprob": self.top_logprobs},
            dims=("layer", "pos", "rank"),
            coords={"layer": self.layers, "pos": self.positions},
        )

    def words_frame(self) -> pd.DataFrame:
        """Long format of the asked words: layer, pos, word (its token id), logprob, rank."""
        if self.word_ids is None:
            raise AnalysisInputError("this LensResult was computed without words=; pass words to logit_lens")
        assert self.word_logprobs is not None and self.word_ranks is not None  # computed whenever word_ids is
        frame = long_frame(
            {"logprob": self.word_logprobs, "rank": self.word_ranks.float()},
            dims=("layer", "pos", "word"),
            coords={"layer": self.layers, "pos": self.positions, "word": self.word_ids},
        )
        frame["rank"] = frame["rank"].astype("int64")
        return frame


def hit_rate(
    top_ids: Int[Tensor, "batch layer pos k"], positions: Int[Tensor, "batch pos"], ids: Sequence[Int[Tensor, " n"]]
) -> Float[Tensor, "batch layer"]:
    """Per row and layer, the fraction of its positions whose top-k holds any of ``ids[b]`` (NaN
    for a row with no id); shared by the logit lens and the contextual lens."""
    out = torch.full(top_ids.shape[:2], float("nan"))
    for b, row_ids in enumerate(ids):
        n = int((positions[b] >= 0).sum())
        if n and len(row_ids):
            top = top_ids[b, :, :n]  # [layer, pos, k]
            out[b] = torch.isin(top, torch.as_tensor(row_ids).long()).any(-1).float().mean(-1)
    return out


def _match_rate(top_ids: Tensor, label_ids: Tensor) -> Tensor:
    hit = (top_ids == label_ids.unsqueeze(-2).unsqueeze(-1)).any(-1)  # [*b, layer, pos]
    labelled = (label_ids >= 0).unsqueeze(-2)
    n = labelled.sum(-1).float()
    return torch.where(n > 0, (hit & labelled).sum(-1).float() / n.clamp_min(1), torch.full_like(n, float("nan")))


def word_id(tokenizer: Any, word: Word, what: str = "word") -> int:
    """The token id that stands for a word: an id as it is, a text as its first token when
    tokenized alone. The one rule every analysis, the sweep, the CLI and the examples use.

    Raises:
        AnalysisInputError: for an id outside the vocabulary, or a text that tokenizes to
            nothing or to the unknown token (the lens would then look for ``<unk>``).
    """
    if isinstance(word, bool) or not isinstance(word, (int, str)):
        raise AnalysisInputError(f"{what} must be a string or a token id, got {type(word).__name__}: {word!r}")
    if isinstance(word, int):
        if not 0 <= word < len(tokenizer):
            raise AnalysisInputError(f"{what} id {word} is outside the vocabulary (0..{len(tokenizer) - 1})")
        return word
    ids = tokenizer.encode(word, add_special_tokens=False)
    if not ids:
        raise AnalysisInputError(f"{what} {word!r} tokenizes to nothing")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and int(ids[0]) == unk and word != tokenizer.unk_token:
        raise AnalysisInputError(
            f"{what} {word!r} is not in the vocabulary: it tokenizes to {tokenizer.unk_token!r}; "
            "use a word from model.tokenizer.get_vocab()"
        )
    return int(ids[0])


def word_forms(tokenizer: Any, word: str) -> list[int]:
    """Every id that can stand for a word in a lens readout: the :func:`word_id` of each of its
    surface forms (``"red"``, ``" red"``, ``"Red"``, ``" Red"``) that decodes to the start of
    the word (a subword tokenizer spells " red" with its own token). The first entry, when
    there is one, is ``word_id(tokenizer, word)``; forms the vocabulary lacks are left out."""
    ids: list[int] = []
    for form in (word, " " + word, word.capitalize(), " " + word.capitalize()):
        try:
            token = word_id(tokenizer, form)
        except AnalysisInputError:
            continue
        text = tokenizer.decode([token]).strip().lower()
        if text and word.lower().startswith(text) and token not in ids:
            ids.append(token)
    return ids


def label_id(tokenizer: Any, word: Word) -> int:
    """:func:`word_id` for ground-truth labels, where a word the vocabulary lacks is no label: -1."""
    try:
        return word_id(tokenizer, word, "label")
    except AnalysisInputError:
        return -1


def label_ids(tokenizer: Any, words: Sequence[Optional[Word]]) -> Int[Tensor, " n"]:
    """Ground-truth labels per position (a word or None each) as ids: :func:`label_id`, -1 for none."""
    return torch.tensor([-1 if w is None else label_id(tokenizer, w) for w in words], dtype=torch.long)


def _label_ids(tokenizer: Any, labels: Any, n: int, row: int) -> Tensor:
    if isinstance(labels, Tensor):
        t = labels[row] if labels.ndim == 2 else labels
        out = t.long().cpu()
        if labels.ndim == 2 and out.shape[0] > n and bool((out[n:] < 0).all()):
            out = out[:n]  # a padded [batch, pos] tensor: this row's end padding
    else:
        out = torch.tensor([-1 if lab is None else word_id(tokenizer, lab, "label") for lab in labels], dtype=torch.long)
    if out.shape != (n,):
        raise AnalysisInputError(f"labels give {tuple(out.shape)} values for row {row}, which has {n} positions")
    return out


def _check_layers(n_layers: int, layers: Optional[Sequence[int]]) -> list[int]:
    chosen = list(range(n_layers + 1)) if layers is None else [int(l) for l in layers]
    bad = [l for l in chosen if not 0 <= l <= n_layers]
    if bad or not chosen:
        raise AnalysisInputError(f"layers {bad or chosen} are out of range; layer indices run 0..{n_layers}")
    return chosen


def _check_k(model: "HookedVLM", k: Any) -> int:
    vocab = int(model.W_U.shape[-1])
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= vocab:
        raise AnalysisInputError(f"k must be an int in 1..{vocab} (the vocabulary size), got {k!r}")
    return k


@dataclass(frozen=True)
class _Row:
    pos: Tensor
    labels: Optional[Tensor]


class LensReduction(Reduction[LensResult]):
    """Per example and layer, the lens's top-k at the chosen positions (the definition in
    :class:`LensResult`), shared by :func:`logit_lens` and :class:`LensStream`.

    Args:
        labels_of: ``labels_of(layout, row, n) -> Int[Tensor, " n"]``, the expected id at each
            of the row's ``n`` chosen positions (-1: none), or None for no labels.
    """

    def __init__(
        self,
        model: "HookedVLM",
        positions: PositionSpec = "image",
        layers: Optional[Sequence[int]] = None,
        k: int = 10,
        word_ids: Optional[Tensor] = None,
        labels_of: Optional[Callable[["TokenLayout", int, int], Tensor]] = None,
    ) -> None:
        self.positions = positions
        self.layers = _check_layers(model.n_layers, layers)
        self.k = _check_k(model, k)
        self.word_ids = word_ids
        self.labels_of = labels_of
        names = resid_hooks(model.n_layers)
        self.names = [names[l] for l in self.layers]
        self._norm, self._unembed = fp32_final_norm(model), fp32_unembed(model)
        self._vocab_size = int(model.W_U.shape[-1])

    def context(self, layout: "TokenLayout", row: int, input_ids: Optional[Tensor]) -> _Row:
        pos = row_positions(layout, self.positions, row)
        check_nonempty(pos, "positions", self.positions, row)
        labels = None if self.labels_of is None else self.labels_of(layout, row, pos.numel())
        return _Row(pos, labels)

    def reduce(self, index: int, resid: Tensor, ctx: _Row) -> tuple[Tensor, ...]:
        # Positions in chunks: a [pos, vocab] float32 distribution of 576 image tokens over a
        # 32,000-word vocabulary is 74 MB, and a stream must not hold that per hook.
        states = resid[ctx.pos.to(resid.device)]
        vocab = int(self._vocab_size)
        step = max(1, LENS_CHUNK_ELEMENTS // vocab)
        pieces = [self._reduce_chunk(states[start : start + step]) for start in range(0, states.shape[0], step)]
        return tuple(torch.cat([p[i] for p in pieces]) for i in range(len(pieces[0])))

    def _reduce_chunk(self, states: Tensor) -> tuple[Tensor, ...]:
        logprobs = torch.log_softmax(self._unembed(self._norm(states)), dim=-1)
        top = logprobs.topk(self.k, dim=-1)
        if self.word_ids is None:
            return top.indices.cpu(), top.values.cpu()
        wlp = logprobs[:, self.word_ids.to(logprobs.device)]  # [pos, word]
        rank = (logprobs.unsqueeze(1) > wlp.unsqueeze(-1)).sum(-1)
        return top.indices.cpu(), top.values.cpu(), wlp.cpu(), rank.cpu()

    def assemble(self, ctx: _Row, pieces: list[tuple[Tensor, ...]]) -> dict[str, Any]:
        ids = torch.stack([p[0] for p in pieces])
        words = self.word_ids is not None
        return {
            "top_ids": ids,
            "top_logprobs": torch.stack([p[1] for p in pieces]),
            "positions": ctx.pos,
            "word_logprobs": torch.stack([p[2] for p in pieces]) if words else None,
            "word_ranks": torch.stack([p[3] for p in pieces]) if words else None,
            "label_ids": ctx.labels,
            "match_rate": None if ctx.labels is None else _match_rate(ids, ctx.labels),
        }

    def result(self, rows: list[dict[str, Any]]) -> LensResult:
        return LensResult(
            top_ids=stack_rows([r["top_ids"] for r in rows]),
            top_logprobs=stack_rows([r["top_logprobs"] for r in rows]),
            positions=stack_rows([r["positions"] for r in rows]),
            layers=torch.tensor(self.layers),
            word_ids=self.word_ids,
            word_logprobs=stack_optional([r["word_logprobs"] for r in rows]),
            word_ranks=stack_optional([r["word_ranks"] for r in rows]),
            label_ids=stack_optional([r["label_ids"] for r in rows]),
            match_rate=stack_optional([r["match_rate"] for r in rows]),
        )


def logit_lens(
    model: "HookedVLM",
    cache: "VLMCache",
    positions: PositionSpec = "image",
    layers: Optional[Sequence[int]] = None,
    k: int = 10,
    words: Optional[Sequence[Word]] = None,
    labels: Any = None,
) -> LensResult:
    """Apply the final norm and the unembedding to the residual stream at every layer.

    See :class:`LensResult` for the definition and the fields.

    Args:
        model: The ``HookedVLM`` the cache came from.
        cache: From ``model.run_with_cache(inputs, names_filter=lens.required_hooks(model))``.
        positions: A segment name (``"image"``: every image token of the row;
            ``"instruction"``, ``"answer"``, ``"last"``, ...), a bool mask or positions.
        layers: Layer indices in ``0..n_layers`` (default: all ``n_layers + 1``).
        k: How many top tokens to keep per layer and position.
        words: Tokens (text or ids) whose log-prob and rank to report everywhere.
        labels: Expected token per analysed position, for ``match_rate``: a list of
            words/ids/None (one per position), an int tensor ``[pos]`` with -1 for
            none, or for a batch a ``[batch, pos]`` tensor or a list of such lists.
    """
    tokenizer = model.tokenizer
    word_ids = None if words is None else torch.tensor([word_id(tokenizer, w) for w in words], dtype=torch.long)
    if word_ids is not None and word_ids.numel() == 0:
        raise AnalysisInputError("words is empty; pass at least one word or leave it None")
    batch_size = cache.layout.batch_size
    if labels is not None and batch_size > 1 and not isinstance(labels, Tensor):
        if len(labels) != batch_size:
            raise AnalysisInputError(f"labels has {len(labels)} rows but the batch has {batch_size}")

    def labels_of(layout: "TokenLayout", row: int, n: int) -> Tensor:
        assert labels is not None  # labels_of is handed on only when labels are given
        row_labels = labels if (isinstance(labels, Tensor) or batch_size == 1) else labels[row]
        return _label_ids(tokenizer, row_labels, n, row)

    reduction = LensReduction(model, positions, layers, k, word_ids, None if labels is None else labels_of)
    check_cached(cache, reduction.names, "logit_lens", "lens")
    return reduction.on_cache(cache)


@typechecked
@dataclass(frozen=True, eq=False, repr=False)
class LensStats(ShortRepr):
    """The logit lens reduced per layer and averaged over examples.

    Per example: ``top1_logprob[l]`` is the mean over the chosen positions of
    ``LensResult.top_logprobs[b, l, :, 0]`` (the lens's confidence), and ``match_rate[l]``
    is ``LensResult.match_rate[b, l]`` (labels in the top-k); both averaged over examples.

    Attributes:
        top1_logprob: ``[layer]``.
        match_rate: ``[layer]``, or None when no labels were given.
        n_examples: How many examples were accumulated.
        k: The top-k the match rate counts.
    """

    top1_logprob: Float[Tensor, " layer"]
    match_rate: Optional[Float[Tensor, " layer"]]
    n_examples: int
    k: int

    def to_frame(self) -> pd.DataFrame:
        """Long format: layer, top1_logprob (and match_rate)."""
        values = {"top1_logprob": self.top1_logprob}
        if self.match_rate is not None:
            values["match_rate"] = self.match_rate
        return long_frame(values, dims=("layer",), batched=False)


class LensStream(Stream[LensResult]):
    """Streaming :func:`logit_lens`: the same per-example values (``last_batch``, a
    ``LensResult``) from hooks, and per-layer confidence and match rate over examples.

    Args:
        model: The ``HookedVLM``.
        positions: Which positions of each row (default every image token).
        k: Top-k for the match rate.
        labels: Optional ``labels(inputs, row) -> Int[Tensor, " pos"]``, the expected token
            id at each chosen position of a row (-1: none; a row with no label has a NaN
            match rate, left out of the mean).
        layers: Layer indices in ``0..n_layers`` (default: all ``n_layers + 1``).
    """

    def __init__(
        self,
        model: "HookedVLM",
        positions: PositionSpec = "image",
        k: int = 10,
        labels: Optional[LabelsFn] = None,
        layers: Optional[Sequence[int]] = None,
    ) -> None:
        self._labels = labels
        self._inputs: Optional["VLMInputs"] = None
        labels_of = None if labels is None else self._labels_of
        super().__init__(model, LensReduction(model, positions, layers, k, None, labels_of))
        self.k = k

    def hooks(self, inputs: "VLMInputs") -> list:
        self._inputs = inputs
        return super().hooks(inputs)

    def _labels_of(self, layout: "TokenLayout", row: int, n: int) -> Tensor:
        # Called from the hooks of a forward: only when labels were given, after hooks(inputs).
        assert self._labels is not None and self._inputs is not None
        lab = torch.as_tensor(self._labels(self._inputs, row)).long().cpu()
        if lab.shape != (n,):
            raise AnalysisInputError(
                f"labels(inputs, {row}) must give one id per chosen position ({n}, -1 for none); "
                f"got shape {tuple(lab.shape)}"
            )
        return lab

    def summarise(self, row: dict[str, Any]) -> dict[str, Optional[Tensor]]:
        match = row["match_rate"]
        if match is not None and bool(match.isnan().all()):
            match = None  # no labelled position in this example
        return {"top1_logprob": row["top_logprobs"][..., 0].mean(-1), "match_rate": match}

    def result(self) -> LensStats:
        top1, _, n = self.mean_std("top1_logprob")
        match = self.mean_std("match_rate")[0] if self.has("match_rate") else None
        return LensStats(top1_logprob=top1, match_rate=match, n_examples=n, k=self.k)
