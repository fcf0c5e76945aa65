"""The one place vlens imports TransformerLens's bridge.

Importing ``transformer_lens.model_bridge`` sets the ``transformers`` logger to ERROR
for the whole process (TransformerLens 4.3 does it at import time to keep notebooks
quiet). vlens must not change a user's logging, so the level is put back right after
the import. ``tqdm.auto``'s notebook warning is silenced for this import only
(:mod:`vlens._quiet`).
"""

from __future__ import annotations

import logging

from vlens._quiet import quiet_tqdm_import

_transformers_logger = logging.getLogger("transformers")
_level_before = _transformers_logger.level
try:
    with quiet_tqdm_import():  # transformers imports tqdm.auto, which warns in a notebook without ipywidgets
        from transformer_lens.ActivationCache import ActivationCache
        from transformer_lens.hook_points import HookPoint
        from transformer_lens.model_bridge import TransformerBridge
        from transformer_lens.model_bridge.sources import build_bridge_from_module
finally:
    _transformers_logger.setLevel(_level_before)

__all__ = ["ActivationCache", "HookPoint", "TransformerBridge", "build_bridge_from_module"]
