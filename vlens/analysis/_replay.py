"""Re-running the language model's layers from layer l on, for patching.

A patch at layer l changes nothing below l, so the corrupted run's input to layer l (its
``hook_resid_pre``) is every variant's input there: the variants need only layers l .. L-1.
:class:`LayerReplay` records, in one corrupted forward, the arguments Hugging Face's decoder
loop hands each block (the bridge's ``blocks.{j}``, whose hooks fire as usual when it is
called), then calls blocks l .. L-1 directly on a batch of variants, cut to the positions from
c on when the key/value cache of the corrupted prefix holds the positions before c (a causal
language model), and reads the logits with the model's final norm and unembedding.

Only arguments it understands are cut to the suffix (the 4-d attention mask, the rotary
position embeddings, the position ids, the cache); a block receiving any other tensor is not
replayed (:meth:`LayerReplay.record` returns the reason). Each replay is checked once against
the corrupted run's own logits before it is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import Tensor

if TYPE_CHECKING:
    from vlens.analysis.knockout import _PrefixBuffers
    from vlens.model import HookedVLM

_CACHE_KEYS = ("past_key_values", "cache", "past_key_value")
_PASSED = ("use_cache", "output_attentions")


class LayerReplay:
    """The corrupted run's per-block arguments and inputs, replayable from any layer."""

    def __init__(self, model: "HookedVLM", inputs: list[Tensor], kwargs: list[dict[str, Any]], length: int) -> None:
        self.model = model
        self.inputs = inputs  # per block, its input hidden state [1, n, d]
        self.kwargs = kwargs
        self.length = length

    @staticmethod
    def record(model: "HookedVLM", run: Any) -> tuple[Any, Union["LayerReplay", str]]:
        """Call ``run()`` (the corrupted forward) with recorders on every block; returns what
        it returned and the replay, or the reason it cannot be built."""
        blocks = list(model.bridge.blocks)
        inputs: list[Optional[Tensor]] = [None] * len(blocks)
        kwargs: list[dict[str, Any]] = [{} for _ in blocks]

        def recorder(j: int):
            def pre(_module: torch.nn.Module, args: tuple, kw: dict) -> None:
                hidden = args[0] if args else kw.get("hidden_states")
                inputs[j] = hidden.detach() if isinstance(hidden, Tensor) else None
                kwargs[j] = {k: v for k, v in kw.items() if k != "hidden_states"}
                if len(args) > 1:
                    kwargs[j]["__extra_args__"] = args[1:]

            return pre

        handles = [block.register_forward_pre_hook(recorder(j), with_kwargs=True) for j, block in enumerate(blocks)]
        try:
            out = run()
        finally:
            for handle in handles:
                handle.remove()
        for j, (hidden, kw) in enumerate(zip(inputs, kwargs)):
            if hidden is None or hidden.ndim != 3:
                return out, f"block {j} did not receive a [batch, pos, d_model] hidden state"
            if "__extra_args__" in kw:
                return out, f"block {j} received positional arguments beyond its hidden state"
            for key, value in kw.items():
                if key in _CACHE_KEYS or key in _PASSED or value is None or isinstance(value, (bool, int, float, str)):
                    continue
                if key in ("attention_mask", "position_ids", "cache_position") and isinstance(value, Tensor):
                    continue
                if key == "position_embeddings" and isinstance(value, tuple) and all(isinstance(v, Tensor) for v in value):
                    continue
                return out, f"block {j} received {key!r} ({type(value).__name__}), which layer replay does not know how to cut"
        length = int(inputs[0].shape[1])  # type: ignore[union-attr]
        return out, LayerReplay(model, [h for h in inputs if h is not None], kwargs, length)

    def _kwargs(self, j: int, start: int, rows: int, past: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in self.kwargs[j].items():
            if key in _CACHE_KEYS:
                out[key] = past
            elif key == "use_cache":
                out[key] = past is not None
            elif key == "attention_mask" and isinstance(value, Tensor) and value.ndim == 4:
                out[key] = value[..., start:, :]
            elif key == "attention_mask" and isinstance(value, Tensor):
                out[key] = value
            elif key == "position_ids" and isinstance(value, Tensor):
                cut = value[..., start:]
                out[key] = cut.expand(*cut.shape[:-2], rows, cut.shape[-1]) if cut.shape[-2] == 1 else cut
            elif key == "cache_position" and isinstance(value, Tensor):
                out[key] = value[start:]
            elif key == "position_embeddings":
                out[key] = tuple(v[:, start:] for v in value)
            else:
                out[key] = value
        return out

    def logits(
        self, first_layer: int, start: int, rows: int, read: int, buffers: Optional["_PrefixBuffers"]
    ) -> Tensor:
        """Logits ``[rows, vocab]`` at position ``read`` of ``rows`` copies of the corrupted run,
        re-run from block ``first_layer`` on positions ``start ..`` (hooks attached by the caller
        fire in those blocks)."""
        hidden = self.inputs[first_layer][:, start:].expand(rows, -1, -1).contiguous()
        past = buffers.cache(rows, start) if (buffers is not None and start > 0) else None
        if past is None and start > 0:
            raise RuntimeError("a suffix replay needs the prefix's key/value cache")
        blocks = list(self.model.bridge.blocks)
        try:
            for j in range(first_layer, len(blocks)):
                out = blocks[j](hidden, **self._kwargs(j, start, rows, past))
                hidden = out[0] if isinstance(out, tuple) else out
        finally:
            if past is not None and buffers is not None:
                buffers.restore(start, self.length)
        normed = self.model.final_norm(hidden[:, read - start])
        return self.model.unembed(normed).float()
