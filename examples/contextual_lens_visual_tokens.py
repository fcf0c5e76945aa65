"""Finding: the contextual lens reads object patches as their colour or shape word more often than
the logit lens does (LatentLens: the logit lens underestimates how interpretable visual tokens are,
23-24% against 68-72% for contextual neighbours).

Claim: above each lens's own shuffled-label control, an object patch's visual token has its
object's colour or shape word among its k nearest text-token states (same layer, from a bank of
captions run through the same model) more often than among the logit lens's top-k words.

Method: held-out synthetic scenes (vlens.data) and the caption prompt, as in
logit_lens_visual_tokens.py; `vlens.analysis.logit_lens` and `vlens.analysis.contextual_lens`
(bank: 200 training-split captions of another scene stream, so no held-out caption is in it) on
every image token, top k = 5 each. A patch is a hit at layer l when its object's colour or shape
word is among the lens's 5 words. Each lens's control: its hit rate with the labels shuffled
across all tested patches (mean of 1000 permutations), the logit-lens recipe's control.
Test (pre-declared, fixed before either lens's numbers on this recipe were seen): per scene, the
mean over middle/late layers (index > n_layers/3) of (contextual hit - its control) - (logit hit -
its control) > 0; one-sided sign test over scenes, reproduced when p < 0.01.

Model: "toy" by default; any LLaVA-style checkpoint with a patch grid. `--random-weights` runs the
control: the toy's architecture before training.

Prints: per layer both lenses' hit rates and controls; the verdict. Draws: contextual_lens.png
(hit minus control per layer, both lenses), contextual_panel.png (first scene's nearest words).
Writes contextual_lens.csv.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from examples import _common as common  # noqa: E402
from examples.logit_lens_visual_tokens import N_COLOURS, _hit_rates, _in_top  # noqa: E402
from vlens import analysis as va  # noqa: E402
from vlens import viz  # noqa: E402
from vlens.analysis.lens import word_forms  # noqa: E402
from vlens.data import CAPTION_QUESTION, Scene  # noqa: E402
from vlens.viz.pruning import contextual_panel  # noqa: E402

K = 5
N_PERMUTATIONS = 1000
BANK_SIZE = 200
BANK_SEED = 7


@dataclass(frozen=True)
class ContextualFinding:
    """Hit rates per layer (index 0 = input embeddings) of both lenses and their controls.

    Attributes:
        hit_logit, hit_contextual: Over every tested object patch, ``[layer]``.
        control_logit, control_contextual: Shuffled-label controls, ``[layer]``.
        per_scene_logit, per_scene_contextual: Per scene, ``[scene, layer]``.
        candidates: The middle/late layers the test averages over.
        sign: (n_positive, n_nonzero, p) of the sign test.
    """

    hit_logit: np.ndarray
    hit_contextual: np.ndarray
    control_logit: np.ndarray
    control_contextual: np.ndarray
    per_scene_logit: np.ndarray
    per_scene_contextual: np.ndarray
    candidates: tuple[int, ...]
    sign: tuple[int, int, float]
    n_patches: int
    n_bank_tokens: int
    k: int

    @property
    def excess_logit(self) -> np.ndarray:
        return self.hit_logit - self.control_logit

    @property
    def excess_contextual(self) -> np.ndarray:
        return self.hit_contextual - self.control_contextual

    @property
    def reproduced(self) -> bool:
        return self.sign[2] < common.ALPHA

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({
            "layer": np.arange(self.hit_logit.shape[0]), "hit_logit": self.hit_logit,
            "control_logit": self.control_logit, "hit_contextual": self.hit_contextual,
            "control_contextual": self.control_contextual, "excess_logit": self.excess_logit,
            "excess_contextual": self.excess_contextual,
            "candidate": [l in self.candidates for l in range(self.hit_logit.shape[0])],
        })


def _control(in_top: np.ndarray, colour: np.ndarray, shape: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    total = np.zeros(in_top.shape[0])
    for _ in range(n):
        perm = rng.permutation(len(colour))
        total += _hit_rates(in_top, colour[perm], shape[perm])[0]
    return total / n


def measure(model: Any, scenes: Sequence[Scene], k: int = K, bank_size: int = BANK_SIZE,
            n_permutations: int = N_PERMUTATIONS, batch_size: int = 16, seed: int = 0) -> ContextualFinding:
    """Both lenses on every object patch of ``scenes`` and the paired test (module doc)."""
    if common.image_grid(model) is None:
        raise ValueError("this finding needs visual tokens on a patch grid; Q-Former query tokens have none")
    forms = [word_forms(model.tokenizer, w) for w in common.SCENE_WORDS]
    bank = va.contextual.scene_captions(bank_size, seed=BANK_SEED)
    tops = {"logit": [], "contextual": []}
    colour, shape, scene_of = [], [], []
    n_bank = 0
    for start, chunk in zip(range(0, len(scenes), batch_size), common.batched(scenes, batch_size)):
        inputs = model.prepare([s.image for s in chunk], [CAPTION_QUESTION] * len(chunk))
        with torch.no_grad():
            _, cache = model.run_with_cache(inputs, names_filter=va.lens.required_hooks(model))
        results = {"logit": va.logit_lens(model, cache, k=k), "contextual": va.contextual_lens(model, cache, bank, k=k)}
        n_bank = results["contextual"].n_bank_tokens
        for row, scene in enumerate(chunk):
            span = inputs.layout.images[row][0]
            objects = common.token_objects(scene, span)
            for name, result in results.items():
                where = {int(p): j for j, p in enumerate(result.positions[row].tolist())}
                for tok in np.flatnonzero(objects >= 0):
                    tops[name].append(result.top_ids[row, :, where[int(span.positions[tok])]])
            for tok in np.flatnonzero(objects >= 0):
                obj = scene.objects[objects[tok]]
                colour.append(common.SCENE_WORDS.index(obj.colour))
                shape.append(common.SCENE_WORDS.index(obj.shape) - N_COLOURS)
                scene_of.append(start + row)
    if not colour:
        raise ValueError("no object patch in these scenes")
    colour_a, shape_a, scene_a = np.array(colour), np.array(shape), np.array(scene_of)
    in_top = {name: _in_top(torch.stack(t, dim=1), forms) for name, t in tops.items()}
    rng = np.random.default_rng(seed)
    hit = {name: _hit_rates(v, colour_a, shape_a)[0] for name, v in in_top.items()}
    control = {name: _control(v, colour_a, shape_a, rng, n_permutations) for name, v in in_top.items()}
    per_scene = {}
    for name, v in in_top.items():
        rows = []
        for s in range(len(scenes)):
            sel = scene_a == s
            rows.append(_hit_rates(v[:, sel], colour_a[sel], shape_a[sel])[0] if sel.any() else np.full(v.shape[0], np.nan))
        per_scene[name] = np.array(rows)
    n_layers = in_top["logit"].shape[0] - 1
    candidates = tuple(l for l in range(n_layers + 1) if l > n_layers / 3)
    cand = np.array(candidates)
    diff = ((per_scene["contextual"] - control["contextual"]) - (per_scene["logit"] - control["logit"]))[:, cand]
    return ContextualFinding(
        hit_logit=hit["logit"], hit_contextual=hit["contextual"], control_logit=control["logit"],
        control_contextual=control["contextual"], per_scene_logit=per_scene["logit"],
        per_scene_contextual=per_scene["contextual"], candidates=candidates,
        sign=common.sign_test(common.nanmean(diff, axis=1)), n_patches=len(colour_a), n_bank_tokens=n_bank, k=k,
    )


def describe(f: ContextualFinding) -> str:
    cand = np.array(f.candidates)
    pos, n, p = f.sign
    return (
        f"{common.verdict(f.reproduced)}: over layers {f.candidates[0]}..{f.candidates[-1]}, hit - control "
        f"{f.excess_contextual[cand].mean():+.3f} (contextual lens, hit {f.hit_contextual[cand].mean():.3f}) vs "
        f"{f.excess_logit[cand].mean():+.3f} (logit lens, hit {f.hit_logit[cand].mean():.3f}); contextual higher in "
        f"{pos}/{n} scenes, sign test p = {common.fmt_p(p)} ({f.n_patches} object patches, bank of "
        f"{f.n_bank_tokens} token states, top-{f.k})"
    )


def main(argv: Optional[Sequence[str]] = None) -> ContextualFinding:
    p = common.parser(__doc__, n_scenes=40)
    p.add_argument("--random-weights", action="store_true", help="the control: the toy's architecture before training")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        model = common.random_weights_toy(Path(scratch)) if args.random_weights else common.load_model(args)
        scenes = common.heldout_scenes(model, args.n_scenes, args.seed)
        common.announce("Contextual lens vs logit lens on object patches (own colour/shape word in the top-5)",
                        model, scenes)
        finding = measure(model, scenes, batch_size=args.batch_size)
        frame = finding.to_frame()
        common.print_table(frame)
        print("\n" + describe(finding))
        curves = viz.layer_curve(
            {"contextual lens - control": finding.excess_contextual, "logit lens - control": finding.excess_logit},
            ylabel="object patches hit - shuffled control", title="Contextual vs logit lens on object patches",
        )
        first = model.prepare(scenes[0].image, CAPTION_QUESTION)
        with torch.no_grad():
            _, cache = model.run_with_cache(first, names_filter=va.contextual.required_hooks(model))
        panel = contextual_panel(va.contextual_lens(model, cache, va.contextual.scene_captions(BANK_SIZE, seed=BANK_SEED),
                                                    k=1), first.layout, model.tokenizer)
        common.finish(common.write_outputs(args.out, {"contextual_lens": frame},
                                           {"contextual_lens": curves, "contextual_panel": panel}))
    return finding


if __name__ == "__main__":
    main()
