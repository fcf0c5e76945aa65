"""TransformerLens bridge adapters for the Qwen-VL family, registered under vlens's own names.

* Qwen2-VL: TransformerLens 4.3 has no adapter. This one follows TransformerLens's own
  Qwen2.5-VL adapter (Qwen2-style text decoder at ``model.language_model`` with q/k/v
  biases and HF-native M-RoPE attention, the merger as ``vision_projector``, the ViT at
  ``model.visual`` through TransformerLens's Qwen vision-tower bridge) with Qwen2-VL's
  own tower: LayerNorm blocks, an ``fc1``/``fc2`` MLP, a 2-D rotary embedding
  (``rotary_pos_emb``).
* Qwen2.5-VL and Qwen3-VL: TransformerLens's own adapters, whose constructors refuse to run
  without torchvision (``required_libraries``), although their component mappings never
  use it (only the video processor does). vlens registers subclasses that drop that
  requirement, under names of its own, so TransformerLens's entries are left as they are.

Everything is registered through ``ArchitectureAdapterFactory.register_adapter``, the
public registry ``build_bridge_from_module`` consults (as the BLIP adapters are); nothing in
TransformerLens is edited or patched.
"""

from __future__ import annotations

from typing import Any

from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
from transformer_lens.model_bridge.generalized_components import LinearBridge
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
from transformer_lens.model_bridge.generalized_components.qwen3_5_vision_encoder import (
    Qwen3_5VisionBlockBridge,
    Qwen3_5VisionEncoderBridge,
)
from transformer_lens.model_bridge.supported_architectures.qwen2_5_vl import Qwen2_5_VLArchitectureAdapter
from transformer_lens.model_bridge.supported_architectures.qwen3_vl import Qwen3VLArchitectureAdapter

from vlens import _tl  # noqa: F401  (restores the transformers log level TL's import changes)


class _ImagesOnly:
    """Mixin: no optional library is needed for images (torchvision serves only videos)."""

    required_libraries: list[str] = []


class Qwen2VLBridgeAdapter(_ImagesOnly, Qwen2_5_VLArchitectureAdapter):
    """``Qwen2VLForConditionalGeneration``: TransformerLens's Qwen2.5-VL mapping with Qwen2-VL's
    vision blocks (LayerNorm ``norm1``/``norm2``, ``mlp.fc1``/``mlp.fc2``)."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        assert self.component_mapping is not None
        self.component_mapping["vision_encoder"] = Qwen3_5VisionEncoderBridge(
            name="model.visual",
            config=self.cfg,
            submodules={
                "pos_embed": GeneralizedComponent(name="rotary_pos_emb"),
                "blocks": Qwen3_5VisionBlockBridge(
                    name="blocks",
                    submodules={
                        "mlp": GeneralizedComponent(
                            name="mlp",
                            submodules={"in": LinearBridge(name="fc1"), "out": LinearBridge(name="fc2")},
                        ),
                    },
                ),
            },
        )


class Qwen2_5_VLBridgeAdapter(_ImagesOnly, Qwen2_5_VLArchitectureAdapter):
    """TransformerLens's Qwen2.5-VL adapter, for images without torchvision."""


class Qwen3VLBridgeAdapter(_ImagesOnly, Qwen3VLArchitectureAdapter):
    """TransformerLens's Qwen3-VL adapter, for images without torchvision."""


TL_ARCHITECTURES: dict[str, type] = {
    "vlens.Qwen2VLForConditionalGeneration": Qwen2VLBridgeAdapter,
    "vlens.Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLBridgeAdapter,
    "vlens.Qwen3VLForConditionalGeneration": Qwen3VLBridgeAdapter,
}


def register() -> None:
    """Make the Qwen-VL adapters reachable through TransformerLens's public factory registry."""
    for name, adapter in TL_ARCHITECTURES.items():
        ArchitectureAdapterFactory.register_adapter(name, adapter)
