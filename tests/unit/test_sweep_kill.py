"""A sweep killed with SIGKILL at random points and resumed gives exactly the rows of an
uninterrupted run: no example lost, none duplicated, every number equal."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from vlens import sweep
from vlens.data import load_scenes

N_SCENES, BATCH = 24, 2
ANALYSES = "modality_similarity,attention_to_image,logit_lens"


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    return env


def command(model_dir, out) -> list[str]:
    return [sys.executable, "-m", "vlens.cli", "sweep", "--model", str(model_dir), "--data-format", "scenes",
            "--data", str(N_SCENES), "--seed", "5", "--out", str(out), "--analyses", ANALYSES,
            "--batch-size", str(BATCH), "--device", "cpu", "--no-progress", "--no-summary"]


def n_shards(out) -> int:
    return len(list((out / "shards").glob("shard-*.parquet"))) if (out / "shards").is_dir() else 0


def assert_consistent(out) -> None:
    rows = sweep.load_results(out)  # raises on an example in two shards
    assert rows["example_id"].is_unique


def kill_when(proc_alive, kill, out, target: int, delay: float) -> bool:
    """Wait until ``target`` shards exist (or the run ends), wait ``delay`` more, SIGKILL; True if killed."""
    deadline = time.monotonic() + 120
    while n_shards(out) < target and proc_alive() and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(delay)
    if not proc_alive():
        return False
    kill()
    return True


def test_sigkill_at_random_points_then_resume(llava_model, llava_dir, tmp_path):
    seed = int(os.environ.get("VLENS_KILL_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    out = tmp_path / "killed"
    units = -(-N_SCENES // BATCH)
    data = load_scenes(N_SCENES, seed=5)
    analyses = ANALYSES.split(",")
    kills = 0

    # 1. The command itself in a fresh interpreter, killed at a random point.
    proc = subprocess.Popen(command(llava_dir, out), env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    kills += kill_when(lambda: proc.poll() is None, lambda: os.kill(proc.pid, signal.SIGKILL), out,
                       rng.randint(1, units // 2), rng.uniform(0.0, 0.03))
    proc.wait()
    err = proc.stderr.read().decode()[-2000:]
    proc.stderr.close()
    assert proc.returncode in (0, -signal.SIGKILL), err
    assert_consistent(out)

    # 2. Forked copies of this process (model already loaded, so each starts at once), killed
    #    at further random points: after some number of shards plus a random part of a batch.
    for _ in range(3):
        done = n_shards(out)
        if done >= units:
            break
        pid = os.fork()
        if pid == 0:  # the child: run the sweep, never return into pytest
            code = 1
            try:
                torch.set_num_threads(1)  # no OpenMP pool in a forked child
                sweep.run(llava_model, data, out, analyses, batch_size=BATCH, progress=False, summarize=False)
                code = 0
            finally:
                os._exit(code)
        status: dict[str, int] = {}

        def alive() -> bool:
            if "code" not in status:
                waited, code = os.waitpid(pid, os.WNOHANG)
                if waited:
                    status["code"] = code
            return "code" not in status

        # Each run writes at least one shard, and a few batches are left when the kill comes.
        target = rng.randint(done + 1, max(done + 1, units - 3))
        kills += kill_when(alive, lambda: os.kill(pid, signal.SIGKILL), out, target, rng.uniform(0.0, 0.03))
        if "code" not in status:
            status["code"] = os.waitpid(pid, 0)[1]
        assert status["code"] == 0 or os.WTERMSIG(status["code"]) == signal.SIGKILL, status
        assert_consistent(out)
    assert kills >= 2, f"the runs kept finishing before the kill (seed {seed})"

    # 3. Resume to the end, and compare with an uninterrupted run.
    sweep.run(llava_model, data, out, analyses, batch_size=BATCH, progress=False, summarize=False)
    clean = tmp_path / "clean"
    sweep.run(llava_model, data, clean, analyses, batch_size=BATCH, progress=False, summarize=False)
    got, want = sweep.load_results(out), sweep.load_results(clean)
    assert list(got["example_id"]) == list(want["example_id"]) == list(data.ids), f"seed {seed}"
    for col in want.columns:
        if "." in col:
            np.testing.assert_array_equal(np.stack(got[col]), np.stack(want[col]), err_msg=f"{col}, seed {seed}")
    assert not list(out.rglob(".tmp-*"))
