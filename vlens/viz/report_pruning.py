"""The report's sections for visual-token pruning and the contextual lens.

Kept out of ``report.py`` (which calls :data:`SECTIONS`) so that file stays one screenful of
plumbing per analysis; each section is built the way the others are (``_guarded``: a failure
becomes a visible note).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from vlens import analysis as va
from vlens.viz._guide import FIGURE_GUIDE
from vlens.viz._html import data_table, figure_block, figure_png
from vlens.viz._report_page import Section, _guarded
from vlens.viz.pruning import contextual_panel, contextual_summary, pruning_figure, pruning_summary

if TYPE_CHECKING:
    from vlens.viz._report_page import _Context

REPORT_KEEP = (0.1, 0.25, 0.5, 0.75, 1.0)
BANK_SIZE = 200
"""Contexts of the report's contextual-lens bank: captions of generated scenes."""


def report_layers(n_layers: int) -> list[int]:
    """The K values the report prunes at: 2 (FastV's) and the middle layer, within 1..n_layers."""
    return sorted({min(2, n_layers), max(1, n_layers // 2)})


@_guarded("pruning", "Visual-token pruning (FastV)")
def pruning_section(ctx: "_Context") -> Section:
    """Loss, exact match and FLOPs over keep fractions at K = 2 and the middle layer, two rankings."""
    result = va.prune_visual_tokens(ctx.model, ctx.inputs, layers=report_layers(ctx.model.n_layers),
                                    keep=REPORT_KEEP, rankings=("attention", "random"))
    body = figure_block(
        figure_png(pruning_figure(result)),
        "Blocks before K see every token; from K on only the kept visual tokens remain (ranked by the attention "
        "the last prompt token pays them in block K-1, or at random). Exact match: greedy decoding reproduces "
        "the answer token for token.",
        fig_id="fig-pruning", guide=FIGURE_GUIDE["fig-pruning"],
    )
    summary = pruning_summary(result)
    body += data_table(summary, max_rows=40)
    return Section("pruning", "Visual-token pruning (FastV)", body, tables={"pruning": result.to_frame()})


@_guarded("contextual_lens", "Contextual lens on visual tokens")
def contextual_lens_section(ctx: "_Context") -> Section:
    """The contextual lens over a bank of generated captions, beside the logit lens's match rate."""
    model = ctx.model
    contexts = va.contextual.scene_captions(BANK_SIZE)
    with torch.no_grad():
        _, cache = model.run_with_cache(ctx.inputs, names_filter=va.contextual.required_hooks(model))
    lens = ctx.results.get("lens")
    batched_lens = None if lens is None or isinstance(lens, Exception) else lens
    labels = None if batched_lens is None or batched_lens.label_ids is None else batched_lens.label_ids
    result = va.contextual_lens(model, cache, contexts, k=5, labels=labels)
    body = figure_block(
        figure_png(contextual_panel(result, ctx.inputs.layout, model.tokenizer)),
        f"Per layer, the word of the text-token state nearest (cosine, same layer) to each visual token, over a bank "
        f"of {result.n_bank_tokens} token states from {result.n_contexts} generated captions run through the model.",
        fig_id="fig-contextual-lens", guide=FIGURE_GUIDE["fig-contextual-lens"],
    )
    body += data_table(contextual_summary(result, ctx.inputs.layout, model.tokenizer, lens=batched_lens))
    return Section("contextual_lens", "Contextual lens on visual tokens", body, tables={"contextual_lens": result.to_frame()})


SECTIONS: tuple[tuple[str, Callable[["_Context"], Section]], ...] = (
    ("visual-token pruning (FastV)", pruning_section),
    ("contextual lens", contextual_lens_section),
)
