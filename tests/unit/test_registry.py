"""The adapter registry, docs/models.md, the tiny builders and the analysis parity table
(``tests/parity/analysis_refs.FAMILIES``) list the same families."""

from __future__ import annotations

import re
from pathlib import Path

from tests.parity.analysis_refs import FAMILIES
from tests.tiny.families import FAMILY_BUILDERS
from vlens.adapters import ADAPTERS, supported_architectures

DOCS = Path(__file__).resolve().parents[2] / "docs" / "models.md"


def documented_families() -> dict[str, str]:
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \|", DOCS.read_text(), flags=re.MULTILINE)
    return dict(rows)


def test_registry_docs_and_builders_agree():
    registry = {adapter.family: adapter.hf_architectures[0] for adapter in ADAPTERS}
    assert documented_families() == registry
    assert set(FAMILY_BUILDERS) == set(registry)


def test_every_family_has_a_parity_test():
    parity = Path(__file__).resolve().parents[1] / "parity"
    for adapter in ADAPTERS:
        assert (parity / f"test_{adapter.family}.py").exists(), f"no parity test for {adapter.family}"


def test_architecture_names_are_unique():
    names = [arch for adapter in ADAPTERS for arch in adapter.hf_architectures]
    assert len(names) == len(set(names)) == len(supported_architectures())


def test_analysis_reference_table_covers_the_registry():
    """Every adapter has an analysis parity entry, every entry names a registered family, and the
    reference's own statement of per-token inputs agrees with the adapter's declaration."""
    registry = {adapter.family: adapter for adapter in ADAPTERS}
    assert {entry.adapter for entry in FAMILIES.values()} == set(registry)
    for name, entry in FAMILIES.items():
        assert FAMILY_BUILDERS[entry.adapter].__name__ == entry.builder, name  # the family's own builder
        assert entry.per_token == registry[entry.adapter].per_token_inputs, name
