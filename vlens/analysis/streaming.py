"""The one streaming protocol: reductions shared by the cache form and the streaming form.

Every activation analysis is written once, as a :class:`Reduction`: per example, the
positions it reads (``context``), a reduction of one layer's activation of that example to
a few numbers (``reduce``), and the example's values from those pieces (``assemble``). The
cache form (``va.modality_similarity(model, cache)``) runs it over cached tensors; the
streaming form runs the same ``reduce`` inside the hooks of a forward pass, so no layer's
full activations outlive its hook:

    stream = va.SimilarityStream(model, against="text_states")
    for inputs in batches:
        stream.update(inputs)            # one forward, nothing cached
        stream.last_batch                # that batch's per-example values (a SimilarityResult)
    curve = stream.result()              # mean and std over examples, per layer

or, inside a forward pass of one's own, ``with model.hooks(stream.hooks(inputs)):`` followed by
``stream.commit()``; a cache already at hand goes through ``stream.reduce_cache(cache)`` and
``stream.commit()``. Streams of different workers combine with ``merge``. The sweep, the CLI
and the report call these; none has its own copy of a reduction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Generic, Optional, Sequence, TypeVar

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from vlens.analysis._common import ShortRepr, long_frame, typechecked
from vlens.errors import AnalysisInputError
from vlens.hooks import hooked_tensor

if TYPE_CHECKING:
    from vlens.cache import VLMCache
    from vlens.inputs import VLMInputs
    from vlens.layout import TokenLayout
    from vlens.model import HookedVLM

ResultT = TypeVar("ResultT")
HookFn = Callable[[Any, Any], None]


class Reduction(ABC, Generic[ResultT]):
    """One analysis's per-example reduction of activations.

    Attributes:
        names: The hooks read, in the order of ``reduce``'s ``index``.
        needs_ids: Whether ``context`` needs the batch's token ids.
    """

    names: list[str]
    needs_ids: bool = False

    @abstractmethod
    def context(self, layout: "TokenLayout", row: int, input_ids: Optional[Tensor]) -> Any:
        """What ``reduce`` needs of one row (positions, labels, ...); raises on a bad row."""

    @abstractmethod
    def reduce(self, index: int, activation: Tensor, ctx: Any) -> Any:
        """One example's activation at hook ``names[index]`` (batch axis removed) to its piece."""

    @abstractmethod
    def assemble(self, ctx: Any, pieces: list[Any]) -> dict[str, Any]:
        """One example's result fields (no batch axis) from its pieces, one per hook."""

    @abstractmethod
    def result(self, rows: list[dict[str, Any]]) -> ResultT:
        """The batched result of per-example fields (rows stacked on the batch axis)."""

    def contexts(self, layout: "TokenLayout", input_ids: Optional[Tensor]) -> list[Any]:
        if self.needs_ids and input_ids is None:
            raise AnalysisInputError(f"{type(self).__name__} needs the token ids (cache embed.hook_in)")
        return [self.context(layout, row, input_ids) for row in range(layout.batch_size)]

    def on_cache(self, cache: "VLMCache") -> ResultT:
        """The cache form: ``reduce`` over every row and hook of a cache."""
        ids = cache["embed.hook_in"] if self.needs_ids else None
        ctxs = self.contexts(cache.layout, ids)
        rows = []
        with torch.no_grad():
            for row, ctx in enumerate(ctxs):
                pieces = [self.reduce(i, cache[name][row], ctx) for i, name in enumerate(self.names)]
                rows.append(self.assemble(ctx, pieces))
        return self.result(rows)


class _Sums:
    """Running sum and sum of squares over examples of fixed-shape per-example values."""

    def __init__(self) -> None:
        self.sum: Optional[Tensor] = None
        self.sum_sq: Optional[Tensor] = None
        self.n = 0

    def add(self, value: Tensor) -> bool:
        """Add one example's value; False (and nothing added) when its shape differs from the first's."""
        value = value.double()
        if self.sum is None:
            self.sum, self.sum_sq = value.clone(), value**2
        elif self.sum.shape != value.shape:
            return False
        else:
            assert self.sum_sq is not None  # set together with sum
            self.sum += value
            self.sum_sq += value**2
        self.n += 1
        return True

    def merge(self, other: "_Sums") -> None:
        if other.sum is None:
            return
        assert other.sum_sq is not None  # set together with sum
        if self.sum is None:
            self.sum, self.sum_sq, self.n = other.sum.clone(), other.sum_sq.clone(), other.n
        elif self.sum.shape == other.sum.shape:
            assert self.sum_sq is not None  # set together with sum
            self.sum += other.sum
            self.sum_sq += other.sum_sq
            self.n += other.n

    def mean_std(self) -> tuple[Tensor, Tensor]:
        # Stream.mean_std asks only sums that hold an example (n > 0).
        assert self.sum is not None and self.sum_sq is not None
        mean = self.sum / self.n
        var = (self.sum_sq / self.n - mean**2).clamp_min(0)
        return mean.float(), var.sqrt().float()


