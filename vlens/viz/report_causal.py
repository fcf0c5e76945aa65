"""The report's sections of the causal tools: attention knockout and activation patching."""

from __future__ import annotations

from typing import Callable

import pandas as pd
import PIL.ImageOps

from vlens.analysis.flow_knockout import attention_knockout
from vlens.analysis.patching import activation_patching
from vlens.viz._guide import FIGURE_GUIDE
from vlens.viz._html import data_table, figure_block, figure_png
from vlens.viz._report_page import Section, _Context, _guarded
from vlens.viz.causal import knockout_figure, patching_heatmaps

FLOWS = (("predictor", "image"), ("predictor", "instruction"), ("instruction", "image"))


@_guarded("knockout", "Attention knockout")
def _knockout_section(ctx: _Context) -> Section:
    frames, body = [], ""
    for query, key in FLOWS:
        result = attention_knockout(ctx.model, ctx.inputs, query, key, sizes=(1,))
        body += figure_block(
            figure_png(knockout_figure(result)),
            f"Change of the answer's log-probability when {query} may not attend to {key} in one layer "
            f"(scores masked before the softmax; route {result.route!r}, engine {result.engine!r}).",
            fig_id=f"fig-knockout-{query}-{key}", guide=FIGURE_GUIDE[f"fig-knockout-{query}-{key}"],
        )
        frames.append(result.to_frame())
    frame = pd.concat(frames, ignore_index=True)
    body += data_table(frame, max_rows=24)
    return Section("knockout", "Attention knockout", body, tables={"knockout": frame})


@_guarded("patching", "Activation patching")
def _patching_section(ctx: _Context) -> Section:
    # The corrupted input: the same image mirrored left to right (same size, so the same tokens).
    mirrored = PIL.ImageOps.mirror(ctx.inputs.images[0][0])
    corrupted = ctx.model.prepare(mirrored, ctx.inputs.prompts[0], answer=ctx.inputs.answers[0])
    result = activation_patching(ctx.model, ctx.inputs, corrupted, kinds=["resid_pre"])
    body = figure_block(
        figure_png(patching_heatmaps(result, ctx.inputs.layout, ctx.image, kind="resid_pre", value="prob")),
        "Probability of the first answer token when the residual stream of one visual token at one layer comes "
        "from the original image and every other from the mirrored image (corrupted run).",
        fig_id="fig-patching", guide=FIGURE_GUIDE["fig-patching"],
    )
    frame = result.to_frame()
    body += data_table(frame, max_rows=20)
    return Section("patching", "Activation patching (original vs mirrored image)", body, tables={"patching": frame})


def causal_steps() -> list[tuple[str, Callable[[_Context], Section]]]:
    """The report's causal sections, in order, as (progress name, builder)."""
    return [("attention knockout", _knockout_section), ("activation patching", _patching_section)]
