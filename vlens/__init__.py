"""vlens: mechanistic interpretability for vision LLMs, on TransformerLens 4.

The public names are imported on first use (PEP 562), so ``import vlens`` and the ``vlens``
command's ``--help`` do not pay for torch and TransformerLens until a model is needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlens._compat import warn_untested_versions
from vlens._lazy import lazy_exports

if TYPE_CHECKING:
    from vlens.cache import VLMCache
    from vlens.inputs import LanguageModelInputs, VLMInputs
    from vlens.layout import ImageSpan, TokenLayout
    from vlens.model import Generation, HookedVLM

__version__ = "0.1.0"

_PUBLIC = {
    "Generation": "vlens.model",
    "HookedVLM": "vlens.model",
    "ImageSpan": "vlens.layout",
    "LanguageModelInputs": "vlens.inputs",
    "TokenLayout": "vlens.layout",
    "VLMCache": "vlens.cache",
    "VLMInputs": "vlens.inputs",
}

warn_untested_versions()

__all__ = [
    "Generation",
    "HookedVLM",
    "ImageSpan",
    "LanguageModelInputs",
    "TokenLayout",
    "VLMCache",
    "VLMInputs",
    "__version__",
]


__getattr__ = lazy_exports(globals(), _PUBLIC)


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
