"""token_count_curve: key/value prefix reuse against one forward per count.

On the medium random LLaVA at 336 px (576 image tokens after a LLaVA-1.5-style system
prompt, ~40 question and answer tokens after them), times
``token_count_curve(counts=0..576 step 8, order="raster")`` with ``engine="kv"`` and
``engine="naive"`` (one full language-model forward per count; both compute only the
logits the loss reads) and the plain Hugging Face baseline (a second, untouched copy of
the checkpoint, one ``model(inputs_embeds=...)`` forward per count with the logits of
every position, as a hand-written loop gets them) side by side in one process, after a
warm-up, and prints the ratios and the largest loss differences.

It also prints the ratio of the two methods' matrix-multiply FLOPs (decoder layers,
attention as eager attention computes it, and the unembedding rows the loss reads),
counted from the model's config and the sequence lengths. That ratio is the ceiling
of any engine that reuses the prefix: each count still runs its own ~40 suffix tokens
and 21 answer rows of the 32,000-word unembedding, and naive computes no more logits
than that either.

Usage: python -m benchmarks.token_count [--threads 2] [--step 8] [--repeats 2] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from benchmarks._models import add_model_arguments, load_medium_llava, load_plain_hf, plain_hf_answer_loss


def matmul_flops(text_config, n_img: int, n_before: int, n_after: int, n_answer: int, counts: list[int]) -> tuple[float, float]:
    """(naive, kv) multiply-add FLOPs of ``token_count_curve`` for raster-order ``counts``.

    naive: one forward of n_before + k + n_after tokens per count. kv: one forward of the
    full sequence, then per count below ``n_img`` the n_after suffix tokens attending to
    n_before + k cached positions and themselves (chunk padding ignored: a lower bound).
    Both compute the unembedding for the ``n_answer`` predicting rows only.
    """
    d, layers = text_config.hidden_size, text_config.num_hidden_layers
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or d // heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    linear = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2 + 3 * d * text_config.intermediate_size
    unembed = n_answer * d * text_config.vocab_size

    def forward(queries: int, keys: int) -> float:
        return 2.0 * (layers * (queries * linear + 2 * queries * keys * heads * head_dim) + unembed)

    full = n_before + n_img + n_after
    naive = sum(forward(n_before + k + n_after, n_before + k + n_after) for k in counts)
    kv = forward(full, full) + sum(forward(n_after, n_before + k + n_after) for k in counts if k < n_img)
    return naive, kv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each method (best is reported)")
    parser.add_argument("--batch-size", type=int, default=32)
    add_model_arguments(parser, image_size=336)
    args = parser.parse_args()

    from vlens import analysis as va
    from vlens.analysis.knockout import row_problems

    folder, model, inputs = load_medium_llava(args)
    baseline = load_plain_hf(folder)
    (problem,) = row_problems(model, inputs, "benchmark")
    targets = problem.ids[problem.answer]
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

    n_before = int(layout.prefix_mask.sum())
    n_after = inputs.input_ids.shape[1] - n_before - n_img
    naive_flops, kv_flops = matmul_flops(
        model.hf_model.config.get_text_config(), n_img, n_before, n_after, int(layout.answer_mask.sum()), counts
    )
    print(
        f"matmul FLOPs: naive {naive_flops / 1e9:.0f} G, kv {kv_flops / 1e9:.0f} G: "
        f"ceiling of any prefix-reuse engine {naive_flops / kv_flops:.2f}x"
    )

    def keep_first(k: int) -> torch.Tensor:
        keep = torch.ones(problem.ids.shape[0], dtype=torch.bool)
        keep[problem.image[k:]] = False
        return keep

    def run(method: str):
        start, cpu = time.perf_counter(), time.process_time()
        if method == "hf_loop":
            loss = torch.stack([plain_hf_answer_loss(baseline, problem.embeds, keep_first(k), problem.answer, targets)
                                for k in counts])
            result = SimpleNamespace(loss=loss)
        else:
            result = va.token_count_curve(model, inputs, counts=counts, engine=method, batch_size=args.batch_size)
        return time.perf_counter() - start, time.process_time() - cpu, result

    with torch.inference_mode():
        va.token_count_curve(model, inputs, counts=[0, n_img // 2, n_img], engine="kv")  # warm-up
        va.token_count_curve(model, inputs, counts=[0, n_img // 2, n_img], engine="naive")
        plain_hf_answer_loss(baseline, problem.embeds, keep_first(n_img // 2), problem.answer, targets)
        methods = ("kv", "naive", "hf_loop")
        times: dict[str, list[float]] = {m: [] for m in methods}
        cpus: dict[str, list[float]] = {m: [] for m in methods}
        results = {}
        for _ in range(args.repeats):
            for method in methods:
                seconds, cpu, results[method] = run(method)
                times[method].append(seconds)
                cpus[method].append(cpu)
                print(f"  {method:5s} {seconds:7.2f} s wall, {cpu:7.2f} s cpu")
    kv, naive, hf = min(times["kv"]), min(times["naive"]), min(times["hf_loop"])
    diff = float((results["kv"].loss - results["naive"].loss).abs().max())
    diff_hf = float((results["kv"].loss - results["hf_loop"].loss.to(results["kv"].loss.dtype)).abs().max())
    # A kv run that fell back to the naive engine would time the wrong thing: say which ran.
    ran = results["kv"]
    print(f"engine that ran for engine='kv': {ran.engine}" + (f" ({ran.engine_reason})" if ran.engine_reason else ""))
    if ran.engine != "kv":
        raise SystemExit("the kv engine did not run; its timing is not a measurement of it")
    print(f"kv       best {kv:7.2f} s")
    print(f"naive    best {naive:7.2f} s")
    print(f"hf_loop  best {hf:7.2f} s")
    print(f"speed-up hf_loop/kv: {hf / kv:.2f}x wall, {min(cpus['hf_loop']) / min(cpus['kv']):.2f}x cpu time "
          f"(target >= 6x); max |loss_kv - loss_hf| = {diff_hf:.2e} (<= 1e-4)")
    print(f"speed-up naive/kv: {naive / kv:.2f}x wall, {min(cpus['naive']) / min(cpus['kv']):.2f}x cpu time "
          f"(FLOP ceiling {naive_flops / kv_flops:.2f}x); max |loss_kv - loss_naive| = {diff:.2e} (<= 1e-4)")
    loss = results["kv"].loss[0]  # the one row
    print(f"loss at 0, {n_img // 2}, {n_img} tokens: {loss[0]:.4f}, {loss[len(counts) // 2]:.4f}, {loss[-1]:.4f}")


if __name__ == "__main__":
    main()
