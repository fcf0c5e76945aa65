"""Finding: how much the text tokens attend to the image, and to which of its tokens.

Claim: text tokens put a layer-dependent share of their attention on the image tokens, and
within the image they attend to the patches that show objects more than to the background
(per image token, averaged over layers and heads). Sink tokens (image tokens receiving more than
5x the median attention) are reported, with how many of them are background patches.

Method: held-out synthetic scenes (vlens.data), each with its colour question and answer
("what colour is the triangle ?" -> "red"); `vlens.analysis.attention_to_image` with the
instruction tokens as queries (and, reported alongside, the answer tokens): per block and head
the attention mass on image keys, per image token the attention it receives (mean over heads
and queries); `vlens.analysis.find_sink_tokens(factor=5)`. Ground truth says which image tokens
are object patches (and which object the question is about). Test (pre-declared): per scene,
the mean over blocks of the attention an object patch receives minus that a background patch
receives > 0, one-sided sign test over scenes, reproduced when p < 0.01.

Model: "toy" by default; any checkpoint with a patch grid (--model llava-hf/llava-1.5-7b-hf
--device cuda --dtype float16; eager attention is what exposes the patterns).

Prints: per block the attention mass from instruction and answer tokens (mean over heads and
scenes; and what uniform attention over the visible keys would give), the attention received per object / background / asked-about-object patch, the share
of image tokens that are sinks and the share of sinks on background; the verdict.
Draws: attention_mass.png (block x head and per-block curves), attention_received.png
(received per block by patch kind), attention_map.png (received, first scene, per block),
attention_sinks.png (how often each grid cell is a sink, at the block with the most sinks).
Writes attention_to_image.csv.
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
from vlens.viz.lens_panel import pick_layers  # noqa: E402

SINK_FACTOR = 5.0


@dataclass(frozen=True)
class AttentionFinding:
    """Per scene and block (``[scene, block]`` unless said otherwise).

    Attributes:
        mass_instruction: Attention mass from instruction queries on image keys, ``[scene, block, head]``.
        mass_answer: The same from answer queries.
        recv_object: Mean attention an object patch receives (instruction queries).
        recv_background: The same for background patches.
        recv_target: The same for the patches of the object the question asks about.
        recv_other: The same for the other objects' patches (NaN with a single object).
        sink_share: Fraction of image tokens flagged as sinks.
        sink_background: Fraction of the sinks that are background patches (NaN: no sink).
        background_share: Fraction of image tokens that are background, ``[scene]``.
        uniform_mass: The mass uniform attention would put on the image from the instruction
            queries (image keys / keys each query sees, mean over queries), ``[scene]``.
        sink_count: How many scenes flag each image token, ``[block, img]`` (token order of
            the first scene's span: every scene has the same grid).
        test: (n_positive, n, p) of the sign test of object minus background.
    """

    mass_instruction: np.ndarray
    mass_answer: np.ndarray
    recv_object: np.ndarray
    recv_background: np.ndarray
    recv_target: np.ndarray
    recv_other: np.ndarray
    sink_share: np.ndarray
    sink_background: np.ndarray
    background_share: np.ndarray
    uniform_mass: np.ndarray
    sink_count: np.ndarray
    test: tuple[int, int, float]

    @property
    def reproduced(self) -> bool:
        return self.test[2] < common.ALPHA

    @property
    def object_over_background(self) -> float:
        """Mean over scenes and blocks of received(object) / received(background)."""
        return float(common.nanmean(self.recv_object.mean(1) / self.recv_background.mean(1)))

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({
            "block": np.arange(self.recv_object.shape[1]),
            "mass_instruction": self.mass_instruction.mean((0, 2)),
            "mass_answer": self.mass_answer.mean((0, 2)),
            "recv_object": common.nanmean(self.recv_object, 0), "recv_background": common.nanmean(self.recv_background, 0),
            "recv_target": common.nanmean(self.recv_target, 0), "recv_other": common.nanmean(self.recv_other, 0),
            "sink_share": self.sink_share.mean(0), "sinks_on_background": common.nanmean(self.sink_background, 0),
        })


def _per_token(result: Any, row: int, span: Any) -> np.ndarray:
    """``received`` of one row laid out in the span's token order, ``[block, n_tokens]``."""
    recv = result.received[row]
    positions = result.image_positions[row].tolist()
    where = {int(p): j for j, p in enumerate(positions)}
    return recv[:, [where[int(p)] for p in span.positions]].numpy()


def measure(model: Any, scenes: Sequence[Scene], batch_size: int = 16) -> AttentionFinding:
    """Attention to the image over ``scenes`` and the object-vs-background test (module doc)."""
    if common.image_grid(model) is None:
        raise ValueError("this finding needs visual tokens on a patch grid; Q-Former query tokens have none")
    fields: dict[str, list] = {k: [] for k in ("mi", "ma", "obj", "bg", "tgt", "oth", "share", "sbg", "bgs", "uni")}
    sink_count: Optional[np.ndarray] = None
    for chunk in common.batched(scenes, batch_size):
        qas = [common.colour_question(s) for s in chunk]
        inputs = model.prepare([s.image for s in chunk], [qa.question for qa in qas], answer=[qa.answer for qa in qas])
        with torch.no_grad():
            _, cache = model.run_with_cache(inputs, names_filter=va.attention.required_hooks(model))
        instr = va.attention_to_image(cache, query="instruction")
        answer = va.attention_to_image(cache, query="answer")
        sinks = va.find_sink_tokens(instr, factor=SINK_FACTOR)
        for row, (scene, qa) in enumerate(zip(chunk, qas)):
            span = inputs.layout.images[row][0]
            owner = common.token_objects(scene, span)
            recv = _per_token(instr, row, span)  # [block, tok]
            flags = _per_token(SimpleNamespace(
                received=sinks.is_sink.float(), image_positions=sinks.image_positions), row, span) > 0
            target = common.target_object(scene, qa)
            fields["mi"].append(instr.mass[row].numpy())
            fields["ma"].append(answer.mass[row].numpy())
            fields["obj"].append(common.masked_mean(recv, owner >= 0))
            fields["bg"].append(common.masked_mean(recv, owner < 0))
            fields["tgt"].append(common.masked_mean(recv, owner == target))
            fields["oth"].append(common.masked_mean(recv, (owner >= 0) & (owner != target)))
            fields["share"].append(flags.mean(1))
            n_sinks = flags.sum(1)
            on_bg = (flags & (owner < 0)).sum(1)
            fields["sbg"].append(np.where(n_sinks > 0, on_bg / np.maximum(n_sinks, 1), np.nan))
            fields["bgs"].append(float((owner < 0).mean()))
            queries = instr.query_positions[row]
            queries = queries[queries >= 0].double()
            image = inputs.layout.image_positions(row)
            seen = (image[None, :] <= queries[:, None]).sum(1).double()
            fields["uni"].append(float((seen / (queries + 1)).mean()))
            sink_count = flags.astype(np.int64) if sink_count is None else sink_count + flags
    arr = {k: np.array(v) if k in ("bgs", "uni") else np.stack(v) for k, v in fields.items()}
    diff = arr["obj"].mean(1) - arr["bg"].mean(1)
    return AttentionFinding(
        mass_instruction=arr["mi"], mass_answer=arr["ma"], recv_object=arr["obj"], recv_background=arr["bg"],
        recv_target=arr["tgt"], recv_other=arr["oth"], sink_share=arr["share"], sink_background=arr["sbg"],
        background_share=arr["bgs"], uniform_mass=arr["uni"], sink_count=sink_count, test=common.sign_test(diff),
    )


def describe(f: AttentionFinding) -> str:
    mi, ma = f.mass_instruction.mean((0, 2)), f.mass_answer.mean((0, 2))
    share = f.sink_share.mean(0)
    sb = int(share.argmax())
    sink_bg = common.nanmean(f.sink_background[:, sb])
    return "\n".join([
        f"attention mass on the image: instruction queries {mi.min():.3f}..{mi.max():.3f} (peak at block "
        f"{int(mi.argmax())}; uniform attention would give {f.uniform_mass.mean():.3f}), answer queries "
        f"{ma.min():.3f}..{ma.max():.3f} (peak at block {int(ma.argmax())})",
        f"sinks (> {SINK_FACTOR:g}x median): at most {share[sb]:.1%} of image tokens (block {sb}), "
        f"{sink_bg:.0%} of them background (background is {f.background_share.mean():.0%} of the tokens)",
        f"{common.verdict(f.reproduced)}: an object patch receives {f.object_over_background:.2f}x the attention of a "
        f"background patch (mean over blocks and scenes); higher in {f.test[0]}/{f.test[1]} scenes, sign test "
        f"p = {common.fmt_p(f.test[2])}; the asked-about object's patches receive "
        f"{common.nanmean(f.recv_target.mean(1) / f.recv_background.mean(1)):.2f}x background",
    ])


def main(argv: Optional[Sequence[str]] = None) -> AttentionFinding:
    args = common.parser(__doc__, n_scenes=40).parse_args(argv)
    model = common.load_model(args)
    scenes = common.heldout_scenes(model, args.n_scenes, args.seed)
    common.announce("Attention from the instruction/answer tokens to the image tokens", model, scenes)
    finding = measure(model, scenes, batch_size=args.batch_size)
    frame = finding.to_frame()
    common.print_table(frame)
    print("\n" + describe(finding))

    mass_fig = viz.attention_mass_figure(SimpleNamespace(mass=torch.tensor(finding.mass_instruction)),
                                         title="instruction tokens -> image tokens (mean over scenes)")
    recv_fig = viz.layer_curve(
        {"object patch": common.nanmean(finding.recv_object, 0),
         "asked-about object": common.nanmean(finding.recv_target, 0),
         "background patch": common.nanmean(finding.recv_background, 0)},
        axis="block", ylabel="attention received per token", title="Which image tokens the instruction reads",
    )
    qa = common.colour_question(scenes[0])
    first = model.prepare(scenes[0].image, qa.question, answer=qa.answer)
    with torch.no_grad():
        _, cache = model.run_with_cache(first, names_filter=va.attention.required_hooks(model))
    recv = va.attention_to_image(cache, query="instruction").row(0).received
    span, picture = first.layout.images[0][0], viz.model_view_image(first, model.processor)
    blocks = pick_layers(model.n_layers, 8)
    map_fig = viz.heatmap_grid([(f"block {b}", viz.span_values(recv[b], first.layout)) for b in blocks], span, picture,
                               label=f"attention received ({qa.question!r})", shared_range=False)
    sb = int(finding.sink_share.mean(0).argmax())
    sink_fig = viz.image_heatmap(finding.sink_count[sb] / len(scenes), span, picture, vmin=0, vmax=1,
                                 title=f"how often each token is a sink (block {sb})", label="fraction of scenes")
    common.finish(common.write_outputs(
        args.out, {"attention_to_image": frame},
        {"attention_mass": mass_fig, "attention_received": recv_fig, "attention_map": map_fig, "attention_sinks": sink_fig},
    ))
    return finding


if __name__ == "__main__":
    main()
