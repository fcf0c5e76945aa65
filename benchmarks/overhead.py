"""Forward and caching overhead of HookedVLM against the plain Hugging Face model.

Runs, interleaved, after warm-up, on the medium random LLaVA (224 px: 256 image tokens
plus ~30 text tokens): the Hugging Face eager forward (baseline), HookedVLM's forward
with no hooks, run_with_cache with only ``blocks.*.hook_resid_post``, and run_with_cache
with everything. Prints the median time of each and its ratio to the baseline, and
the full cache's size with each storage counted once against the sum of its entries.

Usage: python -m benchmarks.overhead [--runs 15] [--threads 2] [--image-size 224]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks._models import add_model_arguments, load_medium_llava


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    add_model_arguments(parser, image_size=224)
    args = parser.parse_args()

    folder, model, inputs = load_medium_llava(args, with_answer=False)
    baseline = type(model.hf_model).from_pretrained(folder, attn_implementation="eager").eval()
    kwargs = inputs.model_kwargs()
    print(f"sequence: {inputs.input_ids.shape[1]} tokens, {int(inputs.layout.image_mask.sum())} image tokens")

    modes = {
        "hf_eager_forward": lambda: baseline(**kwargs).logits,
        "vlens_forward": lambda: model(inputs),
        "cache_resid_post": lambda: model.run_with_cache(inputs, names_filter="blocks.*.hook_resid_post"),
        "cache_everything": lambda: model.run_with_cache(inputs),
    }
    times: dict[str, list[float]] = {name: [] for name in modes}
    cpu: dict[str, list[float]] = {name: [] for name in modes}
    with torch.inference_mode():
        for fn in modes.values():  # warm-up
            fn()
            fn()
        for _ in range(args.runs):
            for name, fn in modes.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                out = fn()
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
                del out
        logits, cache = model.run_with_cache(inputs)
        same = torch.equal(logits, baseline(**kwargs).logits)

    # Wall time is what the targets are about; CPU time (all threads of this process) is
    # printed beside it because it is far less disturbed by other work on a shared machine.
    base = statistics.median(times["hf_eager_forward"])
    base_cpu = statistics.median(cpu["hf_eager_forward"])
    print(f"{'mode':<20}{'wall ms':>10}{'ratio':>8}{'cpu ms':>10}{'ratio':>8}")
    for name in modes:
        wall, used = statistics.median(times[name]), statistics.median(cpu[name])
        print(f"{name:<20}{wall * 1e3:>10.1f}{wall / base:>8.3f}{used * 1e3:>10.1f}{used / base_cpu:>8.3f}")
    print(f"full cache: {len(cache.cache_dict)} entries, {cache.nbytes() / 2**20:.1f} MiB unique storage, "
          f"{sum(t.nbytes for t in cache.cache_dict.values()) / 2**20:.1f} MiB summed over entries, "
          f"{len(cache.aliases)} alias names resolve to stored entries")
    print(f"logits identical to HF: {same}")


if __name__ == "__main__":
    main()
