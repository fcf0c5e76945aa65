"""Activation patching, attribution patching and the knockout window sweep against plain loops.

On the medium random LLaVA at 336 px (576 image tokens, the LLaVA-1.5 layout), side by side
in one process:

* ``activation_patching`` of ``resid_pre`` over every layer and image positions, batched with the
  layers below each patch and the corrupted prefix shared. By default all 576 positions; with
  ``--runs R`` only R runs of ``--batch-size`` consecutive image positions spread evenly over the
  image (each chunk of variants is then as contiguous as in the full run, so its per-pair time is
  representative), scaled to every pair; against a plain Hugging Face loop, one forward of an untouched copy of the checkpoint
  per (layer, position) with a forward pre-hook writing the clean residual into the decoder
  layer's input, logits at every position as a hand-written loop gets them. The loop is timed on
  ``--naive-pairs`` (layer, position) pairs spread over the grid and its per-pair time scaled to
  every pair (said in the output); its values at those pairs are compared with vlens's (<= 1e-4).
* ``attribution_patching`` (three kinds, every layer and image position) in forward-equivalents:
  its time over one plain forward of the whole model.
* ``attention_knockout`` predictor -> image over every window of sizes 1 and 2 against a loop of
  plain forwards, one per window, with the blocked entries of the eager mask set by pre-hooks.

Usage: python -m benchmarks.patching [--threads 2] [--runs 0] [--batch-size 32] [--naive-pairs 12] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks._models import add_model_arguments, bench_image, load_medium_llava, load_plain_hf


def _plain_patched_logits(baseline, corrupted_kwargs, layer, pos, value, predictor):
    layers = baseline.model.language_model.layers

    def write(_m, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        h[0, pos] = value
        if args:
            return (h, *args[1:]), kwargs
        kwargs["hidden_states"] = h
        return args, kwargs

    handle = layers[layer].register_forward_pre_hook(write, with_kwargs=True)
    try:
        logits = baseline(**corrupted_kwargs).logits  # every position, as a plain loop gets them
    finally:
        handle.remove()
    return logits[0, predictor].float()


def _plain_resid(baseline, kwargs, n_layers):
    store = {}
    layers = baseline.model.language_model.layers
    handles = []
    for l in range(n_layers):
        def grab(_m, args, kw, l=l):
            store[l] = (args[0] if args else kw["hidden_states"])[0].clone()
        handles.append(layers[l].register_forward_pre_hook(grab, with_kwargs=True))
    baseline(**kwargs)
    for h in handles:
        h.remove()
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=0, help="0: every image position; else runs of --batch-size positions")
    parser.add_argument("--naive-pairs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    add_model_arguments(parser, image_size=336)
    args = parser.parse_args()

    from benchmarks._models import ANSWER, QUESTION
    from vlens import analysis as va
    from vlens.analysis._spans import predictor_positions

    folder, model, clean = load_medium_llava(args)
    corrupted = model.prepare(bench_image(seed=1), QUESTION, answer=ANSWER)
    baseline = load_plain_hf(folder)
    n_layers = model.n_layers
    image = clean.layout.image_positions(0)
    n_img = image.numel()
    if args.runs > 0:
        run = min(args.batch_size, n_img)
        firsts = torch.linspace(0, n_img - run, args.runs).round().long().unique()
        positions = image[(firsts[:, None] + torch.arange(run)[None]).flatten().unique()]
    else:
        positions = image
    predictor = int(predictor_positions(clean.layout)[0])
    foil = 5
    print(f"sequence: {clean.input_ids.shape[1]} tokens, {n_img} image tokens, {n_layers} layers, {args.threads} threads")

    with torch.inference_mode():
        ck, rk = clean.model_kwargs(), corrupted.model_kwargs()
        baseline(**rk)  # warm-up
        forwards = []
        for _ in range(3):
            start = time.perf_counter()
            baseline(**rk)
            forwards.append(time.perf_counter() - start)
        forward = statistics.median(forwards)

        start = time.perf_counter()
        result = va.activation_patching(model, clean, corrupted, foil=foil, positions=positions, kinds=["resid_pre"],
                                        batch_size=args.batch_size)
        t_vlens = time.perf_counter() - start
        n_pairs = n_layers * positions.numel()
        per_pair_vlens = t_vlens / n_pairs

        clean_resid = _plain_resid(baseline, ck, n_layers)
        rng = torch.Generator().manual_seed(0)
        sample = [(int(torch.randint(n_layers, (1,), generator=rng)), int(torch.randint(positions.numel(), (1,), generator=rng)))
                  for _ in range(args.naive_pairs)]
        target = int(result.target[0])
        worst, times = 0.0, []
        for layer, i in sample:
            pos = int(positions[i])
            start = time.perf_counter()
            logits = _plain_patched_logits(baseline, rk, layer, pos, clean_resid[layer][pos], predictor)
            times.append(time.perf_counter() - start)
            worst = max(worst, abs(float(logits[target] - logits[foil]) - float(result.logit_diff[0, 0, layer, i])))
        per_pair_plain = statistics.median(times)
        effect = (result.logit_diff[0, 0] - result.corrupted_logit_diff[0]).abs()

    print(f"patching: vlens {t_vlens:.1f}s for {n_pairs} (layer, position) pairs ({per_pair_vlens * 1e3:.1f} ms each, "
          f"engine {result.engine})")
    print(f"  plain HF loop: {per_pair_plain * 1e3:.1f} ms per pair, timed on {len(sample)} pairs and scaled to "
          f"{n_layers} x {n_img} = {n_layers * n_img} pairs: {per_pair_plain * n_layers * n_img:.0f}s")
    print(f"  ratio (plain loop / vlens, per pair): {per_pair_plain / per_pair_vlens:.2f}x;  max |diff| at the sampled "
          f"pairs: {worst:.2e} (patch effects on the logit difference up to {float(effect.max()):.2e}, "
          f"median {float(effect.median()):.2e})")

    start = time.perf_counter()
    va.attribution_patching(model, clean, corrupted, foil=foil)
    t_attr = time.perf_counter() - start
    print(f"attribution patching (3 kinds x {n_layers} layers x {n_img} positions): {t_attr:.2f}s = "
          f"{t_attr / forward:.2f} plain forwards ({forward * 1e3:.0f} ms each)")

    with torch.inference_mode():
        start = time.perf_counter()
        knock = va.attention_knockout(model, clean, "predictor", "image", sizes=(1, 2))
        t_knock = time.perf_counter() - start
        n = int(clean.layout.lengths[0])
        block = torch.zeros(n, n, dtype=torch.bool)
        block[predictor, image] = True
        layers = baseline.model.language_model.layers
        times = []
        for s, w in zip(knock.window_start.tolist(), knock.window_size.tolist()):
            handles = []
            for l in range(s, s + w):
                def pre(_m, a, kw):
                    mask = kw["attention_mask"]
                    kw["attention_mask"] = mask.masked_fill(block[: mask.shape[-2], : mask.shape[-1]], torch.finfo(mask.dtype).min)
                    return a, kw
                handles.append(layers[l].self_attn.register_forward_pre_hook(pre, with_kwargs=True))
            start = time.perf_counter()
            baseline(**ck)
            times.append(time.perf_counter() - start)
            for h in handles:
                h.remove()
    print(f"knockout sweep ({len(times)} windows, engine {knock.engine}): vlens {t_knock:.2f}s, plain loop "
          f"{sum(times):.2f}s, ratio {sum(times) / t_knock:.2f}x")


if __name__ == "__main__":
    main()
