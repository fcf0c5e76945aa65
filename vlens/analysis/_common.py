"""What every analysis shares: result-class helpers, hook checks, position parsing.

Batched results: every result keeps a leading ``batch`` axis, whatever the batch size
(one example gives a batch of one), so no caller branches on it; ``result.row(b)`` gives
one example's values with that axis removed and the end padding trimmed. Rows may differ
in how many positions (or image tokens) they have; the shorter rows are padded at the end
of that axis with NaN (floats), -1 (integer ids and positions) or False (booleans).
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping, Optional, Sequence, Union, cast

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from vlens._modules import output_embeddings, tensor
from vlens.errors import AnalysisInputError
from vlens.layout import TokenLayout

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    from vlens.cache import VLMCache
    from vlens.model import HookedVLM

SEGMENTS = ("image", "text", "prefix", "instruction", "answer", "marker", "real", "last")
PositionSpec = Union[str, Tensor, Sequence[int]]


def typechecked(cls: type) -> type:
    """Check a result dataclass's jaxtyped fields (shapes and dtypes) when it is built."""
    from jaxtyping import jaxtyped

    try:
        from beartype import beartype
    except ImportError:  # beartype is a test extra; without it shapes are not checked at runtime
        return cls
    return jaxtyped(typechecker=beartype)(cls)


# ---- hooks ------------------------------------------------------------------------------


def resid_hooks(n_layers: int) -> list[str]:
    """The residual-stream hook of every layer boundary, in the layer-axis order."""
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.hook_resid_post" for l in range(n_layers)]


def pattern_hooks(n_layers: int) -> list[str]:
    return [f"blocks.{l}.attn.hook_pattern" for l in range(n_layers)]


def check_cached(cache: "VLMCache", names: Iterable[str], analysis: str, module: str, hint: str = "required_hooks(model)") -> None:
    """Raise ``AnalysisInputError`` naming the hooks a cache lacks."""
    missing = [n for n in names if n not in cache]
    if missing:
        shown = missing if len(missing) <= 4 else [*missing[:4], f"... ({len(missing)} in all)"]
        raise AnalysisInputError(
            f"{analysis} needs hooks this cache does not hold: {shown}. Cache them with "
            f"model.run_with_cache(inputs, names_filter=vlens.analysis.{module}.{hint})"
        )


def n_layers_of(model_or_cache: Union["HookedVLM", "VLMCache"]) -> int:
    cfg = getattr(model_or_cache, "cfg", None) or getattr(getattr(model_or_cache, "model", None), "cfg", None)
    assert cfg is not None  # a HookedVLM has .cfg; a VLMCache's .model (the bridge) has
    return int(cfg.n_layers)


# ---- positions ----------------------------------------------------------------------


def row_positions(layout: TokenLayout, spec: PositionSpec, row: int, what: str = "positions") -> Int[Tensor, " n"]:
    """Sequence positions of one row chosen by a segment name, a mask or explicit indices.

    Args:
        layout: The batch's layout.
        spec: A segment name (one of ``SEGMENTS``), a boolean mask (``[batch, pos]`` or
            ``[pos]``), or sequence positions (a list of ints or an int tensor, shared by
            every row, or ``[batch, n]``).
        row: Batch row.
        what: The argument's name, for error messages.
    """
    length = int(layout.lengths[row])
    if isinstance(spec, str):
        if spec not in SEGMENTS:
            raise AnalysisInputError(f"unknown {what} {spec!r}; choose a segment in {list(SEGMENTS)}, a mask or indices")
        return layout.mask(spec)[row].nonzero().flatten()
    t = torch.as_tensor(spec)
    if t.dtype == torch.bool:
        if t.ndim == 2:
            t = t[row]
        if t.shape[0] != layout.seq_len:
            raise AnalysisInputError(
                f"{what} mask has {t.shape[0]} positions but the batch has {layout.seq_len}"
            )
        return (t.cpu() & layout.attention_mask[row]).nonzero().flatten()
    if t.dtype.is_floating_point or t.is_complex():
        raise AnalysisInputError(f"{what} must be a segment name, a bool mask or int indices, got {t.dtype}")
    if t.ndim == 2:
        t = t[row]
    t = t.flatten().long().cpu()
    bad = t[(t < 0) | (t >= length)]
    if bad.numel():
        raise AnalysisInputError(f"{what} {bad.tolist()} are out of range for row {row} (0..{length - 1})")
    return t


