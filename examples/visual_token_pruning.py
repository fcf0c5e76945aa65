"""Finding: FastV-style pruning after layer 2 keeps the answer (FastV: about no loss on LLaVA-1.5-13B
with half the visual tokens dropped after layer 2, 45% fewer FLOPs).

Claim: dropping half of the visual tokens after layer K = 2, keeping those the last prompt token
attends to most in layer 2 (block 1), leaves the answer accuracy about where it is without pruning.

Method: held-out synthetic scenes (vlens.data), each with its colour question (a one-word answer
only the image gives); `vlens.analysis.prune_visual_tokens` with K = 2 and keep = 50% (FastV's
R = 50%), rankings "attention" (FastV) and "random" (same number kept, seeded), beside the unpruned
forward. Exact match: greedy decoding reproduces the answer word. FLOPs ratio from the blocks'
weights and the sequence lengths (docs/analyses.md).
Test (pre-declared, fixed before this recipe's numbers were seen): reproduced when (i) the unpruned
model answers (accuracy >= 0.5: there is accuracy to keep) and (ii) the pruned accuracy with the
attention ranking is within 0.10 of the unpruned one (FastV's "about no loss"). Reported beside it,
not tested: the random ranking, other K and keep fractions, the mean answer loss.

Model: "toy" by default; any checkpoint (--model llava-hf/llava-1.5-7b-hf --device cuda --dtype float16).
`--random-weights` runs the control: the toy's architecture before training.

Prints: per ranking, K and keep fraction the accuracy, mean loss and FLOPs ratio; the verdict.
Draws: pruning.png (loss and accuracy against the fraction kept). Writes pruning.csv.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from examples import _common as common  # noqa: E402
from vlens import analysis as va  # noqa: E402
from vlens.data import Scene  # noqa: E402
from vlens.viz.pruning import pruning_figure  # noqa: E402

LAYER = 2
KEEP = 0.5
MARGIN = 0.10
LAYERS = (1, 2, 4)
KEEPS = (0.1, 0.25, 0.5, 0.75, 1.0)
RANKINGS = ("attention", "random")


@dataclass(frozen=True)
class PruningFinding:
    """Exact match and loss per scene, ranking, K and keep fraction (``[scene, ranking, layer, keep]``).

    Attributes:
        exact, loss: From ``prune_visual_tokens``; full_exact, full_loss: unpruned, ``[scene]``.
        flops_ratio: ``[layer, keep]`` (the mean over scenes: the lengths barely differ).
        layers, keep, rankings: The grid.
    """

    exact: np.ndarray
    loss: np.ndarray
    full_exact: np.ndarray
    full_loss: np.ndarray
    flops_ratio: np.ndarray
    layers: tuple[int, ...]
    keep: tuple[float, ...]
    rankings: tuple[str, ...]
    frame: pd.DataFrame

    def accuracy(self, ranking: str, layer: int, keep: float) -> float:
        r, j, i = self.rankings.index(ranking), self.layers.index(layer), self.keep.index(keep)
        return float(self.exact[:, r, j, i].mean())

    @property
    def full_accuracy(self) -> float:
        return float(self.full_exact.mean())

    @property
    def reproduced(self) -> bool:
        kept = self.accuracy("attention", LAYER, KEEP)
        return self.full_accuracy >= 0.5 and kept >= self.full_accuracy - MARGIN

    def to_frame(self) -> pd.DataFrame:
        return self.frame


def measure(model: Any, scenes: Sequence[Scene], layers: Sequence[int] = LAYERS, keep: Sequence[float] = KEEPS,
            batch_size: int = 16, seed: int = 0) -> PruningFinding:
    """Prune every scene's colour question over the grid (module doc)."""
    layers = tuple(l for l in layers if l <= model.n_layers)
    exact, loss, full_exact, full_loss, flops = [], [], [], [], []
    for start, chunk in zip(range(0, len(scenes), batch_size), common.batched(scenes, batch_size)):
        qas = [common.colour_question(s) for s in chunk]
        inputs = model.prepare([s.image for s in chunk], [qa.question for qa in qas], answer=[qa.answer for qa in qas])
        result = va.prune_visual_tokens(model, inputs, layers=layers, keep=keep, rankings=RANKINGS, seed=seed + start)
        exact.append(result.exact.numpy())
        loss.append(result.loss.numpy())
        full_exact.append(result.full_exact.numpy())
        full_loss.append(result.full_loss.numpy())
        flops.append(result.flops_ratio.numpy())
    ex, lo = np.concatenate(exact), np.concatenate(loss)
    fl = np.concatenate(flops).mean(0)
    rows = []
    for r, name in enumerate(RANKINGS):
        for j, k in enumerate(layers):
            for i, frac in enumerate(keep):
                rows.append({"ranking": name, "K": k, "keep": frac, "accuracy": ex[:, r, j, i].mean(),
                             "loss": lo[:, r, j, i].mean(), "flops_ratio": fl[j, i]})
    return PruningFinding(
        exact=ex, loss=lo, full_exact=np.concatenate(full_exact), full_loss=np.concatenate(full_loss), flops_ratio=fl,
        layers=layers, keep=tuple(keep), rankings=RANKINGS, frame=pd.DataFrame(rows),
    )


def describe(f: PruningFinding) -> str:
    j, i = f.layers.index(LAYER), f.keep.index(KEEP)
    return (
        f"{common.verdict(f.reproduced)}: K={LAYER}, keep {KEEP:.0%}: accuracy {f.accuracy('attention', LAYER, KEEP):.3f} "
        f"(attention ranking) vs {f.full_accuracy:.3f} unpruned (criterion: unpruned >= 0.5 and a drop <= {MARGIN:.2f}); "
        f"random ranking {f.accuracy('random', LAYER, KEEP):.3f}; mean loss {f.loss[:, 0, j, i].mean():.3f} / "
        f"{f.loss[:, 1, j, i].mean():.3f} vs {f.full_loss.mean():.3f}; FLOPs ratio {f.flops_ratio[j, i]:.3f} "
        f"({1 - f.flops_ratio[j, i]:.0%} fewer); {f.exact.shape[0]} scenes"
    )


def main(argv: Optional[Sequence[str]] = None) -> PruningFinding:
    p = common.parser(__doc__, n_scenes=40)
    p.add_argument("--random-weights", action="store_true", help="the control: the toy's architecture before training")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        model = common.random_weights_toy(Path(scratch)) if args.random_weights else common.load_model(args)
        scenes = common.heldout_scenes(model, args.n_scenes, args.seed)
        common.announce("Visual-token pruning (FastV) on colour questions", model, scenes)
        finding = measure(model, scenes, batch_size=args.batch_size)
        common.print_table(finding.to_frame())
        print("\n" + describe(finding))
        first = scenes[0]
        qa = common.colour_question(first)
        example = va.prune_visual_tokens(model, model.prepare(first.image, qa.question, answer=qa.answer),
                                         layers=finding.layers, keep=finding.keep, rankings=RANKINGS)
        common.finish(common.write_outputs(args.out, {"pruning": finding.to_frame()}, {"pruning": pruning_figure(example)}))
    return finding


if __name__ == "__main__":
    main()
