"""Vision-side hooks for the Pixtral tower of Mistral3, which TransformerLens wraps opaquely.

TransformerLens 4.3's Mistral3 adapter maps ``model.vision_tower`` to one plain
``GeneralizedComponent``: only ``vision_encoder.hook_in`` / ``hook_out`` exist. This module
maps the tower's own parts with TransformerLens's public components, so that the bridge
hooks fire where Hugging Face's modules run (nothing is re-implemented; each component calls
the wrapped module):

- ``vision_encoder.patch_conv``: the patch convolution (``hook_out``: ``[images, d, h, w]``
  over the batch's padded pixels);
- ``vision_encoder.ln_pre``: the norm before the first layer;
- ``vision_encoder.encoder_layers.{i}``: each transformer layer, with ``hook_resid_pre`` /
  ``hook_resid_post`` (its input and output) and its ``ln1`` (attention norm), ``attn``
  (``attn.hook_out``: the attention block's output, before the residual add), ``ln2`` and
  ``mlp`` (``mlp.hook_out``).

Pixtral runs every image of the batch as one sequence of their patches (block-diagonal
attention), so these activations are ``[1, patches of every image, d]``, not one row per
prompt. Its attention weights are not hooked: Hugging Face returns them only after using
them, so a hook there could be read but not edited; docs/models.md says which hooks exist.

:func:`overlay` is handed to ``build_bridge_from_module`` as its ``post_adapter_hook`` (by
the Mistral3 adapter's ``tl_adapter_overlay``): it edits this bridge's own adapter, never
TransformerLens's registry.
"""

from __future__ import annotations

from typing import Any

import torch
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

from vlens import _tl  # noqa: F401  (restores the transformers log level TL's import changes)


class PixtralLayerBridge(GeneralizedComponent):
    """One Pixtral transformer layer: hooks on its input and output (the residual stream)."""

    is_list_item = True
    hook_aliases = {
        "hook_resid_pre": "hook_in",
        "hook_resid_post": "hook_out",
        "hook_attn_out": "attn.hook_out",
        "hook_mlp_out": "mlp.hook_out",
    }

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.original_component is None:
            raise RuntimeError(f"original component not set for {self.name}")
        output = self.original_component(self.hook_in(hidden_states), *args, **kwargs)
        if isinstance(output, tuple):
            return (self.hook_out(output[0]),) + output[1:]
        return self.hook_out(output)


class PixtralTowerBridge(GeneralizedComponent):
    """The whole Pixtral tower (``hook_in``: pixels, ``hook_out``: its last hidden state)."""

    hook_aliases = {"hook_vision_out": "hook_out"}

    def __init__(self, name: str, config: Any = None) -> None:
        super().__init__(
            name,
            config,
            submodules={
                "patch_conv": GeneralizedComponent(name="patch_conv"),
                "ln_pre": GeneralizedComponent(name="ln_pre"),
                "encoder_layers": PixtralLayerBridge(
                    name="transformer.layers",
                    config=config,
                    submodules={
                        "ln1": GeneralizedComponent(name="attention_norm"),
                        "attn": GeneralizedComponent(name="attention"),
                        "ln2": GeneralizedComponent(name="ffn_norm"),
                        "mlp": GeneralizedComponent(name="feed_forward"),
                    },
                ),
            },
        )


def overlay(tl_adapter: Any) -> None:
    """Map ``model.vision_tower`` to :class:`PixtralTowerBridge` in a Mistral3 bridge's adapter."""
    components = tl_adapter.components
    current = components.get("vision_encoder")
    if current is None or getattr(current, "name", None) != "model.vision_tower":
        raise RuntimeError(
            f"TransformerLens's Mistral3 adapter no longer maps vision_encoder to model.vision_tower (got {current!r})"
        )
    components["vision_encoder"] = PixtralTowerBridge(name="model.vision_tower", config=tl_adapter.cfg)
