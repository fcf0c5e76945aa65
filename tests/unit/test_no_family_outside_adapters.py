"""Nothing outside ``vlens/adapters/`` names a family (DESIGN.md, "The family contract").

A grep over every ``vlens`` source file, code, strings, comments and docstrings alike, for
family and model names, Hugging Face class names and family-specific input names (from the
adapter registry as well as a fixed list), and for the image-processor geometry settings
only an adapter may read. Whatever it finds belongs in the family's adapter, stated as a
fact of the contract.

Not scanned:
    * ``vlens/adapters/``: the one place that knows families.
    * ``vlens/zoo/``: the embedded toy checkpoint and its training recipe, which build one
      specific LLaVA-architecture model (its config and processor are the toy's own).
    * ``vlens/convert/``: the converter of MiniGPT-4's published checkpoint into the BLIP-2
      layout, a tool about that one checkpoint format.
"""

from __future__ import annotations

import re
from pathlib import Path

from vlens.adapters import ADAPTERS

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "vlens"
NOT_SCANNED = ("vlens/adapters/", "vlens/zoo/", "vlens/convert/")

# The converter's command names the checkpoint format it converts, like vlens/convert/ itself.
ALLOWED_PATHS = ("vlens/cli/convert.py",)
ALLOWED_LINES: dict[str, tuple[str, ...]] = {}

FAMILY_WORDS = (
    "llava", "gemma", "idefics", "smolvlm", "blip", "qformer", "q-former", "minigpt", "paligemma", "qwen",
    "vicuna", "siglip", "llama", "mistral", "token_type_ids", "image_newline",
)
CASE_SENSITIVE_WORDS = ("CLIP", "OPT")  # short names that are also ordinary words (np.clip, "option")
PROCESSOR_GEOMETRY = (
    "do_center_crop", "crop_size", "shortest_edge", "longest_edge", "image_grid_pinpoints", "max_image_size",
    "do_image_splitting", "do_pan_and_scan",
)


def registry_names() -> set[str]:
    """Every family, Hugging Face architecture and family-specific input the registry knows."""
    names: set[str] = set()
    for adapter in ADAPTERS:
        names.add(adapter.family)
        names.update(adapter.hf_architectures)
        names.update(adapter.model_input_names)
        names.update(adapter.per_token_inputs)
    return names


def pattern() -> re.Pattern:
    insensitive = sorted({*FAMILY_WORDS, *PROCESSOR_GEOMETRY, *(n.lower() for n in registry_names())}, key=len)
    words = "|".join(re.escape(w) for w in reversed(insensitive))
    exact = "|".join(re.escape(w) for w in CASE_SENSITIVE_WORDS)
    return re.compile(rf"(?i:{words})|\b(?:{exact})\b")


def findings() -> list[str]:
    found = []
    regex = pattern()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(NOT_SCANNED) or rel.startswith(ALLOWED_PATHS):
            continue
        allowed = ALLOWED_LINES.get(rel, ())
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            match = regex.search(line)
            if match and not any(text in line for text in allowed):
                found.append(f"{rel}:{number}: {match.group(0)!r} in {line.strip()}")
    return found


def test_no_family_is_named_outside_the_adapters():
    found = findings()
    assert not found, "family facts outside vlens/adapters/ (state them in the adapter):\n" + "\n".join(found)


def test_the_grep_finds_what_it_looks_for(tmp_path):
    regex = pattern()
    for line in ("if adapter.family == 'gemma3':", "kw['token_type_ids']", "LlavaNextForConditionalGeneration",
                 "ip.do_center_crop", "an OPT tower", "pixel_attention_mask"):
        assert regex.search(line), line
    for line in ("np.clip(x, 0, 1)", "options = []", "the image processor", "adapter.per_token_inputs"):
        assert not regex.search(line), line
