"""Finding: how the answer's loss depends on how many visual tokens the model keeps, and which.

Claim: (1) the answer needs the image: its loss with every visual token is lower than with none;
(2) which tokens are kept matters more than how many: at the same intermediate count, a random
subset of the visual tokens gives a lower loss than the first tokens in raster order (a raster
prefix keeps the top rows of the image and drops whole objects below them; a random subset
keeps part of every object).

Method: held-out synthetic scenes (vlens.data), each with its colour question and one-word answer;
`vlens.analysis.token_count_curve` with order="raster" and order="random": the answer's mean
cross-entropy when only the first k visual tokens of the order are kept and the others are
removed from the sequence, for k in {0, 1/16, 1/8, 1/4, 1/2, 3/4, 1} x the token count.
Tests (pre-declared), per scene: (1) loss(0 tokens) - loss(all) > 0; (2) the mean over the
intermediate counts (0 < k < all) of loss(raster) - loss(random) > 0; each a one-sided sign test
over scenes, reproduced when p < 0.01.

Model: "toy" by default; any checkpoint (--model llava-hf/llava-1.5-7b-hf --device cuda
--dtype float16).

Prints: per count the mean loss (and the answer's probability exp(-loss)) for both orders; the
two verdicts. Draws: token_count.png (loss against tokens kept, both orders).
Writes token_count.csv.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from examples import _common as common  # noqa: E402
from vlens import analysis as va  # noqa: E402
from vlens import viz  # noqa: E402
from vlens.data import Scene  # noqa: E402

FRACTIONS = (0.0, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0)


@dataclass(frozen=True)
class CountFinding:
    """Answer loss per scene and count, ``[scene, count]``.

    Attributes:
        counts: Visual tokens kept.
        raster: Loss keeping the first k tokens in raster (sequence) order.
        random: Loss keeping k tokens of a random order (one seeded order per scene).
        needs_image: (n_positive, n, p) of test (1); random_beats_raster: of test (2).
    """

    counts: np.ndarray
    raster: np.ndarray
    random: np.ndarray
    needs_image: tuple[int, int, float]
    random_beats_raster: tuple[int, int, float]

    @property
    def reproduced_needs_image(self) -> bool:
        return self.needs_image[2] < common.ALPHA

    @property
    def reproduced_random_beats_raster(self) -> bool:
        return self.random_beats_raster[2] < common.ALPHA

    @property
    def reproduced(self) -> bool:
        return self.reproduced_needs_image and self.reproduced_random_beats_raster

    def to_frame(self) -> pd.DataFrame:
        r, q = self.raster.mean(0), self.random.mean(0)
        return pd.DataFrame({
            "kept": self.counts, "loss_raster": r, "loss_random": q,
            "p_answer_raster": np.exp(-self.raster).mean(0), "p_answer_random": np.exp(-self.random).mean(0),
        })


def measure(model: Any, scenes: Sequence[Scene], fractions: Sequence[float] = FRACTIONS,
            batch_size: int = 16, seed: int = 0) -> CountFinding:
    """Loss-vs-count curves over ``scenes`` in both orders and the two tests (module doc)."""
    raster, random, counts = [], [], None
    for start, chunk in zip(range(0, len(scenes), batch_size), common.batched(scenes, batch_size)):
        qas = [common.colour_question(s) for s in chunk]
        inputs = model.prepare([s.image for s in chunk], [qa.question for qa in qas], answer=[qa.answer for qa in qas])
        if counts is None:
            n = int(inputs.layout.image_positions(0).numel())
            counts = sorted({int(round(f * n)) for f in fractions})
        # seed + start: every scene gets its own random order (the analysis adds the row index)
        for order, out, s in (("raster", raster, 0), ("random", random, seed + start)):
            curve = va.token_count_curve(model, inputs, counts=counts, order=order, seed=s)
            out.append(curve.loss.numpy())
    raster_a, random_a = np.concatenate(raster), np.concatenate(random)
    middle = slice(1, len(counts) - 1)
    return CountFinding(
        counts=np.array(counts), raster=raster_a, random=random_a,
        needs_image=common.sign_test(raster_a[:, 0] - raster_a[:, -1]),
        random_beats_raster=common.sign_test((raster_a[:, middle] - random_a[:, middle]).mean(1)),
    )


def describe(f: CountFinding) -> str:
    r, q = f.raster.mean(0), f.random.mean(0)
    mid = slice(1, len(f.counts) - 1)
    return "\n".join([
        f"(1) the answer needs the image: {common.verdict(f.reproduced_needs_image)}: loss {r[0]:.3f} with 0 tokens, "
        f"{r[-1]:.3f} with all {int(f.counts[-1])}; lower in {f.needs_image[0]}/{f.needs_image[1]} scenes, "
        f"sign test p = {common.fmt_p(f.needs_image[2])}",
        f"(2) random subsets beat raster prefixes: {common.verdict(f.reproduced_random_beats_raster)}: mean loss over "
        f"k = {int(f.counts[1])}..{int(f.counts[-2])}: raster {r[mid].mean():.3f}, random {q[mid].mean():.3f}; random "
        f"lower in {f.random_beats_raster[0]}/{f.random_beats_raster[1]} scenes, sign test "
        f"p = {common.fmt_p(f.random_beats_raster[2])}",
    ])


def main(argv: Optional[Sequence[str]] = None) -> CountFinding:
    args = common.parser(__doc__, n_scenes=40).parse_args(argv)
    model = common.load_model(args)
    scenes = common.heldout_scenes(model, args.n_scenes, args.seed)
    common.announce("Answer loss against the number of visual tokens kept", model, scenes)
    finding = measure(model, scenes, batch_size=args.batch_size)
    frame = finding.to_frame()
    common.print_table(frame)
    print("\n" + describe(finding))

    fig = viz.count_curve_figure(
        SimpleNamespace(counts=torch.tensor(finding.counts), loss=torch.tensor(finding.raster), order=None),
        title=f"Colour questions, {len(scenes)} scenes: answer loss vs visual tokens kept",
    )
    ax = fig.axes[0]
    ax.lines[0].set_label("raster order (first k)")
    ax.plot(finding.counts, finding.random.mean(0), marker="s", markersize=4, label="random order")
    ax.legend(fontsize=8)
    common.finish(common.write_outputs(args.out, {"token_count": frame}, {"token_count": fig}))
    return finding


if __name__ == "__main__":
    main()