def check_nonempty(positions: Tensor, what: str, spec: Any, row: int) -> None:
    if positions.numel() == 0:
        raise AnalysisInputError(f"{what}={spec!r} selects no position in row {row}")


def image_positions(layout: TokenLayout, row: int) -> Int[Tensor, " n"]:
    """Every image-token position of a row (all images, in sequence order)."""
    positions = layout.image_positions(row)
    if positions.numel() == 0:
        raise AnalysisInputError(f"row {row} has no image tokens; these analyses need at least one image")
    return positions


# ---- batching results ---------------------------------------------------------------


def pad_value(t: Tensor) -> Any:
    if t.dtype == torch.bool:
        return False
    if t.dtype.is_floating_point:
        return float("nan")
    return -1


def stack_rows(rows: Sequence[Tensor]) -> Tensor:
    """The rows stacked on a new axis 0 (the batch axis, kept for one row too), with end padding."""
    shape = [max(r.shape[d] for r in rows) for d in range(rows[0].ndim)]
    out = torch.full((len(rows), *shape), pad_value(rows[0]), dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[(i, *[slice(0, s) for s in r.shape])] = r
    return out


def stack_optional(rows: Sequence[Optional[Tensor]]) -> Optional[Tensor]:
    # A field is None in every row or a tensor in every row.
    return None if rows[0] is None else stack_rows(cast(Sequence[Tensor], rows))


class ResultRow(Mapping):
    """One example's values of a batched result: each batched field indexed at the row, end
    padding trimmed; other fields as they are. Read fields as attributes or by name."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(f"this result has no field {name!r}; it has {sorted(self._values)}") from None

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return "ResultRow(" + ", ".join(_short(k, v) for k, v in self._values.items()) + ")"


def _short(name: str, value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{name}={tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    return f"{name}={value!r}"


class ShortRepr:
    """A repr that shows each tensor field's shape and dtype, not its values."""

    def __repr__(self) -> str:
        # Mixed into dataclasses only.
        parts = [_short(f.name, getattr(self, f.name)) for f in dataclasses.fields(cast("DataclassInstance", self))]
        return f"{type(self).__name__}(" + ", ".join(parts) + ")"

    def _repr_html_(self) -> str:
        """A notebook's view: one table row per field, tensors by shape and dtype."""
        import html

        rows = []
        for f in dataclasses.fields(cast("DataclassInstance", self)):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                shown = f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
            else:
                shown = repr(value)
                shown = shown if len(shown) <= 80 else shown[:77] + "..."
            rows.append(f"<tr><td><code>{html.escape(f.name)}</code></td><td>{html.escape(shown)}</td></tr>")
        return f"<table><caption>{html.escape(type(self).__name__)}</caption>{''.join(rows)}</table>"


class BatchedResult(ShortRepr):
    """Mixin of the result dataclasses: the batch size, one row's values, a short repr.

    A field is batched when its jaxtyping annotation starts with the ``batch`` axis. A
    subclass names, in ``ragged``, the axes whose length varies between rows and the field
    that holds that axis's positions (-1 where a row is padded), e.g. ``{"img": "image_positions"}``.
    """

    ragged: ClassVar[dict[str, str]] = {}

    @property
    def batch_size(self) -> int:
        for name, dims in _field_dims(type(self)).items():
            value = getattr(self, name)
            if dims and dims[0] == "batch" and isinstance(value, Tensor):
                return int(value.shape[0])
        raise AnalysisInputError(f"{type(self).__name__} has no batched field")

    def row(self, b: int) -> ResultRow:
        """Example ``b``'s values: the batch axis removed, each ragged axis cut to the row's length."""
        if not isinstance(b, int) or not 0 <= b < self.batch_size:
            raise AnalysisInputError(f"row {b!r} is out of range for a batch of {self.batch_size} (0..{self.batch_size - 1})")
        dims_of = _field_dims(type(self))
        lengths = {}
        for axis, index_field in self.ragged.items():
            index = getattr(self, index_field)
            if isinstance(index, Tensor):
                lengths[axis] = int((index[b] >= 0).sum())
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cast("DataclassInstance", self)):  # a dataclass, as ShortRepr
            value = getattr(self, field.name)
            dims = dims_of.get(field.name, ())
            if isinstance(value, Tensor) and dims and dims[0] == "batch":
                value = value[b]
                for axis, dim in enumerate(dims[1:]):
                    if dim in lengths:
                        value = value.narrow(axis, 0, lengths[dim])
            values[field.name] = value
        return ResultRow(values)


