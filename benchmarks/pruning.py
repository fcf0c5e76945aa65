"""Visual-token pruning (FastV) and the contextual lens on the medium LLaVA.

Pruning: on the medium random LLaVA at 336 px (576 image tokens after a LLaVA-1.5-style system
prompt, ~40 question and answer tokens after them), times one language-model forward of the
benchmark row (logits only at the answer rows) three ways, side by side after a warm-up:
the plain Hugging Face baseline (a second, untouched copy of the checkpoint), vlens's unpruned
forward (``run_language_model`` through the bridge), and vlens's pruned forward at K = 2,
keep 50% (blocks >= 2 on the kept tokens, ``vlens.analysis._shorten``). Prints the time
ratio pruned / unpruned beside the FLOPs ratio ``prune_visual_tokens`` reports, and the time
of one whole ``prune_visual_tokens`` call over a small grid.

Contextual lens: the time and the extra peak memory per bank chunk of ``chunk_size`` contexts
(random sentences of 20 words of the benchmark vocabulary), for banks of 32 and 128 contexts,
each in a fresh process (``ru_maxrss``, glibc told to unmap freed tensors, as
benchmarks/streaming_memory.py does): the peak must not grow with the bank.

Usage: python -m benchmarks.pruning [--threads 2] [--repeats 3] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks._models import add_model_arguments, load_medium_llava, load_plain_hf, medium_llava_folder

BANKS = (32, 128)
CHUNK = 16


def best_of(fns: dict, repeats: int) -> dict[str, float]:
    """The best wall time of each function over ``repeats`` rounds, the functions interleaved
    within a round so that a shared machine's load drifts over all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def pruning(args) -> None:
    """Pruned against unpruned forward time, beside the FLOPs ratio (module doc)."""
    from vlens import analysis as va
    from vlens.analysis._shorten import shortened_after
    from vlens.analysis.knockout import row_problems
    from vlens.analysis.pruning import kept_count

    folder, model, inputs = load_medium_llava(args)
    baseline = load_plain_hf(folder)
    (problem,) = row_problems(model, inputs, "benchmark")
    n = problem.ids.shape[0]
    n_img = problem.image.numel()
    at = problem.answer - 1
    ones = torch.ones(1, n, dtype=torch.long)
    keep = torch.ones(n, dtype=torch.bool)
    drop = problem.image[torch.randperm(n_img, generator=torch.Generator().manual_seed(0))[kept_count(0.5, n_img):]]
    keep[drop] = False
    index = keep.nonzero().flatten()[None]
    shortened_at = problem.answer - (n_img - kept_count(0.5, n_img)) - 1

    def hf() -> None:
        baseline(inputs_embeds=problem.embeds[None], attention_mask=ones, logits_to_keep=at)

    def unpruned() -> None:
        model.run_language_model(problem.embeds[None], problem.positions[None], attention_mask=ones, logits_to_keep=at)

    def pruned() -> None:
        with shortened_after(list(model.bridge.blocks), 2, index, n):
            model.run_language_model(problem.embeds[None], problem.positions[None], attention_mask=ones,
                                     logits_to_keep=shortened_at)

    with torch.inference_mode():
        for fn in (hf, unpruned, pruned):
            fn()  # warm-up
        times = best_of({"hf": hf, "unpruned": unpruned, "pruned": pruned}, args.repeats)
        result = va.prune_visual_tokens(model, inputs, layers=[2], keep=[0.5], rankings=["random"])
        start = time.perf_counter()
        grid = va.prune_visual_tokens(model, inputs, layers=[1, 2, 4], keep=[0.25, 0.5, 0.75], rankings=["attention", "random"])
        grid_s = time.perf_counter() - start
    flops = float(result.flops_ratio[0, 0, 0])
    print(f"sequence {n} tokens ({n_img} image); K = 2, keep 50%: {n - (n_img - kept_count(0.5, n_img))} tokens "
          f"in blocks 2..{model.n_layers - 1}; {args.threads} threads, best of {args.repeats}")
    print(f"  plain HF forward       {times['hf'] * 1e3:8.1f} ms")
    print(f"  vlens unpruned forward {times['unpruned'] * 1e3:8.1f} ms ({times['unpruned'] / times['hf']:.2f}x HF)")
    print(f"  vlens pruned forward   {times['pruned'] * 1e3:8.1f} ms ({times['pruned'] / times['hf']:.2f}x HF)")
    print(f"time ratio pruned/unpruned {times['pruned'] / times['unpruned']:.3f}; FLOPs ratio (blocks) {flops:.3f}")
    print(f"prune_visual_tokens over 3 K x 3 keep x 2 rankings (one unpruned forward + 9 batches of 2): "
          f"{grid_s:.2f} s; loss at K=2, keep 50%: attention {float(grid.loss[0, 0, 1, 1]):.4f}, "
          f"random {float(grid.loss[0, 1, 1, 1]):.4f}, unpruned {float(grid.full_loss[0]):.4f}")


