"""The sweep command under ``accelerate launch`` with 2 CPU processes writes exactly the rows
of a one-process run (the tiny random LLaVA, a small synthetic data set)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np

from vlens import sweep
from vlens.data import load_scenes

N_SCENES, BATCH = 9, 2
ANALYSES = ["modality_similarity", "attention_to_image", "logit_lens", "token_count_curve"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(llava_model, llava_dir, tmp_path):
    out = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # On a machine without GPUs, --multi_gpu is what makes accelerate start N processes (torchrun);
    # vlens.sweep then asks accelerate for CPU processes (gloo).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           "-m", "vlens.cli", "sweep", "--model", str(llava_dir), "--data-format", "scenes", "--data", str(N_SCENES),
           "--seed", "11", "--out", str(out), "--analyses", ",".join(ANALYSES), "--batch-size", str(BATCH),
           "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = sorted(p.name for p in (out / "shards").glob("*.parquet"))
    assert len(shards) == -(-N_SCENES // BATCH)
    assert {s.split("-")[2] for s in shards} == {"r000", "r001"}  # both processes wrote their own shards
    assert json.loads((out / "provenance.json").read_text())["num_processes"] == 2
    assert (out / "summary.csv").is_file()  # the main process summarized once everyone was done

    data = load_scenes(N_SCENES, seed=11)
    one = tmp_path / "one"
    sweep.run(llava_model, data, one, ANALYSES, batch_size=BATCH, progress=False, summarize=False)
    got, want = sweep.load_results(out), sweep.load_results(one)
    assert list(got["example_id"]) == list(want["example_id"]) == list(data.ids)
    assert list(got.columns) == list(want.columns)
    for col in want.columns:
        if "." in col or col in ("n_image_tokens", "seq_len", "answer_loss"):
            np.testing.assert_array_equal(np.stack(got[col]), np.stack(want[col]), err_msg=col)