_DIMS_CACHE: dict[type, dict[str, tuple[str, ...]]] = {}


def _field_dims(cls: type) -> dict[str, tuple[str, ...]]:
    """Each field's jaxtyping axis names, read from the class annotations."""
    if cls not in _DIMS_CACHE:
        hints = typing.get_type_hints(cls)
        found: dict[str, tuple[str, ...]] = {}
        for name, hint in hints.items():
            candidates = typing.get_args(hint) or (hint,)
            for c in candidates:
                dim_str = getattr(c, "dim_str", None)
                if isinstance(dim_str, str):
                    found[name] = tuple(d.lstrip("*") for d in dim_str.split())
                    break
        _DIMS_CACHE[cls] = found
    return _DIMS_CACHE[cls]


# ---- frames -------------------------------------------------------------------------


def long_frame(
    values: dict[str, Tensor],
    dims: Sequence[str],
    coords: Optional[dict[str, Tensor]] = None,
    batched: bool = True,
) -> pd.DataFrame:
    """A long-format DataFrame from tensors sharing the axes ``dims``.

    Args:
        values: Column name -> tensor of shape ``dims`` (with a leading batch axis when
            ``batched``).
        dims: Axis names; each becomes an integer index column.
        coords: Optional axis name -> labels along that axis (e.g. the sequence
            position of each ``pos`` index), added as columns named after the axis,
            replacing the bare index; with ``batched`` a coordinate may be per row.
        batched: Whether the tensors carry a leading batch axis (becomes ``batch``).
    """
    dims = (["batch"] if batched else []) + list(dims)
    first = next(iter(values.values()))
    shape = tuple(first.shape)
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    data: dict[str, Any] = {d: g.ravel() for d, g in zip(dims, grids)}
    for d, labels in (coords or {}).items():
        lab = labels.detach().cpu().numpy()
        axis = dims.index(d)
        if lab.ndim == 2:  # per-row labels: [batch, axis]
            data[d] = lab[grids[0].ravel(), grids[axis].ravel()]
        else:
            data[d] = lab[grids[axis].ravel()]
    for name, t in values.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"column {name!r} has shape {tuple(t.shape)}, expected {shape}")
        data[name] = t.detach().cpu().numpy().ravel()
    frame = pd.DataFrame(data)
    float_cols = [c for c, t in values.items() if t.dtype.is_floating_point]
    if batched and float_cols:  # drop the padding rows of ragged batches
        frame = frame.dropna(subset=float_cols, how="all")
    return frame.reset_index(drop=True)


# ---- float32 read-out ---------------------------------------------------------------


def fp32_final_norm(model: "HookedVLM") -> Callable[[Tensor], Tensor]:
    """The language model's final norm computing in float32 (a float32 copy if needed), on
    the norm's own device (under a ``device_map`` the layers live on several devices)."""
    module = model.bridge.ln_final.original_component
    params = list(module.parameters())
    if params and params[0].dtype != torch.float32:
        module = copy.deepcopy(module).float()
    device = params[0].device if params else None
    return lambda x: module(x.float().to(device)).float()


def fp32_unembed(model: "HookedVLM") -> Callable[[Tensor], Tensor]:
    """The unembedding (``lm_head``) computing in float32, followed by the transform the
    model applies to its logits after it (a final soft cap ``cap * tanh(x / cap)`` where the
    language model has one, as TransformerLens's adapter declares it; identity elsewhere), so
    the last layer's read-out is the model's own output distribution."""
    head = output_embeddings(model.hf_model)
    assert head is not None  # every family's language model has an lm_head (the bridge unembeds with it)
    weight = tensor(head, "weight").detach().float()
    bias = None if getattr(head, "bias", None) is None else tensor(head, "bias").detach().float()
    transform = model.bridge.adapter.apply_output_logits_transform
    return lambda x: transform(torch.nn.functional.linear(x.float().to(weight.device), weight, bias))


