"""The tested dependency ranges: declared once in vlens/_compat.py, equal to pyproject.toml's
bounds, the CI constraints and the README, and a warning outside them."""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from vlens import _compat

ROOT = Path(__file__).resolve().parents[2]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def _declared() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    return {r.name: r for r in reqs}


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


@pytest.mark.parametrize("tested", _compat.TESTED, ids=lambda t: t.package)
def test_pyproject_declares_the_tested_range(tested):
    assert str(_declared()[tested.package].specifier) == str(Requirement(f"x{tested.specifier}").specifier)
    assert Version(tested.oldest) <= Version(tested.newest) < Version(tested.below)


@pytest.mark.parametrize("tested", _compat.TESTED, ids=lambda t: t.package)
def test_ci_pins_the_oldest_tested_release(tested):
    assert _pins()[tested.package] == tested.oldest


def test_every_pin_satisfies_what_pyproject_asks():
    pins = _pins()
    for name, req in _declared().items():
        assert name in pins, f"constraints.txt pins no {name}"
        assert Version(pins[name]) in req.specifier, (name, pins[name], str(req.specifier))


def test_readme_states_the_tested_versions():
    readme = (ROOT / "README.md").read_text()
    for tested in _compat.TESTED:
        found = re.search(rf"{re.escape(tested.package)} {re.escape(tested.oldest)}\S* to {re.escape(tested.newest)}", readme)
        assert found, f"README does not say '{tested.package} {tested.oldest} to {tested.newest}'"


def test_an_untested_version_warns_naming_package_and_version(monkeypatch):
    real = _compat.installed_version
    monkeypatch.setattr(_compat, "installed_version", lambda p: "5.99.0" if p == "transformers" else real(p))
    with pytest.warns(_compat.UntestedVersionWarning, match=r"transformers 5\.99\.0 is installed.*5\.23\.0 to 5\.24\.0"):
        _compat.warn_untested_versions()


def test_the_installed_versions_are_tested_ones():
    # CI installs the pinned set, then the newest release inside the range: both must be inside.
    assert _compat.untested_versions() == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", _compat.UntestedVersionWarning)
        _compat.warn_untested_versions()


def test_range_edges():
    tested = _compat.TestedRange("transformers", oldest="5.23.0", newest="5.24.0", below="5.25")
    assert tested.contains("5.23.0") and tested.contains("5.24.3")
    assert not tested.contains("5.22.2") and not tested.contains("5.25.0") and not tested.contains("5.25.0rc1")


def test_every_extra_is_pinned_within_what_pyproject_asks():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = _pins()
    for extra, reqs in extras.items():
        for req in map(Requirement, reqs):
            name = req.name.lower().replace("_", "-")
            assert name in pins, f"constraints.txt pins no {name} ([{extra}] extra)"
            assert Version(pins[name]) in req.specifier, (extra, name, pins[name], str(req.specifier))
