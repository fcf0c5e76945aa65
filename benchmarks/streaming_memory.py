"""Extra peak memory of the streaming curves against run_with_cache with everything.

On the medium random LLaVA at 336 px (576 image tokens, ~40 question and answer
tokens), each mode runs in a fresh process: load the model, run two plain forwards
(which set the process's peak resident memory for a forward), then run the mode once
and report how far it raised the peak (``ru_maxrss``):

* ``forward``: a third plain forward (the control: ~0);
* ``cache_everything``: ``run_with_cache`` with every hook, the cache kept;
* ``streaming``: one forward with ``SimilarityStream`` (text states) and
  ``AttentionStream`` (instruction queries) attached, their per-layer sums kept;
* ``report_forward``: the report's forward pass (``vlens.viz.report.activation_analyses``:
  the lens, similarity and attention streams, plus a cache of the attention patterns its
  CircuitsVis view draws), its results kept;
* ``report``: the whole ``build_report`` (that forward, then the token-count curve and the
  drop contributions on their kv engine), the report kept.

The children run with ``MALLOC_MMAP_THRESHOLD_=65536`` and ``MALLOC_ARENA_MAX=1``: glibc
then serves every tensor above 64 KiB with its own mapping and unmaps it when freed, so
resident memory follows live tensors. With its default per-thread arenas, freed blocks
stay resident and the same forward's peak varies by tens of MiB from run to run.

Usage: python -m benchmarks.streaming_memory [--threads 2] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

MODES = ("forward", "cache_everything", "streaming", "report_forward", "report")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(mode: str, folder: Path, threads: int) -> None:
    torch.set_num_threads(threads)
    from benchmarks._models import ANSWER, QUESTION, bench_image
    from vlens import HookedVLM
    from vlens import analysis as va

    model = HookedVLM.from_pretrained(folder, device="cpu")
    inputs = model.prepare(bench_image(), QUESTION, answer=ANSWER)
    extra: dict = {}
    with torch.inference_mode():
        model(inputs)
        model(inputs)
        before = peak_mb()
        if mode == "forward":
            kept = model(inputs)
        elif mode == "cache_everything":
            kept = model.run_with_cache(inputs)
            extra["cache_mb"] = kept[1].nbytes() / 2**20
        elif mode == "report_forward":
            from vlens.viz.report import activation_analyses, pattern_layers_for

            kept = activation_analyses(model, inputs, None, pattern_layers_for(model, None))
        elif mode == "report":
            from vlens.viz.report import build_report

            kept = build_report(model, inputs)
        else:
            similarity = va.SimilarityStream(model, against="text_states")
            attention = va.AttentionStream(model, query="instruction")
            with model.hooks(similarity.hooks(inputs) + attention.hooks(inputs)):
                kept = model(inputs)
            similarity.commit()
            attention.commit()
            kept = (kept, similarity.result(), attention.result())
        after = peak_mb()
    print(json.dumps({"before": before, "after": after, "tokens": int(inputs.input_ids.shape[1]), **extra}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse/keep the random checkpoint here")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model_dir, args.threads)
        return

    from benchmarks._models import build_medium_llava

    folder = args.model_dir or Path(tempfile.mkdtemp()) / "medium_llava"
    build_medium_llava(folder, image_size=args.image_size)
    extra = {}
    for mode in MODES:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.streaming_memory", "--child", mode, "--model-dir", str(folder),
             "--threads", str(args.threads)],
            capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent,
            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"},
        )
        report = json.loads(out.stdout.strip().splitlines()[-1])
        extra[mode] = report["after"] - report["before"]
        note = f" (cache holds {report['cache_mb']:.0f} MiB)" if "cache_mb" in report else ""
        print(f"{mode:17s} peak {report['before']:8.0f} -> {report['after']:8.0f} MiB: +{extra[mode]:7.1f} MiB{note}")
    base = max(extra["cache_everything"], 1e-9)
    print(f"streaming extra / cache-everything extra = {extra['streaming'] / base:.4f} (target <= 1/20 = 0.05); "
          f"{report['tokens']} tokens")
    print(f"report forward extra / cache-everything extra = {extra['report_forward'] / base:.4f} (target <= 1/10)")
    print(f"whole report extra / cache-everything extra = {extra['report'] / base:.4f}")


if __name__ == "__main__":
    main()
