"""Finding: which visual tokens the answer uses: object patches, not the background.

Claim: removing a single visual token that shows an object raises the answer's loss more than
removing one that shows background, both when measured (drop the token from the sequence) and
when estimated to first order from one backward pass (gradient x (0 - embedding)).

Method: held-out synthetic scenes (vlens.data), each with its colour question and one-word
answer; `vlens.analysis.token_contributions` with estimator="drop" and estimator="gradient": per
visual token, the answer loss without it minus the full loss (drop), or its first-order estimate
for zeroing the token's input embedding (gradient). Ground truth says which tokens are object
patches (and which object the question asks about). Tests (pre-declared), per scene, for each
method: mean contribution of object patches - mean contribution of background patches > 0,
one-sided sign test over scenes, reproduced when p < 0.01. Reported, not tested: the asked-about
object vs the other objects, and the per-scene Spearman correlation of the two methods.

Model: "toy" by default; any checkpoint with a patch grid (--model llava-hf/llava-1.5-7b-hf
--device cuda --dtype float16; "drop" runs one suffix per visual token: 576 for LLaVA-1.5).

Prints: per method and patch kind (asked-about object, other objects, background) the mean
contribution; the agreement of the two methods; the verdicts. Draws: contributions_map_drop.png
and contributions_map_gradient.png (each method over the first scene), contributions_scatter.png
(drop against gradient, coloured by patch kind). Writes token_contributions.csv (one row per
scene and visual token).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from examples import _common as common  # noqa: E402
from vlens import analysis as va  # noqa: E402
from vlens import viz  # noqa: E402
from vlens.data import Scene  # noqa: E402

METHODS = ("drop", "gradient")
# A contribution is the answer loss without the token minus the full loss.
SIGN = "delta loss = loss without the token - full loss: > 0 the token helps, < 0 removing it lowers the loss"
KINDS = ("asked-about object", "other objects", "background")


@dataclass(frozen=True)
class ContributionFinding:
    """Per scene and visual token (span order), ``[scene, token]`` arrays.

    Attributes:
        drop: Loss without the token minus the full loss.
        gradient: Its first-order estimate (zeroing the token's input embedding).
        kind: 0 = the asked-about object, 1 = another object, 2 = background.
        full_loss: Answer loss with every token, ``[scene]``.
        tests: Per method, (n_positive, n, p) of the object-minus-background sign test.
    """

    drop: np.ndarray
    gradient: np.ndarray
    kind: np.ndarray
    full_loss: np.ndarray
    tests: dict[str, tuple[int, int, float]]

    def reproduced_for(self, method: str) -> bool:
        return self.tests[method][2] < common.ALPHA

    @property
    def reproduced(self) -> bool:
        return all(self.reproduced_for(m) for m in METHODS)

    def kind_means(self, method: str) -> np.ndarray:
        """``[scene, kind]``: mean contribution per patch kind (NaN where a scene has none)."""
        values = getattr(self, method)
        return np.stack([common.masked_mean(values, self.kind == k) for k in range(len(KINDS))], axis=1)

    def object_and_background(self, method: str) -> tuple[np.ndarray, np.ndarray]:
        """Per scene, the mean contribution of object patches and of background patches."""
        values = getattr(self, method)
        return common.masked_mean(values, self.kind < 2), common.masked_mean(values, self.kind == 2)

    @property
    def spearman(self) -> np.ndarray:
        """Per scene, the rank correlation of the drop and gradient contributions."""
        def ranks(a: np.ndarray) -> np.ndarray:
            return a.argsort(1).argsort(1).astype(np.float64)

        rd, rg = ranks(self.drop), ranks(self.gradient)
        rd -= rd.mean(1, keepdims=True)
        rg -= rg.mean(1, keepdims=True)
        return (rd * rg).sum(1) / np.sqrt((rd**2).sum(1) * (rg**2).sum(1))

    def to_frame(self) -> pd.DataFrame:
        scene, token = np.meshgrid(np.arange(self.drop.shape[0]), np.arange(self.drop.shape[1]), indexing="ij")
        return pd.DataFrame({
            "scene": scene.ravel(), "token": token.ravel(), "kind": np.array(KINDS)[self.kind.ravel()],
            "drop": self.drop.ravel(), "gradient": self.gradient.ravel(),
        })

    def summary_frame(self) -> pd.DataFrame:
        rows = []
        for method in METHODS:
            means = common.nanmean(self.kind_means(method), 0)
            rows.append({"method": method, **dict(zip(KINDS, means))})
        return pd.DataFrame(rows)


def _span_order(result: Any, row: int, span: Any) -> np.ndarray:
    values = result.delta_loss[row]
    positions = result.image_positions[row].tolist()
    where = {int(p): j for j, p in enumerate(positions)}
    return values[[where[int(p)] for p in span.positions]].numpy()


def measure(model: Any, scenes: Sequence[Scene], batch_size: int = 16) -> ContributionFinding:
    """Per-token contributions over ``scenes`` by both methods and the tests (module doc)."""
    if common.image_grid(model) is None:
        raise ValueError("this finding needs visual tokens on a patch grid; Q-Former query tokens have none")
    values: dict[str, list] = {m: [] for m in METHODS}
    kinds, full = [], []
    for chunk in common.batched(scenes, batch_size):
        qas = [common.colour_question(s) for s in chunk]
        inputs = model.prepare([s.image for s in chunk], [qa.question for qa in qas], answer=[qa.answer for qa in qas])
        results = {m: va.token_contributions(model, inputs, estimator=m) for m in METHODS}
        for row, (scene, qa) in enumerate(zip(chunk, qas)):
            span = inputs.layout.images[row][0]
            owner = common.token_objects(scene, span)
            target = common.target_object(scene, qa)
            kinds.append(np.where(owner < 0, 2, np.where(owner == target, 0, 1)))
            for m in METHODS:
                values[m].append(_span_order(results[m], row, span))
            full.append(float(results["drop"].full_loss[row]))
    partial = ContributionFinding(
        drop=np.stack(values["drop"]), gradient=np.stack(values["gradient"]), kind=np.stack(kinds),
        full_loss=np.array(full), tests={},
    )
    tests = {m: common.sign_test(np.subtract(*partial.object_and_background(m))) for m in METHODS}
    return dataclasses.replace(partial, tests=tests)


def describe(f: ContributionFinding) -> str:
    lines = []
    for m in METHODS:
        means = common.nanmean(f.kind_means(m), 0)
        obj, bg = f.object_and_background(m)
        n_pos, n, p = f.tests[m]
        # The test is per scene (object mean - background mean > 0); the means over scenes can point
        # the other way when a few scenes have large values, so both are printed, each with its sign.
        lines.append(
            f"{m}: {common.verdict(f.reproduced_for(m))}: an object patch costs more to remove than a background "
            f"patch in {n_pos}/{n} scenes (per-scene object mean - background mean > 0; median difference "
            f"{float(np.nanmedian(obj - bg)):+.1e} nats), sign test p = {common.fmt_p(p)}. Mean contribution "
            f"({SIGN}) of an object patch {common.nanmean(obj):+.4f} vs background {common.nanmean(bg):+.4f} "
            f"(asked-about object {means[0]:+.4f}, other objects {means[1]:+.4f})"
        )
    rho = f.spearman
    lines.append(f"drop vs gradient: per-scene Spearman correlation {np.mean(rho):+.3f} "
                 f"(range {rho.min():+.3f}..{rho.max():+.3f}); full answer loss {f.full_loss.mean():.3f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> ContributionFinding:
    args = common.parser(__doc__, n_scenes=30).parse_args(argv)
    model = common.load_model(args)
    scenes = common.heldout_scenes(model, args.n_scenes, args.seed)
    common.announce("Each visual token's contribution to the answer loss", model, scenes)
    finding = measure(model, scenes, batch_size=args.batch_size)
    summary = finding.summary_frame()
    print(f"mean contribution per patch kind ({SIGN}):")
    common.print_table(summary, "{:+.5f}")
    print("\n" + describe(finding))

    qa = common.colour_question(scenes[0])
    first = model.prepare(scenes[0].image, qa.question, answer=qa.answer)
    span, picture = first.layout.images[0][0], viz.model_view_image(first, model.processor)
    maps = {}
    for m in METHODS:  # one figure per method: their scales differ; symmetric so 0 is white
        values = getattr(finding, m)[0]
        top = float(np.abs(values).max()) or 1.0
        maps[f"contributions_map_{m}"] = viz.image_heatmap(
            values, span, picture, cmap="RdBu_r", vmin=-top, vmax=top, label="answer-loss contribution",
            title=f"{m}: {qa.question!r} -> {qa.answer}",
        )
    scatter = Figure(figsize=(4.8, 4.2))
    ax = scatter.add_subplot(1, 1, 1)
    for k, name in enumerate(KINDS):
        mask = finding.kind == k
        ax.scatter(finding.gradient[mask], finding.drop[mask], s=6, alpha=0.6, label=name)
    ax.set_xlabel("gradient estimate")
    ax.set_ylabel("drop (measured)")
    ax.set_title(f"Per-token contributions, {len(scenes)} scenes", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    scatter.tight_layout()
    common.finish(common.write_outputs(args.out, {"token_contributions": finding.to_frame()},
                                       {**maps, "contributions_scatter": scatter}))
    return finding


if __name__ == "__main__":
    main()
