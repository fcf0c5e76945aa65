"""A count-curve run and a report print vlens's own progress and nothing from the dependencies:
no progress bar of a checkpoint that loads in a blink, no image-processor fallback notice, no
deprecation or other warning (``-W default`` shows the ones Python hides). Each run is a fresh
process, as a user starts it, and the process's logging levels stay what they were."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# What vlens itself says on stderr during these runs.
OWN = ("loading model ", "loaded ", "token removal: ", "generating the model's", "forward pass with the streams", "[", "report written")
NOISE = ("warning", "deprecat", "loading weights", "it/s", "falling back", "torchvision", "[transformers]")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-W", "default", "-m", "vlens.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def assert_quiet(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr
    lines = [l for l in result.stderr.replace("\r", "\n").splitlines() if l.strip()]
    noisy = [l for l in lines if any(n in l.lower() for n in NOISE) or not l.startswith(OWN)]
    assert not noisy, "\n".join(noisy)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    # A CLIP image processor, whose fast class needs torchvision: transformers would say it falls back.
    from tests.tiny.llava import build_llava

    return build_llava(tmp_path_factory.mktemp("llava"))


@pytest.mark.parametrize("model", ["toy", "tiny-llava"])
def test_count_curve_prints_no_dependency_warning(model, tiny_llava):
    # Words the model's vocabulary holds: vlens's own unknown-word warning is not noise.
    words = [] if model == "toy" else ["--prompt", "what is in the image ?", "--answer", "a red circle ."]
    assert_quiet(run_cli("count-curve", "--model", "toy" if model == "toy" else str(tiny_llava), "--counts", "0,8,16", *words))


def test_report_prints_no_dependency_warning(tmp_path):
    assert_quiet(run_cli("report", "--out", str(tmp_path / "report")))


def test_loading_leaves_logging_and_warning_filters_as_they_were():
    import logging
    import warnings

    from vlens import HookedVLM

    logger = logging.getLogger("transformers")
    level, filters = logger.level, list(warnings.filters)
    HookedVLM.from_pretrained("toy", device="cpu")
    assert logger.level == level and list(warnings.filters) == filters
