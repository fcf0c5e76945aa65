"""The family registry: which adapter handles which Hugging Face architecture.

The supported-models table in docs/models.md and the parity tests list the same
families; ``tests/unit/test_registry.py`` keeps the three in agreement.
"""

from __future__ import annotations

from typing import Any

from vlens.adapters.base import VisionPrefixAdapter
from vlens.adapters.blip import Blip2Adapter, InstructBlipAdapter
from vlens.adapters.gemma3 import Gemma3Adapter
from vlens.adapters.idefics3 import Idefics3Adapter
from vlens.adapters.llava import LlavaAdapter
from vlens.adapters.llava_next import LlavaNextAdapter
from vlens.adapters.llava_onevision import LlavaOnevisionAdapter
from vlens.adapters.mistral3 import Mistral3Adapter
from vlens.adapters.paligemma import PaliGemmaAdapter
from vlens.adapters.smolvlm import SmolVLMAdapter
from vlens.errors import UnsupportedArchitectureError

ADAPTERS: tuple[type[VisionPrefixAdapter], ...] = (
    LlavaAdapter,
    LlavaNextAdapter,
    Idefics3Adapter,
    Gemma3Adapter,
    Blip2Adapter,
    InstructBlipAdapter,
    LlavaOnevisionAdapter,
    Mistral3Adapter,
    PaliGemmaAdapter,
    SmolVLMAdapter,
)


def supported_architectures() -> dict[str, type[VisionPrefixAdapter]]:
    """Every Hugging Face architecture name vlens handles, mapped to its adapter."""
    return {arch: adapter for adapter in ADAPTERS for arch in adapter.hf_architectures}


def adapter_for(config: Any) -> type[VisionPrefixAdapter]:
    """The adapter class for a Hugging Face config.

    Raises:
        UnsupportedArchitectureError: naming the architecture and listing the supported ones.
    """
    archs = list(getattr(config, "architectures", None) or [])
    table = supported_architectures()
    for arch in archs:
        if arch in table:
            return table[arch]
    model_type = getattr(config, "model_type", None)
    raise UnsupportedArchitectureError(
        f"vlens does not support architecture {archs or model_type!r}; supported: {sorted(table)}"
    )


__all__ = ["ADAPTERS", "VisionPrefixAdapter", "adapter_for", "supported_architectures"]
