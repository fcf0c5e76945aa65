"""What every analysis shares: result-class helpers, hook checks, position parsing.

Batched results: an analysis given a batch of B > 1 rows returns fields with a leading
``batch`` axis. Rows may differ in how many positions (or image tokens) they have; the
shorter rows are padded at the end of that axis with NaN (floats), -1 (integer ids and
positions) or False (booleans). A single-example batch gives fields without that axis.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from vlens.errors import AnalysisInputError
from vlens.layout import TokenLayout

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


def check_cached(cache: Any, names: Iterable[str], analysis: str, module: str) -> None:
    """Raise ``AnalysisInputError`` naming the hooks a cache lacks."""
    missing = [n for n in names if n not in cache]
    if missing:
        shown = missing if len(missing) <= 4 else [*missing[:4], f"... ({len(missing)} in all)"]
        raise AnalysisInputError(
            f"{analysis} needs hooks this cache does not hold: {shown}. Cache them with "
            f"model.run_with_cache(inputs, names_filter=vlens.analysis.{module}.required_hooks(model))"
        )


def n_layers_of(model_or_cache: Any) -> int:
    cfg = getattr(model_or_cache, "cfg", None) or getattr(getattr(model_or_cache, "model", None), "cfg", None)
    return int(cfg.n_layers)


# ---- positions ----------------------------------------------------------------------


def row_positions(layout: TokenLayout, spec: PositionSpec, row: int, what: str = "positions") -> Int[Tensor, "n"]:
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


def image_positions(layout: TokenLayout, row: int) -> Int[Tensor, "n"]:
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
    """One row's tensor unchanged, or the rows stacked on a new axis 0 with end padding."""
    if len(rows) == 1:
        return rows[0]
    shape = [max(r.shape[d] for r in rows) for d in range(rows[0].ndim)]
    out = torch.full((len(rows), *shape), pad_value(rows[0]), dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[(i, *[slice(0, s) for s in r.shape])] = r
    return out


def stack_optional(rows: Sequence[Optional[Tensor]]) -> Optional[Tensor]:
    return None if rows[0] is None else stack_rows(rows)  # type: ignore[arg-type]


# ---- frames -------------------------------------------------------------------------


def long_frame(
    values: dict[str, Tensor],
    dims: Sequence[str],
    coords: Optional[dict[str, Tensor]] = None,
    batched: bool = False,
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


def fp32_final_norm(model: Any) -> Callable[[Tensor], Tensor]:
    """The language model's final norm computing in float32 (a float32 copy if needed)."""
    module = model.bridge.ln_final.original_component
    params = list(module.parameters())
    if params and params[0].dtype != torch.float32:
        module = copy.deepcopy(module).float()
    return lambda x: module(x.float()).float()


def fp32_unembed(model: Any) -> Callable[[Tensor], Tensor]:
    """The unembedding (``lm_head``) computing in float32."""
    head = model.hf_model.get_output_embeddings()
    weight = head.weight.detach().float()
    bias = None if getattr(head, "bias", None) is None else head.bias.detach().float()
    return lambda x: torch.nn.functional.linear(x.float().to(weight.device), weight, bias)


