"""Streaming forms: per-layer curves reduced inside hooks, accumulated over batches.

A data-set sweep cannot cache every layer's activations (LLaVA-1.5-7B: 33 x 600 x 4096
floats per example for the residual stream, 32 x 32 x 600 x 600 for the patterns).
These accumulators attach hooks that reduce each activation to a few numbers per
layer as the forward pass runs, and keep running sums across batches:

    stream = SimilarityStream(model, against="text_states")
    for inputs in batches:
        stream.update(inputs)            # one forward, nothing cached
    curve = stream.result()              # mean over examples, per layer

or, to fold them into a forward pass of one's own, ``with model.hooks(stream.hooks(inputs)):``
followed by ``stream.commit()``. Streams of different workers combine with ``merge``.
Per example, the values equal those of the cache-based analyses
(:func:`~vlens.analysis.modality_similarity` ``.per_layer``,
:func:`~vlens.analysis.attention_to_image` ``.mass`` and ``.received``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from vlens.analysis._common import (
    PositionSpec,
    check_nonempty,
    image_positions,
    long_frame,
    pattern_hooks,
    resid_hooks,
    row_positions,
    typechecked,
)
from vlens.analysis.similarity import Against, check_against, max_cosine_to_vocab, unit, vocab_unit
from vlens.errors import AnalysisInputError


@typechecked
@dataclass(frozen=True, eq=False)
class CurveStats:
    """A per-layer curve averaged over examples.

    Attributes:
        per_layer: Mean over examples of each example's value, ``[layer]``.
        std: Standard deviation over examples (population), ``[layer]``.
        n_examples: How many examples were accumulated.
        name: What the curve measures (``"similarity:text_states"``, ``"attention_mass"``).
    """

    per_layer: Float[Tensor, "layer"]
    std: Float[Tensor, "layer"]
    n_examples: int
    name: str

    def to_frame(self) -> pd.DataFrame:
        """Long format: layer, mean, std; ``curve`` names it."""
        frame = long_frame({"mean": self.per_layer, "std": self.std}, dims=("layer",))
        frame["curve"] = self.name
        frame["n_examples"] = self.n_examples
        return frame


@typechecked
@dataclass(frozen=True, eq=False)
class AttentionStats:
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
    def per_layer(self) -> Float[Tensor, "layer"]:
        """Mass on the image per layer, mean over heads."""
        return self.mass.mean(-1)

    def to_frame(self) -> pd.DataFrame:
        """Long format of ``mass``: layer, head, mass."""
        return long_frame({"mass": self.mass}, dims=("layer", "head"))


class _Stream:
    """Running sums of per-example values, one slot per hook, committed per batch.

    After each commit, ``last_batch`` holds that batch's per-example values
    (``[example, layer]`` for similarity, ``[example, layer, head]`` for attention mass),
    for a caller that records rows per example.
    """

    names: list[str]

    def __init__(self) -> None:
        self.last_batch: Optional[Tensor] = None
        self._sum: Optional[Tensor] = None
        self._sum_sq: Optional[Tensor] = None
        self._n = 0
        self._pending: dict[int, Tensor] = {}

    def _add(self, values: Tensor) -> None:  # values: [examples, layer, ...]
        values = values.double()
        if self._sum is None:
            self._sum, self._sum_sq = values.sum(0), (values**2).sum(0)
        else:
            self._sum += values.sum(0)
            self._sum_sq += (values**2).sum(0)
        self._n += values.shape[0]

    def commit(self) -> None:
        """Fold the values the hooks collected in the last forward pass into the sums."""
        if len(self._pending) != len(self.names):
            fired = len(self._pending)
            self._pending.clear()
            raise AnalysisInputError(
                f"{type(self).__name__}: only {fired} of its {len(self.names)} hooks fired; "
                "run the forward pass inside `with model.hooks(stream.hooks(inputs)):`"
            )
        values = torch.stack([self._pending[i] for i in range(len(self.names))], dim=1)
        self._pending.clear()
        self.last_batch = values
        self._add(values)

    def merge(self, other: "_Stream") -> None:
        """Add another stream's sums (e.g. from another worker) to this one."""
        if type(other) is not type(self) or other.names != self.names:
            raise AnalysisInputError("can only merge streams of the same kind over the same hooks")
        if other._sum is None:
            return
        if self._sum is None:
            self._sum, self._sum_sq = other._sum.clone(), other._sum_sq.clone()
        else:
            self._sum += other._sum
            self._sum_sq += other._sum_sq
        self._n += other._n

    def update(self, inputs: Any) -> None:
        """Run one forward pass of ``inputs`` with the hooks, and accumulate."""
        with torch.no_grad(), self.model.hooks(self.hooks(inputs)):
            self.model.forward(inputs)
        self.commit()

    def hooks(self, inputs: Any) -> list[tuple[str, Callable]]:
        raise NotImplementedError

    def _mean_std(self) -> tuple[Tensor, Tensor]:
        if self._sum is None or self._n == 0:
            raise AnalysisInputError(f"{type(self).__name__} has accumulated no example yet; call update(inputs)")
        mean = self._sum / self._n
        var = (self._sum_sq / self._n - mean**2).clamp_min(0)
        return mean.float(), var.sqrt().float()


