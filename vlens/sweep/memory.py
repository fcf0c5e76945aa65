"""Memory a sweep will need, estimated before it runs, and the check against a budget.

The estimate is deliberately simple and errs high: the weights (as loaded), plus one
forward pass of a batch (residual stream, MLP hidden states and eager attention scores of
one layer at a time, and the logits), plus what each analysis adds: a few float32 vectors
per row for the streaming forms; every cached activation of the batch for ``stream=False``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch

from vlens.errors import MemoryBudgetError, SweepConfigError

if TYPE_CHECKING:
    from vlens.model import HookedVLM

_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3,
          "t": 1024**4, "tb": 1024**4}


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes of a sweep's batch.

    Attributes:
        weights: The model's parameters and buffers.
        forward: One forward pass of the batch (activations, attention scores, logits).
        analyses: Per analysis, what it adds (cached activations for ``stream=False``).
        batch_size, seq_len, n_image_tokens: The batch shape estimated for.
        cached: The analyses in their cache (non-streaming) form.
    """

    weights: int
    forward: int
    analyses: dict[str, int]
    batch_size: int
    seq_len: int
    n_image_tokens: int
    cached: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return self.weights + self.forward + sum(self.analyses.values())

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.analyses.items())
        return (f"~{fmt_bytes(self.total)} (weights {fmt_bytes(self.weights)}, forward {fmt_bytes(self.forward)}"
                f"{', ' + parts if parts else ''}; batch {self.batch_size} x {self.seq_len} tokens, "
                f"{self.n_image_tokens} image tokens per row)")


def fmt_bytes(n: float) -> str:
    """A byte count in B / KiB / MiB / GiB / TiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def parse_bytes(value: Union[None, int, float, str]) -> Optional[float]:
    """A budget in bytes from an int or a string like ``"6GB"`` / ``"512MiB"``; None for
    the default; ``"off"`` for no check (infinity)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise SweepConfigError(f"memory_budget must be positive, got {value!r}")
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("off", "none", "inf"):
            return float("inf")
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)", text)
        if m:
            unit = m.group(2).replace("i", "")
            return float(m.group(1)) * _UNITS[unit]
    raise SweepConfigError(f"memory_budget must be bytes, a size like '6GB', or 'off'; got {value!r}")


def available_bytes(device: torch.device) -> float:
    """Free memory on the device: the GPU's free memory, or the machine's available RAM."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def model_bytes(model: "HookedVLM") -> int:
    """Bytes of the model's parameters and buffers."""
    module = model.hf_model
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def forward_bytes(model: "HookedVLM", batch: int, seq: int) -> int:
    """One no-grad forward: a few residual-sized tensors, one layer's MLP and eager
    attention scores, and the float32 logits."""
    cfg = model.cfg
    elt = torch.finfo(model.dtype).bits // 8
    d, heads, vocab = int(cfg.d_model), int(cfg.n_heads), int(cfg.d_vocab)
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d)
    resid = 6 * batch * seq * d * elt
    mlp = 3 * batch * seq * d_mlp * elt
    attn = 3 * batch * heads * seq * seq * elt
    logits = batch * seq * vocab * (elt + 4)
    vision = 4 * batch * seq * d * elt  # the vision tower and connector, at most a few such tensors
    return resid + mlp + attn + logits + vision


def cache_bytes(model: "HookedVLM", names: Sequence[str], batch: int, seq: int) -> int:
    """Everything ``run_with_cache`` keeps for these hook names."""
    cfg = model.cfg
    elt = torch.finfo(model.dtype).bits // 8
    total = 0
    for name in set(names):
        if name.endswith("hook_pattern") or name.endswith("hook_attn_scores"):
            total += batch * int(cfg.n_heads) * seq * seq * elt
        else:
            total += batch * seq * int(cfg.d_model) * elt
    return total


def estimate_memory(model: "HookedVLM", analyses: Sequence[Any], batch_size: int, seq_len: int,
                    n_image_tokens: int) -> MemoryEstimate:
    """Peak memory of one batch of the sweep (see the module docstring)."""
    per: dict[str, int] = {}
    for a in analyses:
        extra = a.activation_bytes(model, batch_size, seq_len, n_image_tokens)
        if not a.stream:
            extra += cache_bytes(model, a.hook_names(model), batch_size, seq_len)
        per[a.name] = int(extra)
    return MemoryEstimate(model_bytes(model), forward_bytes(model, batch_size, seq_len), per, batch_size, seq_len,
                          n_image_tokens, tuple(a.name for a in analyses if not a.stream))


def check_budget(estimate: MemoryEstimate, budget: Optional[float], device: torch.device) -> float:
    """Raise ``MemoryBudgetError`` if the estimate exceeds the budget; return the budget.

    The default budget is the weights (already loaded) plus the memory available now.
    """
    if budget is None:
        budget = estimate.weights + available_bytes(device)
    if estimate.total > budget:
        parts = {"the weights": estimate.weights, "the forward pass": estimate.forward, **estimate.analyses}
        largest = max(parts, key=parts.__getitem__)
        cached = ", ".join(f"{a} ({fmt_bytes(estimate.analyses[a])})" for a in estimate.cached)
        raise MemoryBudgetError(
            f"this sweep needs an estimated {estimate} but the budget is {fmt_bytes(budget)}. "
            f"Largest part: {largest} ({fmt_bytes(parts[largest])}). "
            + (f"Non-streaming (stream=False) analyses: {cached}; use their streaming form, " if cached else "Use ")
            + "a smaller batch_size, or a larger memory_budget."
        )
    return budget
