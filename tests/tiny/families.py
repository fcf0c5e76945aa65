"""Every family's tiny-checkpoint builder, by family name (one entry per adapter).

``tests/unit/test_registry.py`` checks this table, the adapter registry and
docs/models.md name the same families.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tests.tiny.blip import build_blip2, build_instructblip
from tests.tiny.llava import build_llava

FAMILY_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "llava": build_llava,
    "blip2": build_blip2,
    "instructblip": build_instructblip,
}