class SimilarityStream(_Stream):
    """Streaming :func:`~vlens.analysis.modality_similarity`: the per-layer curve only.

    Each example contributes its ``SimilarityResult.per_layer`` (same definition, same
    float32 arithmetic); :meth:`result` gives the mean and std over examples.
    """

    def __init__(self, model: Any, against: Against = "text_states", text: PositionSpec = "instruction") -> None:
        super().__init__()
        check_against(against)
        self.model = model
        self.against = against
        self.text = text
        self.names = resid_hooks(model.n_layers)
        self._vocab = vocab_unit(model) if against == "vocab" else None

    def hooks(self, inputs: Any) -> list[tuple[str, Callable]]:
        """Hooks for one forward pass of ``inputs`` (then call :meth:`commit`)."""
        layout = inputs.layout
        rows = []
        for row in range(layout.batch_size):
            img = image_positions(layout, row)
            txt = None
            emb = None
            if self.against != "vocab":
                txt = row_positions(layout, self.text, row, what="text")
                check_nonempty(txt, "text", self.text, row)
                if self.against == "text_embeddings":
                    ids = inputs.input_ids[row, txt].to(self.model.W_E.device)
                    emb = unit(self.model.W_E.detach()[ids].float())
            rows.append((img, txt, emb))

        def make(index: int) -> Callable:
            def reduce(tensor: Any, hook: Any) -> None:
                if isinstance(tensor, tuple):
                    tensor = tensor[0]
                per_row = []
                for b, (img, txt, emb) in enumerate(rows):
                    v = unit(tensor[b, img.to(tensor.device)].detach().float())
                    if self.against == "vocab":
                        best, _ = max_cosine_to_vocab(v, self._vocab.to(v.device))
                        per_row.append(best.mean())
                    elif self.against == "text_states":
                        t = unit(tensor[b, txt.to(tensor.device)].detach().float())
                        per_row.append((v @ t.T).mean())
                    else:
                        per_row.append((v @ emb.to(v.device).T).mean())
                self._pending[index] = torch.stack(per_row).cpu()
                return None

            return reduce

        return [(name, make(i)) for i, name in enumerate(self.names)]

    def result(self) -> CurveStats:
        mean, std = self._mean_std()
        return CurveStats(per_layer=mean, std=std, n_examples=self._n, name=f"similarity:{self.against}")


class AttentionStream(_Stream):
    """Streaming :func:`~vlens.analysis.attention_to_image`: mass per layer and head, and
    the attention each image token receives (for examples with as many image tokens as
    the first one, e.g. every LLaVA-1.5 image).
    """

    def __init__(self, model: Any, query: PositionSpec = "instruction") -> None:
        super().__init__()
        self.model = model
        self.query = query
        self.names = pattern_hooks(model.n_layers)
        self._recv_sum: Optional[Tensor] = None
        self._recv_n = 0
        self._recv_pending: dict[int, list[Optional[Tensor]]] = {}

    def hooks(self, inputs: Any) -> list[tuple[str, Callable]]:
        """Hooks for one forward pass of ``inputs`` (then call :meth:`commit`)."""
        layout = inputs.layout
        rows = []
        for row in range(layout.batch_size):
            q = row_positions(layout, self.query, row, what="query")
            check_nonempty(q, "query", self.query, row)
            rows.append((q, image_positions(layout, row)))

        def make(index: int) -> Callable:
            def reduce(pattern: Any, hook: Any) -> None:
                if isinstance(pattern, tuple):
                    pattern = pattern[0]
                masses, received = [], []
                for b, (q, img) in enumerate(rows):
                    a = pattern[b][:, q.to(pattern.device)][:, :, img.to(pattern.device)].detach().float()
                    masses.append(a.sum(-1).mean(-1).cpu())
                    received.append(a.mean((0, 1)).cpu())
                self._pending[index] = torch.stack(masses)
                self._recv_pending[index] = received
                return None

            return reduce

        return [(name, make(i)) for i, name in enumerate(self.names)]

    def commit(self) -> None:
        received = dict(self._recv_pending)
        self._recv_pending.clear()
        super().commit()
        n_rows = len(received[0])
        for b in range(n_rows):
            per_layer = torch.stack([received[i][b] for i in range(len(self.names))]).double()
            if self._recv_sum is None:
                self._recv_sum = per_layer
            elif self._recv_sum.shape == per_layer.shape:
                self._recv_sum += per_layer
            else:
                continue
            self._recv_n += 1

    def merge(self, other: "_Stream") -> None:
        super().merge(other)
        assert isinstance(other, AttentionStream)
        if other._recv_sum is None:
            return
        if self._recv_sum is None:
            self._recv_sum, self._recv_n = other._recv_sum.clone(), other._recv_n
        elif self._recv_sum.shape == other._recv_sum.shape:
            self._recv_sum += other._recv_sum
            self._recv_n += other._recv_n

    def result(self) -> AttentionStats:
        mean, _ = self._mean_std()
        received = None if self._recv_sum is None else (self._recv_sum / self._recv_n).float()
        return AttentionStats(mass=mean, received=received, n_examples=self._n, n_received=self._recv_n)


