"""Every family's tiny-checkpoint builder, by family name (one entry per adapter).

``tests/unit/test_registry.py`` checks this table, the adapter registry and
docs/models.md name the same families.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tests.tiny.blip import build_blip2, build_instructblip
from tests.tiny.gemma3 import build_gemma3
from tests.tiny.idefics3 import build_idefics3
from tests.tiny.llava import build_llava
from tests.tiny.llava_next import build_llava_next
from tests.tiny.paligemma import build_paligemma
from tests.tiny.smolvlm import build_smolvlm
from tests.tiny.llava_onevision import build_llava_onevision
from tests.tiny.mistral3 import build_mistral3

FAMILY_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "llava": build_llava,
    "llava_next": build_llava_next,
    "idefics3": build_idefics3,
    "gemma3": build_gemma3,
    "blip2": build_blip2,
    "instructblip": build_instructblip,
    "paligemma": build_paligemma,
    "smolvlm": build_smolvlm,
    "llava_onevision": build_llava_onevision,
    "mistral3": build_mistral3,
}