class Stream(ABC, Generic[ResultT]):
    """Accumulates a :class:`Reduction` over batches: hooks to attach, the per-example values
    of the last batch (``last_batch``), a merge, a result.

    Subclasses say which per-example values are averaged (``summarise``) and build the
    aggregate (``result``).
    """

    def __init__(self, model: "HookedVLM", reduction: Reduction[ResultT]) -> None:
        self.model = model
        self.reduction = reduction
        self.names = reduction.names
        self.last_batch: Optional[ResultT] = None
        self._sums: dict[str, _Sums] = {}
        self._n = 0
        self._ctxs: list[Any] = []
        self._pending: dict[int, list[Any]] = {}

    def required_hooks(self) -> list[str]:
        return list(self.names)

    # ---- one batch ---------------------------------------------------------------------

    def hooks(self, inputs: "VLMInputs") -> list[tuple[str, HookFn]]:
        """Hooks for one forward pass of ``inputs`` (then call :meth:`commit`)."""
        self._begin(inputs.layout, inputs.input_ids)

        def make(index: int) -> HookFn:
            def reduce(activation: Any, hook: Any) -> None:
                tensor = hooked_tensor(activation)
                if tensor is None:
                    return None
                with torch.no_grad():
                    tensor = tensor.detach()
                    self._pending[index] = [self.reduction.reduce(index, tensor[b], c) for b, c in enumerate(self._ctxs)]
                return None

            return reduce

        return [(name, make(i)) for i, name in enumerate(self.names)]

    def reduce_cache(self, cache: "VLMCache") -> None:
        """The same reductions over a cache that holds these hooks (then call :meth:`commit`)."""
        ids = cache["embed.hook_in"] if self.reduction.needs_ids else None
        self._begin(cache.layout, ids)
        with torch.no_grad():
            for index, name in enumerate(self.names):
                tensor = cache[name]
                self._pending[index] = [self.reduction.reduce(index, tensor[b], c) for b, c in enumerate(self._ctxs)]

    def _begin(self, layout: "TokenLayout", input_ids: Optional[Tensor]) -> None:
        self._pending = {}
        self._ctxs = self.reduction.contexts(layout, input_ids)

    def commit(self) -> None:
        """Fold the values the hooks collected in the last forward pass into the sums."""
        if len(self._pending) != len(self.names):
            fired = len(self._pending)
            self._pending = {}
            raise AnalysisInputError(
                f"{type(self).__name__}: only {fired} of its {len(self.names)} hooks fired; "
                "run the forward pass inside `with model.hooks(stream.hooks(inputs)):`"
            )
        rows = [
            self.reduction.assemble(ctx, [self._pending[i][b] for i in range(len(self.names))])
            for b, ctx in enumerate(self._ctxs)
        ]
        self._pending = {}
        self.last_batch = self.reduction.result(rows)
        for row in rows:
            for key, value in self.summarise(row).items():
                if value is not None:
                    self._sums.setdefault(key, _Sums()).add(value)
            self._n += 1

    def update(self, inputs: "VLMInputs") -> None:
        """Run one forward pass of ``inputs`` with the hooks, and accumulate."""
        with torch.no_grad(), self.model.hooks(self.hooks(inputs)):
            self.model.forward(inputs)
        self.commit()

    # ---- across batches ----------------------------------------------------------------

    def merge(self, other: "Stream") -> None:
        """Add another stream's sums (e.g. from another worker) to this one."""
        if type(other) is not type(self) or other.names != self.names:
            raise AnalysisInputError("can only merge streams of the same kind over the same hooks")
        for key, sums in other._sums.items():
            self._sums.setdefault(key, _Sums()).merge(sums)
        self._n += other._n

    @property
    def n_examples(self) -> int:
        return self._n

    def mean_std(self, key: str) -> tuple[Tensor, Tensor, int]:
        """Mean, std (population) and count over examples of one summarised value."""
        if self._n == 0:
            raise AnalysisInputError(f"{type(self).__name__} has accumulated no example yet; call update(inputs)")
        sums = self._sums.get(key)
        if sums is None or sums.n == 0:
            raise AnalysisInputError(f"{type(self).__name__} accumulated no {key!r}")
        mean, std = sums.mean_std()
        return mean, std, sums.n

    def has(self, key: str) -> bool:
        return key in self._sums and self._sums[key].n > 0

    @abstractmethod
    def summarise(self, row: dict[str, Any]) -> dict[str, Optional[Tensor]]:
        """The per-example values averaged over examples (fixed shape; None: not for this row)."""

    @abstractmethod
    def result(self) -> Any:
        """The aggregate over every example accumulated."""


def run_streams(model: "HookedVLM", inputs: "VLMInputs", streams: Sequence[Stream], cache_names: Sequence[str] = ()) -> Any:
    """One forward pass of ``inputs`` feeding every stream, each committed after it.

    Returns a CPU cache of ``cache_names`` only (None when none is asked for), e.g. the few
    attention patterns a view draws, so nothing else outlives its hook.
    """
    hooks = [h for stream in streams for h in stream.hooks(inputs)]
    cache = None
    with torch.no_grad(), model.hooks(hooks):
        if cache_names:
            _, cache = model.run_with_cache(inputs, names_filter=list(cache_names), device="cpu")
        else:
            model(inputs)
    for stream in streams:
        stream.commit()
    return cache


@typechecked
@dataclass(frozen=True, eq=False, repr=False)
class CurveStats(ShortRepr):
    """A per-layer curve averaged over examples.

    Attributes:
        per_layer: Mean over examples of each example's value, ``[layer]``.
        std: Standard deviation over examples (population), ``[layer]``.
        n_examples: How many examples were accumulated.
        name: What the curve measures (``"similarity:text_states"``, ``"attention_mass"``).
    """

    per_layer: Float[Tensor, " layer"]
    std: Float[Tensor, " layer"]
    n_examples: int
    name: str

    def to_frame(self) -> pd.DataFrame:
        """Long format: layer, mean, std; ``curve`` names it."""
        frame = long_frame({"mean": self.per_layer, "std": self.std}, dims=("layer",), batched=False)
        frame["curve"] = self.name
        frame["n_examples"] = self.n_examples
        return frame