def peak_mb() -> float:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bank_child(args) -> None:
    """One contextual-lens run over a bank of ``args.bank`` contexts; prints its time and peak memory."""
    from benchmarks._models import _tokenizer
    from vlens import analysis as va

    folder, model, inputs = load_medium_llava(args, with_answer=False)
    words = [w for w in _tokenizer().get_vocab() if w.isalpha() and len(w) > 1][:5000]
    rng = torch.Generator().manual_seed(0)
    bank = [" ".join(words[int(i)] for i in torch.randint(len(words), (20,), generator=rng)) for _ in range(args.bank)]
    with torch.inference_mode():
        _, cache = model.run_with_cache(inputs, names_filter=va.contextual.required_hooks(model))
        va.contextual_lens(model, cache, bank[:CHUNK], k=5, chunk_size=CHUNK)  # warm-up: one chunk
        before = peak_mb()
        start = time.perf_counter()
        result = va.contextual_lens(model, cache, bank, k=5, chunk_size=CHUNK)
        seconds = time.perf_counter() - start
        after = peak_mb()
    n_query = int(result.positions.shape[1])
    layers = model.n_layers + 1
    d = int(model.cfg.d_model)
    tokens = result.n_bank_tokens / len(bank) * CHUNK
    held = 4 * (layers * n_query * d + n_query * tokens + 4 * layers * n_query * 5) / 2**20
    print(json.dumps({"before": before, "after": after, "seconds": seconds, "chunks": -(-len(bank) // CHUNK),
                      "bank_tokens": result.n_bank_tokens, "held_mb": held, "n_query": n_query}))


def contextual(args) -> None:
    """Time and extra peak memory per bank chunk, each bank size in a fresh process."""
    folder = medium_llava_folder(args)
    print(f"contextual lens: {CHUNK} contexts per chunk, every image token of the row as a query, every layer, k = 5")
    for bank in BANKS:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.pruning", "--bank-child", str(bank), "--model-dir", str(folder),
             "--threads", str(args.threads), "--image-size", str(args.image_size)],
            capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent,
            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"},
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {r['n_query']} queries; bank {bank:4d} contexts ({r['bank_tokens']} token states, {r['chunks']} chunks): "
              f"{r['seconds']:.2f} s, {r['seconds'] / r['chunks'] * 1e3:.0f} ms per chunk; peak "
              f"{r['before']:.0f} -> {r['after']:.0f} MiB (+{r['after'] - r['before']:.1f} MiB after a one-chunk "
              f"warm-up); bound on what the lens holds: {r['held_mb']:.1f} MiB")


def main() -> None:
    """Both benchmarks, the checkpoint built once."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bank-child", dest="bank", type=int, default=None, help=argparse.SUPPRESS)
    add_model_arguments(parser, image_size=336)
    args = parser.parse_args()
    if args.bank is not None:
        bank_child(args)
        return
    if args.model_dir is None:
        import tempfile

        args.model_dir = Path(tempfile.mkdtemp()) / "medium_llava"
    pruning(args)
    contextual(args)


if __name__ == "__main__":
    main()
