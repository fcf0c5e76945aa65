"""Running the language model's later layers on fewer positions than its earlier ones.

Hugging Face decoders build everything per-token once, before their first layer (the 4-D
attention mask, the rotary ``position_embeddings``, the ``position_ids``), and hand it to every
layer in the same call convention (``layer(hidden_states, attention_mask=..., position_embeddings=...,
position_ids=..., past_key_values=..., use_cache=...)``). TransformerLens's bridge keeps that
convention: the layers in the decoder's list *are* the bridge's blocks, called by the Hugging Face
loop. So a forward pre-hook on block K and on every block after it can shorten the sequence: at
block K it keeps the chosen positions of the hidden states, and at every block from K on it keeps
the same rows (and, for the mask, columns) of each per-token argument. Every later layer then
computes exactly what it would compute for the shorter sequence, each token keeping the position
the model gave it in the full one (its rotary angles, its learned position embedding added before
layer 0) and the mask entries the model built for it: causal among the kept tokens, and for a
family whose image tokens attend to each other (through per-token inputs) still bidirectional among
the kept image tokens, sliding windows measured in the full sequence's positions.

TransformerLens's own ``start_at_layer`` does not do this: it runs the earlier blocks anyway and
swaps in a residual of the same length at block K (``BlockBridge._maybe_inject_start_residual``).

A layer argument this module does not know that has a per-token axis is refused, naming it: it
would otherwise keep describing the full sequence.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from vlens.errors import UnsupportedArchitectureError

# Per-token layer arguments, and which of their axes run over positions (after the batch axis 0).
_TOKEN_AXES = {"attention_mask": (2, 3), "position_ids": (1,), "position_embeddings": (1,)}
_IGNORED = {"past_key_values", "past_key_value", "cache", "layer_past", "use_cache", "output_attentions"}


def _take(t: Tensor, axes: Sequence[int], index: Tensor) -> Tensor:
    """``t`` with only the ``index[v]`` positions along each of ``axes``, one batch row per v.

    ``t``'s batch axis (0) has 1 entry (broadcast to every variant) or one per variant.
    """
    variants = index.shape[0]
    index = index.to(t.device)  # under a device_map the layers live on several devices
    if t.shape[0] not in (1, variants):
        raise UnsupportedArchitectureError(
            f"a layer argument of shape {tuple(t.shape)} has a batch axis of {t.shape[0]}, not 1 or {variants}"
        )
    t = t.expand(variants, *t.shape[1:])
    for axis in axes:
        shape = [variants] + [1] * (t.ndim - 1)
        shape[axis] = index.shape[1]
        idx = index.view(shape).expand(*[index.shape[1] if d == axis else t.shape[d] for d in range(t.ndim)])
        t = t.gather(axis, idx)
    return t


def _shorten_argument(name: str, value: Any, index: Tensor, full_length: int) -> Any:
    if value is None or name in _IGNORED:
        if name in ("past_key_values", "past_key_value", "cache", "layer_past") and value is not None:
            if hasattr(value, "get_seq_length") and int(value.get_seq_length()) == 0:
                return value
            raise UnsupportedArchitectureError(
                "pruning runs the language model without a key/value cache, but a layer was called with one"
            )
        return value
    if name in _TOKEN_AXES:
        axes = _TOKEN_AXES[name]
        if name == "position_ids" and isinstance(value, Tensor) and value.ndim != 2:
            # Multi-axis rotary positions ([axes, batch, pos]) put the batch second: not this layout.
            raise UnsupportedArchitectureError(
                f"a decoder layer received position_ids of shape {tuple(value.shape)}, not [batch, pos]; "
                "vlens cannot yet drop tokens inside a language model with multi-axis positions"
            )
        if isinstance(value, Tensor):
            return _take(value, axes, index)
        if isinstance(value, (tuple, list)) and all(isinstance(v, Tensor) for v in value):
            return type(value)(_take(v, axes, index) for v in value)
        raise UnsupportedArchitectureError(f"layer argument {name!r} is a {type(value).__name__}, not a tensor")
    if name == "cache_position" and isinstance(value, Tensor):
        # Slots of a key/value cache, not token positions: the shorter sequence fills 0..n-1.
        return torch.arange(index.shape[1], device=value.device, dtype=value.dtype)
    if isinstance(value, Tensor) and full_length in tuple(value.shape):
        raise UnsupportedArchitectureError(
            f"a decoder layer received {name!r} of shape {tuple(value.shape)}, which has an axis of the sequence's "
            f"length ({full_length}); vlens does not know how to shorten it, so it cannot drop tokens inside this "
            f"language model (known per-token arguments: {sorted(_TOKEN_AXES)})"
        )
    return value


@contextmanager
def shortened_after(
    blocks: Sequence[torch.nn.Module], first: int, index: Int[Tensor, "variant n"], full_length: int
) -> Iterator[None]:
    """Within the block, blocks ``first``, ``first + 1``, ... run on ``index[v]``'s positions only.

    Args:
        blocks: The decoder's layers in order (``model.bridge.blocks``).
        first: The first block that sees the shorter sequence; ``len(blocks)`` for none.
        index: Per variant, the ascending positions it keeps. The forward runs on a batch of
            one full row; block ``first`` turns it into one row per variant.
        full_length: The full sequence's length.
    """

    def first_block(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        if not isinstance(hidden, Tensor) or hidden.ndim != 3 or hidden.shape[1] != full_length:
            raise UnsupportedArchitectureError(
                f"block {first} was called with hidden states of shape {tuple(getattr(hidden, 'shape', ()))}, "
                f"not [batch, {full_length}, d_model]"
            )
        hidden = _take(hidden, (1,), index)
        return (hidden, *rest), later_arguments(kwargs)

    def later_arguments(kwargs: dict) -> dict:
        return {name: _shorten_argument(name, value, index, full_length) for name, value in kwargs.items()}

    def later_block(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, later_arguments(kwargs)

    handles = []
    try:
        for i in range(first, len(blocks)):
            hook = first_block if i == first else later_block
            handles.append(blocks[i].register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
