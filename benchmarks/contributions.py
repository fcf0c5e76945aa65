"""token_contributions: drop with a shared prefix against one forward per token, and the
cost of the gradient estimate in forwards.

On the medium random LLaVA at 336 px (576 image tokens), side by side in one process:

* ``estimator="drop"`` over all 576 image tokens (prefix before each dropped token
  shared, suffixes batched);
* the same losses with one full language-model forward per dropped token
  (``engine="naive"``). Every such forward has the same length, so by default it runs
  on ``--naive-tokens`` evenly spread tokens and the per-token time is scaled to 576
  (``--naive-tokens 0`` runs all of them);
* the plain Hugging Face baseline on the same tokens: a second, untouched copy of the
  checkpoint, one ``model(inputs_embeds=...)`` forward per dropped token with the logits
  of every position, as a hand-written loop gets them;
* ``estimator="gradient"`` against one plain forward of the whole model (vision included).

Usage: python -m benchmarks.contributions [--threads 2] [--naive-tokens 96] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks._models import add_model_arguments, load_medium_llava, load_plain_hf, plain_hf_answer_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--naive-tokens", type=int, default=96, help="0: time the naive loop over every token")
    parser.add_argument("--batch-size", type=int, default=32)
    add_model_arguments(parser, image_size=336)
    args = parser.parse_args()

    from vlens import analysis as va
    from vlens.analysis.knockout import row_problems, variant_losses

    folder, model, inputs = load_medium_llava(args)
    baseline = load_plain_hf(folder)
    n_img = int(inputs.layout.image_mask.sum())
    print(f"sequence: {inputs.input_ids.shape[1]} tokens, {n_img} image tokens, {args.threads} threads")

    with torch.inference_mode():
        model(inputs)  # warm-up
        forwards = []
        for _ in range(5):
            start = time.perf_counter()
            model(inputs)
            forwards.append(time.perf_counter() - start)
        forward = statistics.median(forwards)

        start, cpu = time.perf_counter(), time.process_time()
        drop_result = va.token_contributions(model, inputs, estimator="drop", batch_size=args.batch_size)
        t_drop, c_drop = time.perf_counter() - start, time.process_time() - cpu
        drop = drop_result.row(0)  # the one example

        (problem,) = row_problems(model, inputs, "benchmark")
        chosen = torch.arange(n_img) if args.naive_tokens <= 0 else torch.linspace(0, n_img - 1, args.naive_tokens).round().long()
        keeps = torch.ones(len(chosen), problem.ids.shape[0], dtype=torch.bool)
        keeps[torch.arange(len(chosen)), problem.image[chosen]] = False
        start, cpu = time.perf_counter(), time.process_time()
        naive_losses, _ = variant_losses(model, problem, keeps, engine="naive")
        t_naive_part, c_naive_part = time.perf_counter() - start, time.process_time() - cpu
        t_naive = t_naive_part * n_img / len(chosen)
        c_naive = c_naive_part * n_img / len(chosen)
        diff = float((naive_losses - float(drop.full_loss) - drop.delta_loss[chosen]).abs().max())

        targets = problem.ids[problem.answer]
        plain_hf_answer_loss(baseline, problem.embeds, keeps[0], problem.answer, targets)  # warm-up
        start, cpu = time.perf_counter(), time.process_time()
        hf_losses = torch.stack([plain_hf_answer_loss(baseline, problem.embeds, keep, problem.answer, targets) for keep in keeps])
        t_hf = (time.perf_counter() - start) * n_img / len(chosen)
        c_hf = (time.process_time() - cpu) * n_img / len(chosen)
        diff_hf = float((hf_losses - float(drop.full_loss) - drop.delta_loss[chosen]).abs().max())

    grads = []
    for _ in range(3):
        start = time.perf_counter()
        grad = va.token_contributions(model, inputs, estimator="gradient").row(0)
        grads.append(time.perf_counter() - start)
    t_grad = statistics.median(grads)

    print(f"engine that ran for the drop: {drop.engine}" + (f" ({drop.engine_reason})" if drop.engine_reason else ""))
    if drop.engine != "kv":
        raise SystemExit("the kv engine did not run; its timing is not a measurement of it")
    print(f"one forward of the whole model      {forward:7.3f} s (median of 5)")
    print(f"drop, shared prefix (576 tokens)    {t_drop:7.2f} s")
    print(f"drop, one forward per token         {t_naive:7.2f} s  ({len(chosen)} timed: {t_naive_part:.2f} s, scaled)")
    print(f"drop, plain Hugging Face loop       {t_hf:7.2f} s  (same tokens, scaled)")
    print(f"speed-up hf_loop/kv: {t_hf / t_drop:.2f}x wall, {c_hf / c_drop:.2f}x cpu time (target >= 1.7x); "
          f"max |delta_kv - delta_hf| = {diff_hf:.2e}")
    print(f"speed-up naive/kv: {t_naive / t_drop:.2f}x wall, {c_naive / c_drop:.2f}x cpu time; "
          f"max |delta_kv - delta_naive| = {diff:.2e}")
    print(f"gradient (forward + backward)       {t_grad:7.3f} s = {t_grad / forward:.2f} forwards (target <= 3)")
    a, b = drop.delta_loss.double(), grad.delta_loss.double()
    ra = (a[None] < a[:, None]).sum(1) + ((a[None] == a[:, None]).sum(1) + 1) / 2  # ties: average rank
    rb = (b[None] < b[:, None]).sum(1) + ((b[None] == b[:, None]).sum(1) + 1) / 2
    print(f"Spearman(drop, gradient) over {n_img} tokens: {float(torch.corrcoef(torch.stack([ra, rb]))[0, 1]):+.3f}")


if __name__ == "__main__":
    main()
