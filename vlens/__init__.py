"""vlens: mechanistic interpretability for vision LLMs, on TransformerLens 4."""

from vlens._compat import warn_untested_versions
from vlens.cache import VLMCache
from vlens.inputs import LanguageModelInputs, VLMInputs
from vlens.layout import ImageSpan, TokenLayout
from vlens.model import Generation, HookedVLM

__version__ = "0.1.0"

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
