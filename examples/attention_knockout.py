"""Finding: attention knockout, the causal test of how the answer reads the image.

Claims: (K1, Neo et al. 2024) blocking the text's attention to the cells of the object the
question asks about hurts the answer far more than blocking it to as many background cells
(Neo et al. report a drop of more than 70% on LLaVA-1.5-7B). (K2, Zhang et al. 2024) over
windows of layers, the image -> question flow matters in the lower layers, and the question ->
last flow later than it: the model first moves visual information into the question tokens,
then from them to the position that answers.

Method: held-out synthetic scenes (vlens.data), each with its colour question and one-word
answer; `vlens.analysis.attention_knockout`, which masks the attention scores before the softmax
in the chosen layers and reports the answer's log-probability. K1: queries = the text after the
image (instruction and the answer-predicting token), keys = the asked-about object's cells
(ground truth), all layers; control keys = as many background cells drawn at random (seeded per
scene). K2: windows of w = max(1, n_layers // 4) layers at every start (Zhang et al.: 9 of 32);
flows image -> question (queries: the instruction tokens before the predicting token), question
-> last (query: the predicting token; keys: those instruction tokens) and image -> last. A flow's
damage in a window is max(0, -delta log-probability).

Tests (pre-declared): K1, per scene, delta(background) - delta(object) > 0, one-sided sign test
over scenes p < 0.01 (reported, not tested: each one's mean relative probability drop,
1 - p/p_clean, beside Neo's 70%). K2a, per scene, the damage-weighted mean window centre of
question -> last minus that of image -> question > 0, sign test p < 0.01 (a scene where a flow
does no damage anywhere has no centre and is dropped). K2b, per scene, image -> question's mean
damage over windows in the lower half of the layers minus over windows in the upper half > 0,
sign test p < 0.01.

Model: "toy" by default; any checkpoint with a patch grid (--model llava-hf/llava-1.5-7b-hf
--device cuda --dtype float16).

Prints: K1's mean drops and verdict; K2's mean delta log-probability per window and flow and
the verdicts. Draws: knockout_windows.png (mean delta per window start, one line per flow).
Writes knockout_objects.csv (per scene) and knockout_windows.csv (per scene, flow, window).
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from examples import _common as common  # noqa: E402
from vlens import analysis as va  # noqa: E402
from vlens.analysis._spans import predictor_positions  # noqa: E402
from vlens.data import Scene  # noqa: E402

FLOWS = ("image->question", "question->last", "image->last")


@dataclass(frozen=True)
class ObjectKnockoutFinding:
    """K1, per scene: the answer's log-probability change with text -> cells attention blocked.

    Attributes:
        delta_object, delta_background: ``[scene]`` delta log-probability (knocked out - clean).
        drop_object, drop_background: ``[scene]`` relative probability drop 1 - p/p_clean.
        n_cells: ``[scene]`` cells blocked in each (the object's cell count).
        test: (n_positive, n, p) of the background-minus-object sign test.
    """

    delta_object: np.ndarray
    delta_background: np.ndarray
    drop_object: np.ndarray
    drop_background: np.ndarray
    n_cells: np.ndarray
    test: tuple[int, int, float]

    @property
    def reproduced(self) -> bool:
        return self.test[2] < common.ALPHA

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({
            "scene": np.arange(self.n_cells.size), "n_cells": self.n_cells,
            "delta_object": self.delta_object, "delta_background": self.delta_background,
            "drop_object": self.drop_object, "drop_background": self.drop_background,
        })


@dataclass(frozen=True)
class FlowKnockoutFinding:
    """K2: delta log-probability per scene, flow and window of ``window`` layers.

    Attributes:
        delta: ``[scene, flow, start]``.
        starts: ``[start]`` first layer of each window.
        window: Window size.
        n_layers: Layers of the model.
        tests: "order" (K2a) and "lower" (K2b): (n_positive, n, p).
    """

    delta: np.ndarray
    starts: np.ndarray
    window: int
    n_layers: int
    tests: dict[str, tuple[int, int, float]]

    @property
    def damage(self) -> np.ndarray:
        return np.maximum(0.0, -self.delta)

    def centroid(self, flow: str) -> np.ndarray:
        """Per scene, the damage-weighted mean window centre (NaN where the flow does no damage)."""
        d = self.damage[:, FLOWS.index(flow)]
        centres = self.starts + (self.window - 1) / 2
        total = d.sum(1)
        return np.where(total > 0, (d * centres).sum(1) / np.where(total > 0, total, 1.0), np.nan)

    def lower_minus_upper(self, flow: str) -> np.ndarray:
        d = self.damage[:, FLOWS.index(flow)]
        half = self.n_layers / 2
        lower = self.starts + self.window <= half
        upper = self.starts >= half
        return d[:, lower].mean(1) - d[:, upper].mean(1)

    @property
    def reproduced_order(self) -> bool:
        return self.tests["order"][2] < common.ALPHA

    @property
    def reproduced_lower(self) -> bool:
        return self.tests["lower"][2] < common.ALPHA

    @property
    def reproduced(self) -> bool:
        return self.reproduced_order and self.reproduced_lower

    def to_frame(self) -> pd.DataFrame:
        s, f, w = np.meshgrid(np.arange(self.delta.shape[0]), np.arange(len(FLOWS)), np.arange(self.starts.size),
                              indexing="ij")
        return pd.DataFrame({"scene": s.ravel(), "flow": np.array(FLOWS)[f.ravel()], "start": self.starts[w.ravel()],
                             "size": self.window, "delta_logprob": self.delta.ravel()})


def _text_after_image(layout: Any) -> torch.Tensor:
    return layout.instruction_mask | torch.nn.functional.one_hot(predictor_positions(layout), layout.seq_len).bool()


def _question(layout: Any) -> torch.Tensor:
    """The instruction tokens before the answer-predicting one."""
    predictor = torch.nn.functional.one_hot(predictor_positions(layout), layout.seq_len).bool()
    return layout.instruction_mask & ~predictor


def _prepare(model: Any, chunk: list[Scene]) -> tuple[Any, list]:
    qas = [common.colour_question(s) for s in chunk]
    inputs = model.prepare([s.image for s in chunk], [qa.question for qa in qas], answer=[qa.answer for qa in qas])
    return inputs, qas


def measure_objects(model: Any, scenes: Sequence[Scene], batch_size: int = 16) -> ObjectKnockoutFinding:
    """K1 over ``scenes`` (module doc)."""
    if common.image_grid(model) is None:
        raise ValueError("this finding needs visual tokens on a patch grid; Q-Former query tokens have none")
    rows: dict[str, list] = {k: [] for k in ("do", "db", "ro", "rb", "n")}
    for chunk in common.batched(scenes, batch_size):
        inputs, qas = _prepare(model, chunk)
        layout = inputs.layout
        objects = torch.zeros_like(layout.attention_mask)
        background = torch.zeros_like(layout.attention_mask)
        for row, (scene, qa) in enumerate(zip(chunk, qas)):
            span = layout.images[row][0]
            owner = common.token_objects(scene, span)
            target = common.target_object(scene, qa)
            cells = np.flatnonzero(owner == target)
            pool = np.flatnonzero(owner < 0)
            rng = np.random.default_rng(scene.seed)
            chosen = rng.choice(pool, size=min(len(cells), len(pool)), replace=False)
            objects[row, span.positions[torch.as_tensor(cells)]] = True
            background[row, span.positions[torch.as_tensor(chosen)]] = True
            rows["n"].append(len(cells))
        query = _text_after_image(layout)
        everything = [(0, model.n_layers)]
        hit_obj = va.attention_knockout(model, inputs, query, objects, windows=everything)
        hit_bg = va.attention_knockout(model, inputs, query, background, windows=everything)
        rows["do"] += hit_obj.delta_logprob[:, 0].tolist()
        rows["db"] += hit_bg.delta_logprob[:, 0].tolist()
        rows["ro"] += hit_obj.relative_prob_drop[:, 0].tolist()
        rows["rb"] += hit_bg.relative_prob_drop[:, 0].tolist()
    do, db = np.array(rows["do"]), np.array(rows["db"])
    return ObjectKnockoutFinding(
        delta_object=do, delta_background=db, drop_object=np.array(rows["ro"]), drop_background=np.array(rows["rb"]),
        n_cells=np.array(rows["n"]), test=common.sign_test(db - do),
    )


def measure_flows(model: Any, scenes: Sequence[Scene], batch_size: int = 16) -> FlowKnockoutFinding:
    """K2 over ``scenes`` (module doc)."""
    window = max(1, model.n_layers // 4)
    per_flow: dict[str, list] = {f: [] for f in FLOWS}
    starts = None
    for chunk in common.batched(scenes, batch_size):
        inputs, _ = _prepare(model, chunk)
        layout = inputs.layout
        question = _question(layout)
        spans = {"image->question": (question, "image"), "question->last": ("predictor", question),
                 "image->last": ("predictor", "image")}
        for flow, (query, key) in spans.items():
            result = va.attention_knockout(model, inputs, query, key, sizes=(window,))
            per_flow[flow].append(result.delta_logprob.numpy())
            starts = result.window_start.numpy()
    assert starts is not None  # at least one scene
    delta = np.stack([np.concatenate(per_flow[f]) for f in FLOWS], axis=1)
    partial = FlowKnockoutFinding(delta=delta, starts=starts, window=window, n_layers=model.n_layers, tests={})
    order = partial.centroid("question->last") - partial.centroid("image->question")
    tests = {"order": common.sign_test(order), "lower": common.sign_test(partial.lower_minus_upper("image->question"))}
    return dataclasses.replace(partial, tests=tests)


def describe_objects(f: ObjectKnockoutFinding) -> str:
    n_pos, n, p = f.test
    return (
        f"K1 (object cells vs as many background cells): {common.verdict(f.reproduced)}: mean delta log-prob "
        f"{f.delta_object.mean():+.3f} (object) vs {f.delta_background.mean():+.3f} (background); relative "
        f"probability drop {100 * f.drop_object.mean():.1f}% vs {100 * f.drop_background.mean():.1f}% "
        f"(Neo et al.: > 70%); object worse in {n_pos}/{n} scenes, sign test p = {common.fmt_p(p)}; "
        f"{f.n_cells.mean():.1f} cells per object"
    )


def describe_flows(f: FlowKnockoutFinding) -> str:
    lines = []
    for flow in FLOWS:
        curve = " ".join(f"{v:+.3f}" for v in f.delta[:, FLOWS.index(flow)].mean(0))
        lines.append(f"{flow:16s} mean delta log-prob per window start {f.starts.tolist()}: {curve}")
    a, b = common.nanmean(f.centroid("image->question")), common.nanmean(f.centroid("question->last"))
    n_pos, n, p = f.tests["order"]
    lines.append(f"K2a (question->last later than image->question): {common.verdict(f.reproduced_order)}: damage "
                 f"centre {a:.2f} vs {b:.2f} (window {f.window}); later in {n_pos}/{n} scenes, p = {common.fmt_p(p)}")
    n_pos, n, p = f.tests["lower"]
    lines.append(f"K2b (image->question matters in the lower half): {common.verdict(f.reproduced_lower)}: lower "
                 f"minus upper damage {common.nanmean(f.lower_minus_upper('image->question')):+.4f}; positive in "
                 f"{n_pos}/{n} scenes, p = {common.fmt_p(p)}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> tuple[ObjectKnockoutFinding, FlowKnockoutFinding]:
    p = common.parser(__doc__, n_scenes=40)
    p.add_argument("--random-weights", action="store_true", help="the control: the toy's architecture before training")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        model = common.random_weights_toy(Path(scratch)) if args.random_weights else common.load_model(args)
        scenes = common.heldout_scenes(model, args.n_scenes, args.seed)
        common.announce("Attention knockout: object cells, and flows over layer windows", model, scenes)
        objects = measure_objects(model, scenes, batch_size=args.batch_size)
        flows = measure_flows(model, scenes, batch_size=args.batch_size)
    print(describe_objects(objects))
    print(describe_flows(flows))
    fig = Figure(figsize=(5.2, 3.4))
    ax = fig.add_subplot(1, 1, 1)
    for i, flow in enumerate(FLOWS):
        ax.plot(flows.starts, flows.delta[:, i].mean(0), marker="o", label=flow)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel(f"first layer of the {flows.window}-layer window")
    ax.set_ylabel("mean delta log-prob of the answer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    common.finish(common.write_outputs(
        args.out, {"knockout_objects": objects.to_frame(), "knockout_windows": flows.to_frame()},
        {"knockout_windows": fig},
    ))
    return objects, flows


if __name__ == "__main__":
    main()
