"""The logit lens: what the language model would predict from each layer's residual stream."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from vlens.analysis._common import (
    PositionSpec,
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
from vlens.errors import AnalysisInputError

Word = Union[str, int]


def required_hooks(model: Any) -> list[str]:
    """Hooks :func:`logit_lens` reads: the residual stream at every layer boundary."""
    return resid_hooks(model.n_layers)


@typechecked
@dataclass(frozen=True, eq=False)
class LensResult:
    """The logit lens at chosen layers and positions.

    Definition: for layer index l (0 = ``blocks.0.hook_resid_pre``, the input
    embeddings; l >= 1 = ``blocks.{l-1}.hook_resid_post``) and position p, the
    distribution ``log_softmax(unembed(final_norm(resid[l, p])))`` in float32, the
    language model's own final norm and unembedding applied to the raw residual stream.
    Only the top-k of each distribution is kept, never the full vocabulary.

    Batched inputs (B > 1 rows) add a leading ``batch`` axis to every field but
    ``layers`` and ``word_ids``; rows with fewer positions are padded with -1 / NaN.

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

    top_ids: Int[Tensor, "*batch layer pos k"]
    top_logprobs: Float[Tensor, "*batch layer pos k"]
    positions: Int[Tensor, "*batch pos"]
    layers: Int[Tensor, "layer"]
    word_ids: Optional[Int[Tensor, "word"]] = None
    word_logprobs: Optional[Float[Tensor, "*batch layer pos word"]] = None
    word_ranks: Optional[Int[Tensor, "*batch layer pos word"]] = None
    label_ids: Optional[Int[Tensor, "*batch pos"]] = None
    match_rate: Optional[Float[Tensor, "*batch layer"]] = None

    @property
    def batched(self) -> bool:
        return self.top_ids.ndim == 4

    @property
    def k(self) -> int:
        return int(self.top_ids.shape[-1])

    def match(self, label_ids: Int[Tensor, "*batch pos"]) -> Float[Tensor, "*batch layer"]:
        """Per layer, the fraction of positions whose label (-1: none) is in the top-k."""
        return _match_rate(self.top_ids, torch.as_tensor(label_ids))

    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per (batch,) layer, position, rank with ``token_id`` and
        ``logprob``; ``layer`` holds the layer index and ``pos`` the sequence position."""
        layer_ax = self.layers
        return long_frame(
            {"token_id": self.top_ids, "logprob": self.top_logprobs},
            dims=("layer", "pos", "rank"),
            coords={"layer": layer_ax, "pos": self.positions},
            batched=self.batched,
        )

    def words_frame(self) -> pd.DataFrame:
        """Long format of the asked words: layer, pos, word (its token id), logprob, rank."""
        if self.word_ids is None:
            raise AnalysisInputError("this LensResult was computed without words=; pass words to logit_lens")
        frame = long_frame(
            {"logprob": self.word_logprobs, "rank": self.word_ranks.float()},
            dims=("layer", "pos", "word"),
            coords={"layer": self.layers, "pos": self.positions, "word": self.word_ids},
            batched=self.batched,
        )
        frame["rank"] = frame["rank"].astype("int64")
        return frame


def _match_rate(top_ids: Tensor, label_ids: Tensor) -> Tensor:
    hit = (top_ids == label_ids.unsqueeze(-2).unsqueeze(-1)).any(-1)  # [*b, layer, pos]
    labelled = (label_ids >= 0).unsqueeze(-2)
    n = labelled.sum(-1).float()
    return torch.where(n > 0, (hit & labelled).sum(-1).float() / n.clamp_min(1), torch.full_like(n, float("nan")))


def _word_id(tokenizer: Any, word: Word, what: str) -> int:
    if isinstance(word, int):
        if not 0 <= word < len(tokenizer):
            raise AnalysisInputError(f"{what} id {word} is outside the vocabulary (0..{len(tokenizer) - 1})")
        return word
    if isinstance(word, str):
        ids = tokenizer.encode(word, add_special_tokens=False)
        if not ids:
            raise AnalysisInputError(f"{what} {word!r} tokenizes to nothing")
        return int(ids[0])
    raise AnalysisInputError(f"{what} must be a string or a token id, got {type(word).__name__}: {word!r}")


def _label_ids(tokenizer: Any, labels: Any, n: int, row: int) -> Tensor:
    if isinstance(labels, Tensor):
        t = labels[row] if labels.ndim == 2 else labels
        out = t.long().cpu()
        if labels.ndim == 2 and out.shape[0] > n and bool((out[n:] < 0).all()):
            out = out[:n]  # a padded [batch, pos] tensor: this row's end padding
    else:
        out = torch.tensor([-1 if lab is None else _word_id(tokenizer, lab, "label") for lab in labels])
    if out.shape != (n,):
        raise AnalysisInputError(f"labels give {tuple(out.shape)} values for row {row}, which has {n} positions")
    return out


def logit_lens(
    model: Any,
    cache: Any,
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
    n_layers = model.n_layers
    if layers is None:
        layers = list(range(n_layers + 1))
    layers = [int(l) for l in layers]
    bad = [l for l in layers if not 0 <= l <= n_layers]
    if bad or not layers:
        raise AnalysisInputError(f"layers {bad or layers} are out of range; layer indices run 0..{n_layers}")
    vocab = int(model.W_U.shape[-1])
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= vocab:
        raise AnalysisInputError(f"k must be an int in 1..{vocab} (the vocabulary size), got {k!r}")
    names = resid_hooks(n_layers)
    check_cached(cache, [names[l] for l in layers], "logit_lens", "lens")
    tokenizer = model.tokenizer
    word_ids = None if words is None else torch.tensor([_word_id(tokenizer, w, "word") for w in words])
    if word_ids is not None and word_ids.numel() == 0:
        raise AnalysisInputError("words is empty; pass at least one word or leave it None")
    norm, unembed = fp32_final_norm(model), fp32_unembed(model)
    layout = cache.layout
    rows = range(layout.batch_size)
    if labels is not None and layout.batch_size > 1 and not isinstance(labels, Tensor):
        if len(labels) != layout.batch_size:
            raise AnalysisInputError(f"labels has {len(labels)} rows but the batch has {layout.batch_size}")
    out: dict[str, list] = {key: [] for key in ("ids", "lps", "pos", "wlp", "wrank", "lab", "match")}
    for row in rows:
        pos = row_positions(layout, positions, row)
        check_nonempty(pos, "positions", positions, row)
        ids_l, lps_l, wlp_l, wrank_l = [], [], [], []
        with torch.no_grad():
            for l in layers:
                resid = cache[names[l]][row, pos.to(cache[names[l]].device)].float()
                logprobs = torch.log_softmax(unembed(norm(resid)), dim=-1)  # [pos, vocab]
                top = logprobs.topk(k, dim=-1)
                ids_l.append(top.indices.cpu())
                lps_l.append(top.values.cpu())
                if word_ids is not None:
                    wlp = logprobs[:, word_ids.to(logprobs.device)]  # [pos, word]
                    rank = (logprobs.unsqueeze(1) > wlp.unsqueeze(-1)).sum(-1)
                    wlp_l.append(wlp.cpu())
                    wrank_l.append(rank.cpu())
        ids, lps = torch.stack(ids_l), torch.stack(lps_l)
        out["ids"].append(ids)
        out["lps"].append(lps)
        out["pos"].append(pos)
        out["wlp"].append(torch.stack(wlp_l) if wlp_l else None)
        out["wrank"].append(torch.stack(wrank_l) if wrank_l else None)
        if labels is not None:
            row_labels = labels if (isinstance(labels, Tensor) or layout.batch_size == 1) else labels[row]
            lab = _label_ids(tokenizer, row_labels, pos.numel(), row)
            out["lab"].append(lab)
            out["match"].append(_match_rate(ids, lab))
        else:
            out["lab"].append(None)
            out["match"].append(None)
    return LensResult(
        top_ids=stack_rows(out["ids"]),
        top_logprobs=stack_rows(out["lps"]),
        positions=stack_rows(out["pos"]),
        layers=torch.tensor(layers),
        word_ids=word_ids,
        word_logprobs=stack_optional(out["wlp"]),
        word_ranks=stack_optional(out["wrank"]),
        label_ids=stack_optional(out["lab"]),
        match_rate=stack_optional(out["match"]),
    )
