"""Finding: the logit lens reads an object's patches as that object's colour or shape word.

Claim: in the middle and late layers of the language model, the logit lens decodes the visual
token of a patch covered by an object to that object's own colour or shape word more often than
a chance control does.

Method: held-out synthetic scenes (vlens.data), whose ground truth says which object covers each
patch of the model's grid; the caption prompt ("describe the image ."); `vlens.analysis.logit_lens`
on every image token (final norm + unembedding on the raw residual stream, every layer). A patch
is a hit at layer l when its object's colour word or shape word is among the top k=5 tokens.
Control: the hit rate with the labels shuffled across all tested patches (mean of 1000
permutations), i.e. what the lens scores from the words it emits whatever the patch shows.
Test (pre-declared): candidate layers are the middle/late ones, index > n_layers/3; statistic
max over candidates of (hit rate - control); null: the same statistic with labels permuted
across *objects* (an object's patches keep one label, so the many correlated patches of one
object do not count as independent evidence); reproduced when p < 0.01.

Model: "toy" by default (vlens/zoo/toy, 8 layers, 8x8 patch grid); any LLaVA-style checkpoint
with a patch grid works (--model llava-hf/llava-1.5-7b-hf --device cuda --dtype float16).

Prints: per layer, the hit rate (colour or shape; each alone), the control and their
difference; the verdict with the best candidate layer and the p-value.
Draws: lens_rates.png (hit rate and control per layer), lens_panel.png (top-1 word of every
visual token of the first scene, per layer). Writes lens_rates.csv.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from examples import _common as common  # noqa: E402
from vlens import analysis as va  # noqa: E402
from vlens.analysis.lens import word_forms  # noqa: E402
from vlens import viz  # noqa: E402
from vlens.data import CAPTION_QUESTION, Scene  # noqa: E402

K = 5
N_PERMUTATIONS = 1000
N_COLOURS = 6


@dataclass(frozen=True)
class LensFinding:
    """Logit-lens hit rates of object patches, per layer (index 0 = input embeddings).

    Attributes:
        layers: Layer indices, ``n_layers + 1`` of them.
        hit: Fraction of object patches whose colour or shape word is in the top-k.
        hit_colour: Colour word alone.
        hit_shape: Shape word alone.
        control: Mean hit rate with labels shuffled across patches.
        candidates: The middle/late layers the test looks at.
        best_layer: The candidate with the largest hit - control.
        p_value: Object-level permutation p-value of the max-over-candidates statistic.
        n_patches: Object patches tested; n_objects: objects they belong to.
        k: Top-k size.
    """

    layers: np.ndarray
    hit: np.ndarray
    hit_colour: np.ndarray
    hit_shape: np.ndarray
    control: np.ndarray
    candidates: tuple[int, ...]
    best_layer: int
    p_value: float
    n_patches: int
    n_objects: int
    n_scenes: int
    k: int

    @property
    def excess(self) -> np.ndarray:
        return self.hit - self.control

    @property
    def reproduced(self) -> bool:
        return self.p_value < common.ALPHA and bool(self.excess[self.best_layer] > 0)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({
            "layer": self.layers, "hit": self.hit, "hit_colour": self.hit_colour,
            "hit_shape": self.hit_shape, "control": self.control, "hit_minus_control": self.excess,
            "candidate": [int(l) in self.candidates for l in self.layers],
        })


def _in_top(top: torch.Tensor, word_forms: Sequence[Sequence[int]]) -> np.ndarray:
    """``[layer, patch, word]``: whether any form of each scene word is in the top-k."""
    out = np.zeros((top.shape[0], top.shape[1], len(word_forms)), dtype=bool)
    for w, forms in enumerate(word_forms):
        for token in forms:
            out[:, :, w] |= (top == token).any(-1).numpy()
    return out


def _hit_rates(in_top: np.ndarray, colour: np.ndarray, shape: np.ndarray) -> tuple[np.ndarray, ...]:
    cols = np.arange(in_top.shape[1])
    c = in_top[:, cols, colour]
    s = in_top[:, cols, N_COLOURS + shape]
    return (c | s).mean(1), c.mean(1), s.mean(1)


def measure(
    model: Any,
    scenes: Sequence[Scene],
    k: int = K,
    n_permutations: int = N_PERMUTATIONS,
    batch_size: int = 16,
    seed: int = 0,
) -> LensFinding:
    """Run the logit lens on every image token of ``scenes`` and test the claim (module doc)."""
    if common.image_grid(model) is None:
        raise ValueError("this finding needs visual tokens on a patch grid; Q-Former query tokens have none")
    forms = [word_forms(model.tokenizer, w) for w in common.SCENE_WORDS]
    tops, colour, shape, owner = [], [], [], []
    n_objects = 0
    for chunk in common.batched(scenes, batch_size):
        inputs = model.prepare([s.image for s in chunk], [CAPTION_QUESTION] * len(chunk))
        with torch.no_grad():
            _, cache = model.run_with_cache(inputs, names_filter=va.lens.required_hooks(model))
        lens = va.logit_lens(model, cache, positions="image", k=k)
        top_ids = lens.top_ids
        positions = lens.positions
        for row, scene in enumerate(chunk):
            span = inputs.layout.images[row][0]
            where = {int(p): j for j, p in enumerate(positions[row].tolist())}
            objects = common.token_objects(scene, span)
            for tok in np.flatnonzero(objects >= 0):
                obj = scene.objects[objects[tok]]
                tops.append(top_ids[row, :, where[int(span.positions[tok])]])
                colour.append(common.SCENE_WORDS.index(obj.colour))
                shape.append(common.SCENE_WORDS.index(obj.shape) - N_COLOURS)
                owner.append(n_objects + int(objects[tok]))
            n_objects += len(scene.objects)
    if not tops:
        raise ValueError("no object patch in these scenes")
    in_top = _in_top(torch.stack(tops, dim=1), forms)  # [layer, patch, word]
    colour_a, shape_a, owner_a = np.array(colour), np.array(shape), np.array(owner)
    hit, hit_c, hit_s = _hit_rates(in_top, colour_a, shape_a)

    rng = np.random.default_rng(seed)
    control = np.zeros_like(hit)
    for _ in range(n_permutations):  # labels shuffled across patches
        perm = rng.permutation(len(colour_a))
        control += _hit_rates(in_top, colour_a[perm], shape_a[perm])[0]
    control /= n_permutations

    n_layers = in_top.shape[0] - 1
    candidates = tuple(l for l in range(n_layers + 1) if l > n_layers / 3)
    cand = np.array(candidates)
    observed = float((hit - control)[cand].max())
    # Object-level null: one (colour, shape) per object, permuted across objects.
    obj_colour = np.zeros(n_objects, dtype=np.int64)
    obj_shape = np.zeros(n_objects, dtype=np.int64)
    obj_colour[owner_a], obj_shape[owner_a] = colour_a, shape_a
    tested = np.unique(owner_a)
    null = np.empty(n_permutations)
    for i in range(n_permutations):
        mapping = np.arange(n_objects)
        mapping[tested] = rng.permutation(tested)
        perm_hit = _hit_rates(in_top, obj_colour[mapping[owner_a]], obj_shape[mapping[owner_a]])[0]
        null[i] = (perm_hit - control)[cand].max()
    best = int(cand[np.argmax((hit - control)[cand])])
    return LensFinding(
        layers=np.arange(n_layers + 1), hit=hit, hit_colour=hit_c, hit_shape=hit_s, control=control,
        candidates=candidates, best_layer=best, p_value=common.permutation_p(observed, null),
        n_patches=len(colour_a), n_objects=len(tested), n_scenes=len(scenes), k=k,
    )


def describe(f: LensFinding) -> str:
    b = f.best_layer
    return (
        f"{common.verdict(f.reproduced)}: best middle/late layer {b}: hit rate {f.hit[b]:.3f} vs control "
        f"{f.control[b]:.3f} ({f.excess[b]:+.3f}); object-level permutation p = {common.fmt_p(f.p_value)} "
        f"(max over layers {f.candidates[0]}..{f.candidates[-1]}, {f.n_patches} patches of {f.n_objects} objects, "
        f"{f.n_scenes} scenes, top-{f.k})"
    )


def main(argv: Optional[Sequence[str]] = None) -> LensFinding:
    args = common.parser(__doc__, n_scenes=40).parse_args(argv)
    model = common.load_model(args)
    scenes = common.heldout_scenes(model, args.n_scenes, args.seed)
    common.announce("Logit lens on object patches (own colour/shape word in the top-5)", model, scenes)
    finding = measure(model, scenes, batch_size=args.batch_size)
    frame = finding.to_frame()
    common.print_table(frame)
    print("\n" + describe(finding))

    curves = viz.layer_curve(
        {"own colour or shape": finding.hit, "colour": finding.hit_colour, "shape": finding.hit_shape,
         "control (shuffled labels)": finding.control},
        ylabel=f"object patches with the word in the top-{finding.k}",
        title="Logit lens on object patches", ylim=(0, 1),
    )
    first = model.prepare(scenes[0].image, CAPTION_QUESTION)
    with torch.no_grad():
        _, cache = model.run_with_cache(first, names_filter=va.lens.required_hooks(model))
    panel = viz.lens_panel(va.logit_lens(model, cache, positions="image", k=1), first.layout, model.tokenizer)
    common.finish(common.write_outputs(args.out, {"lens_rates": frame}, {"lens_rates": curves, "lens_panel": panel}))
    return finding


if __name__ == "__main__":
    main()
