"""token_count_curve: key/value prefix reuse against one forward per count.

On the medium random LLaVA at 336 px (576 image tokens after a LLaVA-1.5-style system
prompt, ~40 question and answer tokens after them), times
``token_count_curve(counts=0..576 step 8, order="raster")`` with ``method="kv"`` and
``method="naive"`` (one full language-model forward per count; both compute only the
logits the loss reads) side by side in one process, after a warm-up, and prints the
ratio and the largest loss difference.

Usage: python -m benchmarks.token_count [--threads 2] [--step 8] [--repeats 2] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks._models import add_model_arguments, load_medium_llava


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each method (best is reported)")
    parser.add_argument("--batch-size", type=int, default=32)
    add_model_arguments(parser, image_size=336)
    args = parser.parse_args()

    from vlens import analysis as va

    _, model, inputs = load_medium_llava(args)
    layout = inputs.layout
    n_img = int(layout.image_mask.sum())
    counts = list(range(0, n_img + 1, args.step))
    if counts[-1] != n_img:
        counts.append(n_img)
    print(
        f"sequence: {inputs.input_ids.shape[1]} tokens = {int(layout.prefix_mask.sum())} prefix + {n_img} image + "
        f"{int(layout.instruction_mask.sum())} instruction + {int(layout.answer_mask.sum())} answer; "
        f"{len(counts)} counts, {args.threads} threads"
    )

    def run(method: str):
        start, cpu = time.perf_counter(), time.process_time()
        result = va.token_count_curve(model, inputs, counts=counts, method=method, batch_size=args.batch_size)
        return time.perf_counter() - start, time.process_time() - cpu, result

    with torch.inference_mode():
        va.token_count_curve(model, inputs, counts=[0, n_img // 2, n_img], method="kv")  # warm-up
        va.token_count_curve(model, inputs, counts=[0, n_img // 2, n_img], method="naive")
        times: dict[str, list[float]] = {"kv": [], "naive": []}
        cpus: dict[str, list[float]] = {"kv": [], "naive": []}
        results = {}
        for _ in range(args.repeats):
            for method in ("kv", "naive"):
                seconds, cpu, results[method] = run(method)
                times[method].append(seconds)
                cpus[method].append(cpu)
                print(f"  {method:5s} {seconds:7.2f} s wall, {cpu:7.2f} s cpu")
    kv, naive = min(times["kv"]), min(times["naive"])
    diff = float((results["kv"].loss - results["naive"].loss).abs().max())
    print(f"kv     best {kv:7.2f} s")
    print(f"naive  best {naive:7.2f} s")
    print(f"speed-up naive/kv: {naive / kv:.2f}x wall, {min(cpus['naive']) / min(cpus['kv']):.2f}x cpu time "
          f"(target >= 6x); max |loss_kv - loss_naive| = {diff:.2e} (<= 1e-4)")
    print(f"loss at 0, {n_img // 2}, {n_img} tokens: "
          f"{results['kv'].loss[0]:.4f}, {results['kv'].loss[len(counts) // 2]:.4f}, {results['kv'].loss[-1]:.4f}")


if __name__ == "__main__":
    main()
