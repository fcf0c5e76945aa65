"""Sweep throughput and peak memory, one process against N under ``accelerate launch``.

Runs ``vlens.sweep.run`` over synthetic scenes with the default streaming analyses on the
toy model (``HookedVLM.from_pretrained("toy")``); when the trained checkpoint is not
installed, on the toy's architecture and processor with random weights (same shapes, so the
same speed and memory), else on the tiny random LLaVA of the tests (the output says which). Each run starts fresh
processes (1 with plain ``python``, N with ``accelerate launch --multi_gpu``, which on a
CPU-only machine starts N CPU processes), each with ``--threads`` torch threads. Reports,
per process count: examples per second over the sweep loop (all examples divided by the
slowest process's loop time, so model loading and imports are left out), the wall time
of the whole command, the peak resident memory of each process (``ru_maxrss``: imports,
weights and activations) and the sweep's own memory estimate.

Usage: python -m benchmarks.sweep [--n 96] [--batch-size 8] [--processes 1,2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def resolve_model(name: str, scratch: Path) -> tuple[str, str]:
    """The checkpoint to use and a description of it."""
    if name != "toy":
        return name, name
    try:
        from vlens.zoo import toy_checkpoint_path

        return str(toy_checkpoint_path()), "toy (vlens/zoo/toy, trained)"
    except (FileNotFoundError, ImportError):
        pass
    try:  # the toy's architecture and processor with random weights: same shapes, same speed
        import torch

        from vlens.zoo.config import Architecture, build_model
        from vlens.zoo.processor import build_processor

        torch.manual_seed(0)
        arch = Architecture()
        processor = build_processor(arch.image_size, arch.patch_size)
        path = scratch / "toy_random"
        build_model(arch, processor).save_pretrained(path)
        processor.save_pretrained(path)
        return str(path), f"toy architecture with random weights ({arch}; the trained checkpoint is not installed)"
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.tiny.llava import build_llava

        path = build_llava(scratch / "tiny_llava")
        return str(path), "tiny random LLaVA (tests/tiny/llava.py; no toy checkpoint or toy builder)"


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from vlens import HookedVLM, sweep
    from vlens.data import load_scenes

    start = time.perf_counter()
    model = HookedVLM.from_pretrained(args.model, device="cpu")
    load_seconds = time.perf_counter() - start
    data = load_scenes(args.n, seed=1)
    report = sweep.run(model, data, args.out, args.analyses.split(","), batch_size=args.batch_size,
                       progress=False, summarize=False)
    rank = int(os.environ.get("RANK", "0"))
    stats = {
        "rank": rank,
        "processed": report.processed,
        "loop_seconds": report.seconds,
        "load_seconds": load_seconds,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "estimate": None if report.estimate is None else report.estimate.total,
    }
    Path(args.stats).mkdir(parents=True, exist_ok=True)
    (Path(args.stats) / f"rank{rank}.json").write_text(json.dumps(stats))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(model: str, n_proc: int, args: argparse.Namespace, scratch: Path) -> dict:
    out, stats = scratch / f"out{n_proc}", scratch / f"stats{n_proc}"
    inner = ["-m", "benchmarks.sweep", "--worker", "--model", model, "--out", str(out), "--stats", str(stats),
             "--n", str(args.n), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
             "--analyses", args.analyses]
    if n_proc == 1:
        cmd = [sys.executable, *inner]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n_proc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), *inner]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{n_proc}-process run failed:\n{proc.stderr[-3000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(stats.glob("rank*.json"))]
    loop = max(r["loop_seconds"] for r in ranks)
    return {
        "processes": n_proc,
        "examples": sum(r["processed"] for r in ranks),
        "examples_per_s": sum(r["processed"] for r in ranks) / loop,
        "loop_s": loop,
        "wall_s": wall,
        "peak_rss_per_process_mib": max(r["peak_rss"] for r in ranks) / 2**20,
        "peak_rss_total_mib": sum(r["peak_rss"] for r in ranks) / 2**20,
        "estimate_mib": max((r["estimate"] or 0) for r in ranks) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy")
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--analyses", default="modality_similarity,attention_to_image,logit_lens")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--stats", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        model, described = resolve_model(args.model, scratch)
        print(f"model: {described}")
        print(f"data: {args.n} synthetic scenes, batch {args.batch_size}, analyses {args.analyses}, "
              f"{args.threads} torch thread(s) per process, {os.cpu_count()} CPUs")
        rows = [measure(model, int(p), args, scratch) for p in args.processes.split(",")]
    head = f"{'procs':>5} {'ex/s':>8} {'loop s':>7} {'wall s':>7} {'peak RSS/proc':>14} {'RSS total':>10} {'estimate':>9}"
    print(head)
    for r in rows:
        print(f"{r['processes']:>5} {r['examples_per_s']:>8.1f} {r['loop_s']:>7.2f} {r['wall_s']:>7.1f} "
              f"{r['peak_rss_per_process_mib']:>10.0f} MiB {r['peak_rss_total_mib']:>6.0f} MiB "
              f"{r['estimate_mib']:>5.1f} MiB")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