@typechecked
@dataclass(frozen=True, eq=False)
class LensStats:
    """The logit lens reduced per layer and averaged over examples.

    Per example: ``top1_logprob[l]`` is the mean over the chosen positions of
    ``LensResult.top_logprobs[l, :, 0]`` (the lens's confidence), and ``match_rate[l]``
    is ``LensResult.match_rate[l]`` (labels in the top-k); both averaged over examples.

    Attributes:
        top1_logprob: ``[layer]``.
        match_rate: ``[layer]``, or None when no labels were given.
        n_examples: How many examples were accumulated.
        k: The top-k the match rate counts.
    """

    top1_logprob: Float[Tensor, "layer"]
    match_rate: Optional[Float[Tensor, "layer"]]
    n_examples: int
    k: int

    def to_frame(self) -> pd.DataFrame:
        """Long format: layer, top1_logprob (and match_rate)."""
        values = {"top1_logprob": self.top1_logprob}
        if self.match_rate is not None:
            values["match_rate"] = self.match_rate
        return long_frame(values, dims=("layer",))


class LensStream(_Stream):
    """Streaming :func:`~vlens.analysis.logit_lens`: per-layer confidence and match rate.

    Args:
        model: The ``HookedVLM``.
        positions: Which positions of each row (default every image token).
        k: Top-k for the match rate.
        labels: Optional ``labels(inputs, row) -> Int[Tensor, "pos"]``, the expected token
            id at each chosen position of a row (-1: none; at least one labelled).
    """

    def __init__(
        self,
        model: Any,
        positions: PositionSpec = "image",
        k: int = 10,
        labels: Optional[Callable[[Any, int], Tensor]] = None,
    ) -> None:
        super().__init__()
        from vlens.analysis._common import fp32_final_norm, fp32_unembed

        vocab = int(model.W_U.shape[-1])
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= vocab:
            raise AnalysisInputError(f"k must be an int in 1..{vocab} (the vocabulary size), got {k!r}")
        self.model = model
        self.positions = positions
        self.k = k
        self.labels = labels
        self.names = resid_hooks(model.n_layers)
        self._norm, self._unembed = fp32_final_norm(model), fp32_unembed(model)

    def hooks(self, inputs: Any) -> list[tuple[str, Callable]]:
        """Hooks for one forward pass of ``inputs`` (then call :meth:`commit`)."""
        layout = inputs.layout
        rows = []
        for row in range(layout.batch_size):
            pos = row_positions(layout, self.positions, row)
            check_nonempty(pos, "positions", self.positions, row)
            lab = None
            if self.labels is not None:
                lab = torch.as_tensor(self.labels(inputs, row)).long().cpu()
                if lab.shape != pos.shape or not bool((lab >= 0).any()):
                    raise AnalysisInputError(
                        f"labels(inputs, {row}) must give one id per chosen position ({pos.numel()}), "
                        f"at least one >= 0; got shape {tuple(lab.shape)}"
                    )
            rows.append((pos, lab))

        def make(index: int) -> Callable:
            def reduce(tensor: Any, hook: Any) -> None:
                if isinstance(tensor, tuple):
                    tensor = tensor[0]
                per_row = []
                for b, (pos, lab) in enumerate(rows):
                    resid = tensor[b, pos.to(tensor.device)].detach().float()
                    logprobs = torch.log_softmax(self._unembed(self._norm(resid)), dim=-1)
                    top = logprobs.topk(self.k, dim=-1)
                    match = torch.tensor(float("nan"))
                    if lab is not None:
                        labelled = lab >= 0
                        hit = (top.indices.cpu() == lab[:, None]).any(-1) & labelled
                        match = hit.sum().float() / labelled.sum()
                    per_row.append(torch.stack([top.values[:, 0].mean().cpu(), match]))
                self._pending[index] = torch.stack(per_row)
                return None

            return reduce

        return [(name, make(i)) for i, name in enumerate(self.names)]

    def result(self) -> LensStats:
        mean, _ = self._mean_std()  # [layer, 2]
        return LensStats(
            top1_logprob=mean[:, 0],
            match_rate=None if self.labels is None else mean[:, 1],
            n_examples=self._n,
            k=self.k,
        )
