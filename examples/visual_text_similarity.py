"""Finding: how close visual-token hidden states come to text-token hidden states, layer by layer.

Claim (the "modality gap narrows" reading, tested rather than assumed): (A) the cosine similarity
between visual-token and text-token states is higher in the late layers than at the input
embeddings; (B) it rises more than the text tokens' similarity to each other does, i.e. the
relative similarity cos(visual, text) - cos(text, text) (minus the modality gap) increases. (B)
is the stricter reading: raw residual streams grow a direction shared by every token with depth,
which alone raises every cosine, and so (A).

Method: held-out synthetic scenes (vlens.data), the caption prompt; per scene
`vlens.analysis.modality_similarity(against="text_states", text="instruction")`: per layer, the
mean cosine over (image token, instruction token) pairs of the raw residual stream (index 0 =
input embeddings, n_layers + 1 entries); for reference the mean cosine between distinct
instruction tokens at the same layer. Test (pre-declared), per scene, late = layers with index
> n_layers/2: (A) mean late cos(v,t) - cos(v,t) at layer 0 > 0; (B) the same for the relative
similarity cos(v,t) - cos(t,t); each by a one-sided sign test over scenes, reproduced when
p < 0.01.

Model: "toy" by default; any checkpoint (--model llava-hf/llava-1.5-7b-hf --device cuda
--dtype float16); Q-Former models work too (their query tokens are the visual tokens).

Prints: per layer cos(visual, text), cos(text, text) and their difference (mean and std over
scenes); the
two verdicts with their sign tests. Draws: similarity_curves.png (the three curves),
similarity_map.png (per visual token, its similarity to the text at the last layer, over the
first scene). Writes similarity_curves.csv.
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
from vlens import viz  # noqa: E402
from vlens.data import CAPTION_QUESTION, Scene  # noqa: E402

TEXT = "instruction"


@dataclass(frozen=True)
class SimilarityFinding:
    """Per scene and layer (index 0 = input embeddings), ``[scene, layer]`` arrays.

    Attributes:
        visual_text: Mean cos(image token, instruction token).
        text_text: Mean cos between distinct instruction tokens.
        late: The late layers (index > n_layers/2) the tests average.
        rise: (n_positive, n, p) of the sign test of (A); relative_rise: the same for (B).
    """

    visual_text: np.ndarray
    text_text: np.ndarray
    late: tuple[int, ...]
    rise: tuple[int, int, float]
    relative_rise: tuple[int, int, float]

    @property
    def relative(self) -> np.ndarray:
        """cos(visual, text) - cos(text, text): minus the modality gap."""
        return self.visual_text - self.text_text

    @property
    def rises(self) -> bool:
        return self.rise[2] < common.ALPHA

    @property
    def rises_relative(self) -> bool:
        return self.relative_rise[2] < common.ALPHA

    @property
    def reproduced(self) -> bool:
        return self.rises and self.rises_relative

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({
            "layer": np.arange(self.visual_text.shape[1]),
            "cos_visual_text": self.visual_text.mean(0), "std_visual_text": self.visual_text.std(0),
            "cos_text_text": self.text_text.mean(0), "std_text_text": self.text_text.std(0),
            "visual_minus_text": self.relative.mean(0),
        })


def _text_text(cache: Any, model: Any, row: int, positions: torch.Tensor) -> np.ndarray:
    """Per layer, the mean cosine between distinct text tokens of one row."""
    names = va.similarity.required_hooks(model)
    states = torch.stack([cache[n][row, positions.to(cache[n].device)].float().cpu() for n in names])
    unit = states / states.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    cos = unit @ unit.transpose(1, 2)  # [layer, txt, txt]
    n = cos.shape[-1]
    return ((cos.sum((1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(-1)) / (n * (n - 1))).numpy()


def measure(model: Any, scenes: Sequence[Scene], batch_size: int = 16) -> SimilarityFinding:
    """Similarity curves over ``scenes`` and the two sign tests (module doc)."""
    vt, tt = [], []
    for chunk in common.batched(scenes, batch_size):
        inputs = model.prepare([s.image for s in chunk], [CAPTION_QUESTION] * len(chunk))
        with torch.no_grad():
            _, cache = model.run_with_cache(inputs, names_filter=va.similarity.required_hooks(model))
        sim = va.modality_similarity(model, cache, against="text_states", text=TEXT)
        vt.append(sim.per_layer.numpy())
        for row in range(len(chunk)):
            text_pos = inputs.layout.mask(TEXT)[row].nonzero().flatten()
            if text_pos.numel() < 2:
                raise ValueError(f"the prompt has {text_pos.numel()} instruction token(s); need 2 for cos(text, text)")
            tt.append(_text_text(cache, model, row, text_pos))
    visual_text, text_text = np.concatenate(vt), np.stack(tt)
    n_layers = visual_text.shape[1] - 1
    late = tuple(l for l in range(n_layers + 1) if l > n_layers / 2)
    rise = visual_text[:, late].mean(1) - visual_text[:, 0]
    relative = visual_text - text_text
    relative_rise = relative[:, late].mean(1) - relative[:, 0]
    return SimilarityFinding(
        visual_text=visual_text, text_text=text_text, late=late,
        rise=common.sign_test(rise), relative_rise=common.sign_test(relative_rise),
    )


def describe(f: SimilarityFinding) -> str:
    vt, rel = f.visual_text.mean(0), f.relative.mean(0)
    late = list(f.late)
    return "\n".join([
        f"(A) cos(visual, text) rises: {common.verdict(f.rises)}: layer 0 {vt[0]:.3f} -> late layers "
        f"{late[0]}..{late[-1]} {vt[late].mean():.3f} (peak {vt.max():.3f} at layer {int(vt.argmax())}); "
        f"higher in {f.rise[0]}/{f.rise[1]} scenes, sign test p = {common.fmt_p(f.rise[2])}",
        f"(B) cos(visual,text) - cos(text,text) rises: {common.verdict(f.rises_relative)}: layer 0 "
        f"{rel[0]:+.3f} -> late layers {rel[late].mean():+.3f}; higher in {f.relative_rise[0]}/"
        f"{f.relative_rise[1]} scenes, sign test p = {common.fmt_p(f.relative_rise[2])}",
    ])


def main(argv: Optional[Sequence[str]] = None) -> SimilarityFinding:
    args = common.parser(__doc__, n_scenes=40).parse_args(argv)
    model = common.load_model(args)
    scenes = common.heldout_scenes(model, args.n_scenes, args.seed)
    common.announce("Visual vs text hidden states: cosine similarity per layer", model, scenes)
    finding = measure(model, scenes, batch_size=args.batch_size)
    frame = finding.to_frame()
    common.print_table(frame)
    print("\n" + describe(finding))

    curves = viz.layer_curve(
        {"cos(visual, text)": finding.visual_text.mean(0), "cos(text, text)": finding.text_text.mean(0),
         "cos(visual, text) - cos(text, text)": finding.relative.mean(0)},
        ylabel="mean cosine similarity", title=f"Visual vs {TEXT} tokens, {len(scenes)} scenes",
    )
    first = model.prepare(scenes[0].image, CAPTION_QUESTION)
    with torch.no_grad():
        _, cache = model.run_with_cache(first, names_filter=va.similarity.required_hooks(model))
    sim = va.modality_similarity(model, cache, against="text_states", text=TEXT)
    span = first.layout.images[0][0]
    heat = viz.image_heatmap(
        viz.span_values(sim.row(0).per_token[-1], first.layout), span, viz.model_view_image(first, model.processor),
        title=f"cos(visual token, {TEXT}) at layer {model.n_layers}", label="cosine",
    )
    common.finish(common.write_outputs(args.out, {"similarity_curves": frame},
                                       {"similarity_curves": curves, "similarity_map": heat}))
    return finding


if __name__ == "__main__":
    main()
