"""The recipe that trains the shipped toy VLM.

Usage::

    python -m vlens.zoo.train --out DIR [--seed 1] [--threads 1] [--scale full|tiny]

Runs the four bridge-style stages (see `vlens.zoo.stages`), saves model and processor with
``save_pretrained`` into ``DIR``, reloads them through ``from_pretrained`` and evaluates the
reloaded model on held-out scenes (greedy answers and per-layer measurements). A summary is
written to ``DIR/training_report.json``. The shipped checkpoint (`vlens.zoo.toy_checkpoint_path`)
is this command's output with the default seed and scale.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration
from transformers.utils import logging as hf_logging

from vlens.data.scenes import make_scenes
from vlens.zoo.config import RecipeConfig, Scale, build_model, recipe_config
from vlens.zoo.evaluate import evaluate_generation, layer_measurements, majority_answers
from vlens.zoo.examples import Encoder, ScenePool, build_pool, describe, questions_for_eval
from vlens.zoo.processor import build_processor
from vlens.zoo.stages import (
    multimodal_logits,
    train_multimodal,
    train_text,
    train_vision,
    vision_patch_accuracy,
    vision_states,
)

EVAL_STREAM_SEED = 10_000  # held-out scenes are the same for every training seed
# The shipped checkpoint's seed. Chosen after training seeds 0 and 1 with recipe v6: seed 1 meets
# every accuracy target on the held-out stream above and on a second, fresh one (stream 30,000);
# seed 0 misses colour questions (0.69). docs/toy_model.md reports both.
DEFAULT_SEED = 1
LENS_SCENES = 200


@torch.no_grad()
def teacher_forced_exact(
    model: LlavaForConditionalGeneration,
    encoder: Encoder,
    pool: ScenePool,
    states: torch.Tensor | None,
) -> dict[str, float]:
    """Per question kind, the fraction of answers whose every token is the argmax prediction.

    With ``states=None`` the scene is given as a text description (stage-b check); otherwise
    the image states are spliced in. For greedy decoding this equals exact-match accuracy.
    """
    model.eval()
    rng = np.random.default_rng(0)
    hits: dict[str, list[bool]] = {}
    items = [(i, qa) for i, s in enumerate(pool.scenes) for qa in questions_for_eval(s)]
    for lo in range(0, len(items), 64):
        chunk = items[lo : lo + 64]
        if states is None:
            enc = [encoder.encode(describe(pool.scenes[i], rng) + " " + qa.question, qa.answer,
                                  with_image=False) for i, qa in chunk]
        else:
            enc = [encoder.encode(qa.question, qa.answer, with_image=True) for _, qa in chunk]
        batch = encoder.collate(enc)
        if states is None:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        else:
            idx = torch.tensor([i for i, _ in chunk])
            logits = multimodal_logits(model, batch, states[idx], encoder.image_token_id)
        pred, gold = logits[:, :-1].argmax(-1), batch.labels[:, 1:]
        ok = ((pred == gold) | (gold == -100)).all(dim=-1)
        for (_, qa), good in zip(chunk, ok.tolist()):
            hits.setdefault(qa.kind, []).append(good)
    model.train()
    return {k: float(np.mean(v)) for k, v in hits.items()}


def _fmt(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in scores.items())


def run_recipe(
    out: Path, seed: int = DEFAULT_SEED, scale: Scale = "full", threads: int = 1,
    progress: bool = True
) -> dict:
    """Trains, saves, reloads and evaluates the toy model.

    Args:
        out: Output folder (created); receives the checkpoint and ``training_report.json``.
        seed: Seed of initialisation, training data and data order.
        scale: ``"full"`` for the shipped configuration, ``"tiny"`` for a smoke test.
        threads: ``torch.set_num_threads`` value.
        progress: Show progress bars and stage summaries.

    Returns:
        The report written to ``training_report.json``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    cfg: RecipeConfig = recipe_config(scale)
    log = print if progress else (lambda *a, **k: None)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    processor = build_processor(cfg.arch.image_size, cfg.arch.patch_size)
    model = build_model(cfg.arch, processor)
    model.train()
    encoder = Encoder(processor, n_image_tokens=cfg.arch.grid**2)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"toy VLM: {n_params / 1e6:.2f}M parameters, seed {seed}, scale {scale}, {threads} threads")

    t = time.perf_counter()
    train_scenes = make_scenes(cfg.pool_size, seed, "train")
    eval_scenes = make_scenes(cfg.eval_size, EVAL_STREAM_SEED, "heldout")
    pool, eval_pool = build_pool(train_scenes), build_pool(eval_scenes)
    log(f"scenes: {len(pool)} train, {len(eval_pool)} held out ({time.perf_counter() - t:.0f}s)")

    rngs = [np.random.default_rng([seed, stage]) for stage in range(4)]
    cpu_start = time.process_time()
    report: dict = {"seed": seed, "scale": scale, "threads": threads, "parameters": n_params,
                    "config": dataclasses.asdict(cfg), "stages": {}}

    result, heads = train_vision(model, pool, cfg.vision, rngs[0], cfg.object_patch_weight, progress)
    metrics = vision_patch_accuracy(model, heads, eval_pool)
    report["stages"]["vision"] = {**dataclasses.asdict(result), "heldout": metrics}
    log(f"  (a) held-out vision heads: {_fmt(metrics)}")

    result = train_text(model, pool, encoder, cfg.text, rngs[1], cfg.caption_fraction,
                        cfg.text_loss_on, progress, packed=cfg.packed)
    metrics = teacher_forced_exact(model, encoder, eval_pool, None)
    report["stages"]["text"] = {**dataclasses.asdict(result), "heldout_text_only": metrics}
    log(f"  (b) held-out text-only answers: {_fmt(metrics)}")

    t = time.perf_counter()
    states, eval_states = vision_states(model, pool.pixels), vision_states(model, eval_pool.pixels)
    log(f"vision states cached ({time.perf_counter() - t:.0f}s)")

    def check() -> dict[str, float]:
        return teacher_forced_exact(model, encoder, eval_pool, eval_states)

    for key, train_lm, sched, rng in (("align", False, cfg.align, rngs[2]),
                                      ("instruct", True, cfg.instruct, rngs[3])):
        result = train_multimodal(model, pool, states, encoder, sched, rng, train_lm=train_lm,
                                  caption_fraction=cfg.caption_fraction, progress=progress,
                                  check=check, check_every=cfg.check_every,
                                  packed=cfg.packed and train_lm)
        metrics = check()
        report["stages"][key] = {**dataclasses.asdict(result), "heldout": metrics}
        log(f"  ({'d' if train_lm else 'c'}) held-out answers: {_fmt(metrics)}")
    del states
    report["train_seconds"] = time.perf_counter() - start
    report["train_cpu_seconds"] = time.process_time() - cpu_start

    model.requires_grad_(True)
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    report["checkpoint_bytes"] = sum(f.stat().st_size for f in out.iterdir() if f.is_file())

    # Evaluate what was saved, loaded the way a hub checkpoint is.
    t = time.perf_counter()
    model = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    scores = evaluate_generation(model, processor, eval_scenes, majority_answers(train_scenes))
    report["greedy"] = dataclasses.asdict(scores)
    log(f"greedy held-out exact match: {_fmt(scores.accuracy)}")
    log(f"always-most-common baseline: {_fmt(scores.baseline)}")
    lens = layer_measurements(model, processor, eval_scenes[:LENS_SCENES])
    report["layers"] = {k: (v.tolist() if torch.is_tensor(v) else v)
                        for k, v in dataclasses.asdict(lens).items()}
    log("layer  lens_match  control  cos(visual,text)")
    for layer, (m, c, s) in enumerate(zip(lens.lens_match, lens.lens_control, lens.cos_visual_text)):
        log(f"{layer:5d}  {m:10.3f}  {c:7.3f}  {s:16.3f}")
    report["eval_seconds"] = time.perf_counter() - t
    report["total_seconds"] = time.perf_counter() - start
    (out / "training_report.json").write_text(json.dumps(report, indent=1))
    log(f"saved to {out} ({report['checkpoint_bytes'] / 1e6:.1f} MB), "
        f"{report['total_seconds'] / 60:.1f} min in total")
    return report


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m vlens.zoo.train", description=__doc__.split("\n")[1] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"training seed (default {DEFAULT_SEED}, the shipped checkpoint's)")
    # One thread by default: results are bit-reproducible only for a fixed thread count and the
    # shipped checkpoint was trained with one, and two seeds can train side by side on a 2-core
    # machine. (Measured: two threads make a step about 1.3x faster on an idle machine, but
    # slower than one under load.)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--scale", choices=("tiny", "full"), default="full")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()  # the PIL fallback of CLIPImageProcessor warns per call
    run_recipe(args.out, seed=args.seed, scale=args.scale, threads=args.threads)


if __name__ == "__main__":
    main()
