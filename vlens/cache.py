"""``VLMCache``: TransformerLens's ``ActivationCache`` plus the batch's ``TokenLayout``.

It behaves as a TransformerLens cache (``cache["blocks.3.hook_resid_post"]``,
``cache["resid_post", 3]``, ``accumulated_resid``...) and adds what a vision-language
analysis needs: the layout, alias names, and slicing by modality.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from vlens._tl import ActivationCache
from vlens.errors import HookNameError, closest
from vlens.layout import TokenLayout


class VLMCache(ActivationCache):
    """Cached activations of one batch, keyed by canonical hook name.

    Each tensor is stored once: a hook name whose activation is the very tensor of
    another (an alias, or a hook_out that is the next hook_in) resolves to the stored
    entry through ``aliases`` instead of being stored twice.

    Attributes:
        layout: The batch's token layout.
        aliases: Hook name -> the stored name holding the same tensor.
        unfired: Requested hook names that did not fire in this forward pass.
    """

    def __init__(
        self,
        cache_dict: dict[str, Tensor],
        model: Any,
        layout: TokenLayout,
        aliases: Optional[dict[str, str]] = None,
        unfired: tuple[str, ...] = (),
    ) -> None:
        super().__init__(cache_dict, model, has_batch_dim=True)
        self.layout = layout
        self.aliases = dict(aliases or {})
        self.unfired = tuple(unfired)

    def _resolve(self, key: str) -> str:
        if key in self.cache_dict:
            return key
        if key in self.aliases and self.aliases[key] in self.cache_dict:
            return self.aliases[key]
        return key

    def __getitem__(self, key: Any) -> Tensor:
        if isinstance(key, str):
            resolved = self._resolve(key)
            if resolved in self.cache_dict:
                return self.cache_dict[resolved]
            if "." in key or key.startswith("hook_"):
                self._missing(key)
        try:
            return super().__getitem__(key)
        except KeyError:
            self._missing(str(key))
            raise  # unreachable: _missing raises

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._resolve(key) in self.cache_dict

    def _missing(self, key: str) -> None:
        suggestions = closest(key, [*self.cache_dict, *self.aliases])
        raise HookNameError(
            f"{key!r} is not in this cache"
            + (f"; closest cached names: {suggestions}" if suggestions else "")
            + ". Ask run_with_cache for it with names_filter."
        )

    def nbytes(self) -> int:
        """Bytes held by the cached tensors (each storage counted once)."""
        seen: dict[int, int] = {}
        for t in self.cache_dict.values():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())

    def resid_stack(self) -> Float[Tensor, "layer batch pos d_model"]:
        """The residual stream at every layer boundary, in float32.

        Index 0 is ``blocks.0.hook_resid_pre`` (the input embeddings, image features
        included); index l is ``blocks.{l-1}.hook_resid_post``; ``n_layers + 1`` entries.
        """
        n_layers = self.model.cfg.n_layers
        names = ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.hook_resid_post" for l in range(n_layers)]
        return torch.stack([self[name].float() for name in names])

    def segment(self, name: str, segment: str, row: int = 0) -> Tensor:
        """An activation at the positions of one segment of one row.

        Args:
            name: Hook name of an activation whose axis 1 is the position
                (``[batch, pos, ...]``).
            segment: ``image``, ``text``, ``prefix``, ``instruction``, ``answer``,
                ``marker``, ``real`` or ``last``.
            row: Batch row.
        """
        act = self[name]
        mask = self.layout.mask(segment)[row].to(act.device)
        if act.shape[1] != mask.shape[0]:
            raise HookNameError(
                f"{name!r} has shape {tuple(act.shape)}: its axis 1 is not the sequence position "
                f"({mask.shape[0]}), so it cannot be sliced by segment"
            )
        return act[row][mask]
