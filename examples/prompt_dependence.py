"""Finding: visual tokens do not depend on the prompt when the image comes first in a causal LM;
they do when the connector reads the prompt (InstructBLIP's Q-Former).

Claim: (1) in a bridge-style VLM whose causal language model reads the image before the
instruction (LLaVA, the toy model), the image tokens' hidden states are the same, at every
layer, whatever the question: they only see what precedes them. (2) In InstructBLIP, whose
Q-Former reads the instruction to produce the visual tokens, they differ from the input
embeddings on.

Method: held-out synthetic scenes (vlens.data); per scene its 7 prompts (colour, shape, where,
count, two presence questions, caption); `vlens.analysis.prompt_dependence`: per layer the mean
over image tokens and prompt pairs of the cosine distance 1 - cos(h_p, h_q) of the same image
token's state under prompts p and q, and the largest absolute difference. Tests (pre-declared):
(1) the causal model's cosine distance is below the float rounding bound (1e-5 in float32, 1e-3 in
16-bit dtypes) at every layer in every scene; (2) the Q-Former model's cosine distance, mean over
scenes, is above 100x that bound at every layer. With no --qformer-model given, (2) runs on a tiny
*random* InstructBLIP built from tests/tiny/blip.py (a source checkout is needed): it shows the
mechanism (the Q-Former reads the prompt), not what a trained InstructBLIP's dependence looks like.

Model: "toy" by default for (1); --qformer-model takes a trained InstructBLIP
(Salesforce/instructblip-vicuna-7b with --device cuda --dtype float16) for (2).

Prints: per layer, both models' cosine distance (mean and max over scenes) and max |difference|;
the two verdicts. Draws: prompt_dependence.png (cosine distance per layer, both models, log
scale). Writes prompt_dependence.csv.
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
from vlens import HookedVLM  # noqa: E402
from vlens import analysis as va  # noqa: E402
from vlens import viz  # noqa: E402
from vlens.data import CAPTION_QUESTION, Scene  # noqa: E402

FLOAT32_BOUND = 1e-5
HALF_BOUND = 1e-3
QFORMER_FACTOR = 100.0


def rounding_bound(model: Any) -> float:
    """Largest cosine distance float rounding explains at the model's dtype."""
    return FLOAT32_BOUND if model.dtype == torch.float32 else HALF_BOUND


@dataclass(frozen=True)
class DependenceCurves:
    """One model's prompt dependence, ``[scene, layer]`` (index 0 = input embeddings).

    Attributes:
        name: The model.
        cosine_distance: Mean over image tokens and prompt pairs of 1 - cos.
        max_abs_diff: Largest absolute difference of a state entry between two prompts.
        bound: The float rounding bound of the model's dtype.
    """

    name: str
    cosine_distance: np.ndarray
    max_abs_diff: np.ndarray
    bound: float

    @property
    def independent(self) -> bool:
        """Test (1): below the rounding bound at every layer of every scene."""
        return bool((self.cosine_distance <= self.bound).all())

    @property
    def dependent(self) -> bool:
        """Test (2): mean over scenes above 100x the bound at every layer."""
        return bool((self.cosine_distance.mean(0) > QFORMER_FACTOR * self.bound).all())

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({
            "model": self.name, "layer": np.arange(self.cosine_distance.shape[1]),
            "cosine_distance_mean": self.cosine_distance.mean(0), "cosine_distance_max": self.cosine_distance.max(0),
            "max_abs_diff": self.max_abs_diff.max(0),
        })


def prompts_of(scene: Scene) -> list[str]:
    return list(dict.fromkeys([qa.question for qa in scene.questions] + [CAPTION_QUESTION]))


def measure(model: Any, scenes: Sequence[Scene]) -> DependenceCurves:
    """Prompt dependence of the image tokens' states over ``scenes`` (module doc)."""
    distance, diff = [], []
    for scene in scenes:
        result = va.prompt_dependence(model, scene.image, prompts_of(scene))
        distance.append(result.per_layer.numpy())
        diff.append(result.max_abs_diff.numpy())
    return DependenceCurves(name=str(model.name), cosine_distance=np.stack(distance), max_abs_diff=np.stack(diff),
                            bound=rounding_bound(model))


def tiny_random_instructblip(folder: Path) -> HookedVLM:
    """A tiny random InstructBLIP (tests/tiny/blip.py), saved to ``folder`` and loaded from it."""
    from tests.tiny.blip import build_instructblip

    return HookedVLM.from_pretrained(build_instructblip(folder), device="cpu")


def describe(causal: DependenceCurves, qformer: DependenceCurves, qformer_note: str) -> str:
    q = qformer.cosine_distance.mean(0)
    return "\n".join([
        f"(1) image-first causal LM ({causal.name}): {common.verdict(causal.independent)}: largest cosine distance "
        f"{causal.cosine_distance.max():.2e} (bound {causal.bound:g}), largest |difference| "
        f"{causal.max_abs_diff.max():.2e}, over {causal.cosine_distance.shape[0]} scenes x "
        f"{causal.cosine_distance.shape[1]} layers",
        f"(2) Q-Former ({qformer_note}): {common.verdict(qformer.dependent)}: cosine distance "
        f"{q.min():.3g}..{q.max():.3g} across layers (mean over scenes; threshold "
        f"{QFORMER_FACTOR * qformer.bound:g}), largest |difference| {qformer.max_abs_diff.max():.3g}",
    ])


def main(argv: Optional[Sequence[str]] = None) -> tuple[DependenceCurves, DependenceCurves]:
    p = common.parser(__doc__, n_scenes=10)
    p.add_argument("--qformer-model", default=None,
                   help="a trained InstructBLIP (default: a tiny random one from tests/tiny, built in a temp folder)")
    args = p.parse_args(argv)
    model = common.load_model(args)
    scenes = common.heldout_scenes(model, args.n_scenes, args.seed)
    common.announce("Do the visual tokens' hidden states depend on the prompt?", model, scenes)
    causal = measure(model, scenes)
    with tempfile.TemporaryDirectory() as tmp:
        if args.qformer_model is None:
            qmodel, note = tiny_random_instructblip(Path(tmp)), "a tiny RANDOM InstructBLIP, not a trained one"
        else:
            qmodel = HookedVLM.from_pretrained(args.qformer_model, device=args.device, dtype=args.dtype)
            note = args.qformer_model
        qformer = measure(qmodel, scenes)
    frame = pd.concat([causal.to_frame(), qformer.to_frame().assign(model=note)], ignore_index=True)
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print("\n" + describe(causal, qformer, note))

    fig = viz.layer_curve(
        {f"causal, image first ({causal.name})": np.maximum(causal.cosine_distance.mean(0), 1e-12),
         f"Q-Former ({note})": np.maximum(qformer.cosine_distance.mean(0), 1e-12)},
        ylabel="1 - cos, same image token, two prompts", title="Prompt dependence of visual tokens",
    )
    fig.axes[0].set_yscale("log")
    common.finish(common.write_outputs(args.out, {"prompt_dependence": frame}, {"prompt_dependence": fig}))
    return causal, qformer


if __name__ == "__main__":
    main()
