"""``ruff check vlens`` and ``pyright`` (configured in pyproject.toml) pass on the package.

Runs only where both tools are installed (the ``test`` extra pins them); elsewhere it skips.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("ruff", "pyright")
MISSING = [tool for tool in TOOLS if shutil.which(tool) is None]

pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"{' and '.join(MISSING)} not on PATH (pip install -e '.[test]' installs the pinned versions)",
)


def _run(*command: str) -> None:
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"`{' '.join(command)}` exited with {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )


def test_ruff_is_clean() -> None:
    _run("ruff", "check", "vlens")


def test_pyright_reports_no_error() -> None:
    _run("pyright")
