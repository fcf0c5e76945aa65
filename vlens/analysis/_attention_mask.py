"""Blocking chosen query -> key attention edges inside the language model's layers.

Knockout masks the attention scores before the softmax (Neo et al., Zhang et al.): a
blocked entry gets the dtype's most negative value, the value Hugging Face's own causal mask
uses, so its weight after the softmax is exactly zero. Two routes reach the scores:

* ``"scores"``: the bridge's attention component computes the softmax itself and hands the
  pre-softmax scores through ``blocks.{l}.attn.hook_attn_scores`` (TransformerLens's
  ``PositionEmbeddingsAttentionBridge``, used for rotary-position language models). The
  hook edits them.
* ``"mask"``: the component delegates to the Hugging Face attention module, and its
  ``hook_attn_scores`` fires after the fact on the softmaxed weights (TransformerLens's plain
  ``AttentionBridge``): an edit there changes nothing. Eager attention adds
  its ``attention_mask`` argument to the scores before the softmax, so a forward pre-hook on
  the Hugging Face module adds the knockout to that mask instead.

Either way ``blocks.{l}.attn.hook_pattern`` sees the weights the layer used, and every run
checks there that each blocked weight is zero: a route that did not take effect raises
rather than reporting a knockout that did not happen.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Literal

import torch
from jaxtyping import Bool
from torch import Tensor

from vlens.errors import UnsupportedArchitectureError

if TYPE_CHECKING:
    from vlens.model import HookedVLM

Route = Literal["scores", "mask"]


def knockout_route(model: "HookedVLM") -> Route:
    """How this model's language-model attention is masked before its softmax (see module doc)."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    attn = model.bridge.blocks[0].attn
    delegates = type(attn).forward is AttentionBridge.forward
    if not delegates or getattr(attn.original_component, "accepts_pattern_fn", False):
        return "scores"
    family = model.adapter.family
    implementation = getattr(model.adapter.language_model(model.hf_model).config, "_attn_implementation", None)
    if implementation != "eager":
        raise UnsupportedArchitectureError(
            f"attention knockout on {family}: its language-model attention ({type(attn.original_component).__name__}) "
            f"exposes no pre-softmax scores hook, and runs with {implementation!r} attention, whose mask vlens cannot "
            "edit per layer; load the model with eager attention (vlens's default)"
        )
    return "mask"


@contextmanager
def blocked_attention(
    model: "HookedVLM", blocks: dict[int, Bool[Tensor, "rows q k"]], route: Route
) -> Iterator[None]:
    """Inside the block, layer ``l`` of the language model gives zero weight to every
    ``(row, query, key)`` with ``blocks[l][row, query, key]`` True.

    ``blocks[l]`` is indexed by absolute sequence positions; a forward over a suffix
    (queries ``k - q .. k - 1`` of ``k`` keys, after a key/value cache) reads its corner.
    """
    family = model.adapter.family
    fwd_hooks: list[tuple[str, Any]] = []
    with ExitStack() as stack:
        for layer, block in blocks.items():
            def corner(shape: torch.Size, block: Tensor = block, layer: int = layer) -> Tensor:
                q, k = shape[-2], shape[-1]
                if block.shape[0] != shape[0] or k > block.shape[-1]:
                    raise RuntimeError(
                        f"layer {layer}: attention of shape {tuple(shape)} does not fit knockout mask {tuple(block.shape)}"
                    )
                return block[:, k - q : k, :k][:, None]  # [rows, 1, q, k] over heads

            def check(pattern: Any, hook: Any, corner=corner, layer: int = layer) -> None:
                if not isinstance(pattern, Tensor):
                    return None
                leaked = pattern.detach().float().masked_fill(~corner(pattern.shape).to(pattern.device), 0.0)
                if float(leaked.abs().max()) > 1e-6:
                    raise UnsupportedArchitectureError(
                        f"attention knockout on {family}: layer {layer} still gives a blocked key weight "
                        f"{float(leaked.abs().max()):.3g} after masking through the {route!r} route; this attention "
                        "implementation is not supported by attention knockout"
                    )
                return None

            if route == "scores":
                def mask_scores(scores: Tensor, hook: Any, corner=corner) -> Tensor:
                    return scores.masked_fill(corner(scores.shape).to(scores.device), torch.finfo(scores.dtype).min)

                fwd_hooks.append((f"blocks.{layer}.attn.hook_attn_scores", mask_scores))
            else:
                module = model.bridge.blocks[layer].attn.original_component
                stack.enter_context(_mask_pre_hook(module, corner, family, layer))
            fwd_hooks.append((f"blocks.{layer}.attn.hook_pattern", check))
        stack.enter_context(model.hooks(fwd_hooks))
        yield


@contextmanager
def _mask_pre_hook(module: torch.nn.Module, corner: Any, family: str, layer: int) -> Iterator[None]:
    def add_knockout(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, Tensor) or mask.ndim != 4:
            raise UnsupportedArchitectureError(
                f"attention knockout on {family}: layer {layer}'s attention received attention_mask "
                f"{type(mask).__name__ if not isinstance(mask, Tensor) else tuple(mask.shape)}, not the 4-d additive "
                "mask eager attention adds to its scores, so there is nothing to add the knockout to"
            )
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        rows, q = (hidden.shape[0], hidden.shape[1]) if isinstance(hidden, Tensor) else (mask.shape[0], mask.shape[-2])
        blocked = corner(torch.Size((rows, 1, q, mask.shape[-1]))).to(mask.device)
        if mask.dtype == torch.bool:  # True = attend
            kwargs["attention_mask"] = mask & ~blocked
        else:
            kwargs["attention_mask"] = mask.expand(rows, -1, -1, -1).masked_fill(blocked, torch.finfo(mask.dtype).min)
        return args, kwargs

    handle = module.register_forward_pre_hook(add_knockout, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
