"""``vlens prune`` and ``vlens contextual-lens``: visual-token pruning (FastV) and the
contextual lens (LatentLens-style) on one image and prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from vlens.cli._common import (
    Setup,
    example_options,
    figure_option,
    int_list,
    print_table,
    save_figure,
    save_table,
    say,
    table_option,
    with_setup,
)


def float_list(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[list[float]]:
    """Click callback: ``"0.25,0.5"`` -> ``[0.25, 0.5]`` (None when not given)."""
    if value is None or value == "":
        return None
    try:
        items = [float(v) for v in value.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers such as 0.25,0.5, got {value!r}") from None
    if not items:
        raise click.BadParameter("expected at least one number")
    return items


def name_list(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    """Click callback: ``"attention,random"`` -> ``["attention", "random"]`` (checked by the analysis)."""
    return [v for v in value.replace(" ", "").split(",") if v]


@click.command()
@example_options
@click.option("--layers", callback=int_list, default="2", show_default=True, metavar="K,K,...",
              help="Layers K: blocks before K see every token, blocks from K on only the kept ones.")
@click.option("--keep", callback=float_list, default="0.25,0.5,0.75,1", show_default=True, metavar="R,R,...",
              help="Fractions of the visual tokens kept (FastV's R is the fraction dropped: keep = 1 - R).")
@click.option("--rankings", callback=name_list, default="attention,random", show_default=True,
              metavar="NAME,...", help="Which tokens are kept: attention (FastV), random, contribution (oracle).")
@figure_option
@table_option
@with_setup(need_answer=True)
def prune(setup: Setup, layers: list[int], keep: list[float], rankings: list[str], figure: Optional[str],
          table_path: Optional[str]) -> None:
    """Visual-token pruning (FastV): answer loss, exact match and FLOPs with tokens dropped after layer K.

    \b
    Examples:
      vlens prune
      vlens prune --layers 1,2,4 --keep 0.1,0.5 --rankings attention,random,contribution --figure prune.png
    """
    from vlens.analysis import prune_visual_tokens
    from vlens.viz.pruning import pruning_figure, pruning_summary

    result = prune_visual_tokens(setup.model, setup.inputs, layers=layers, keep=keep, rankings=rankings)
    say(f"unpruned answer loss {float(result.full_loss[0]):.4f}, exact match {bool(result.full_exact[0])}")
    print_table(pruning_summary(result))
    save_figure(pruning_figure(result) if figure else None, figure)
    save_table(result.to_frame() if table_path else None, table_path)


@click.command("contextual-lens")
@example_options
@click.option("--contexts", "contexts_path", type=click.Path(dir_okay=False, exists=True), default=None, metavar="PATH",
              help="Text file, one context (e.g. a caption) per line. Default: 200 generated scene captions.")
@click.option("--layers", callback=int_list, default=None, metavar="L,L,...",
              help="Layer indices 0..n_layers (0 = embeddings). Default: all.")
@click.option("-k", "k", type=click.IntRange(1), default=5, show_default=True, help="Neighbours per token and layer.")
@click.option("--chunk-size", type=click.IntRange(1), default=16, show_default=True,
              help="Contexts per forward pass of the bank (bounds memory).")
@figure_option
@table_option
@with_setup(need_answer=False)
def contextual_lens(setup: Setup, contexts_path: Optional[str], layers: Optional[list[int]], k: int, chunk_size: int,
                    figure: Optional[str], table_path: Optional[str]) -> None:
    """Contextual lens: each visual token's nearest text-token states (same layer) in a bank of contexts.

    \b
    Examples:
      vlens contextual-lens
      vlens contextual-lens --contexts captions.txt --layers 0,4,8 --figure contextual.png --table nn.csv
    """
    import torch

    from vlens import analysis as va
    from vlens.viz.lens_panel import decoder
    from vlens.viz.pruning import contextual_panel, contextual_summary

    if contexts_path is None:
        contexts = va.contextual.scene_captions()
    else:
        contexts = [line.strip() for line in Path(contexts_path).read_text(encoding="utf-8").splitlines() if line.strip()]
        if not contexts:
            raise click.ClickException(f"{contexts_path} holds no non-empty line; put one context per line")
    model = setup.model
    with torch.no_grad():
        _, cache = model.run_with_cache(setup.inputs, names_filter=va.contextual.required_hooks(model))
    labels = setup.lens_label_ids()
    lens = va.logit_lens(model, cache, k=k, layers=layers, labels=labels) if labels is not None else None
    result = va.contextual_lens(model, cache, contexts, layers=layers, k=k, labels=labels, chunk_size=chunk_size)
    say(f"bank: {result.n_bank_tokens} token states from {result.n_contexts} contexts")
    print_table(contextual_summary(result, setup.inputs.layout, model.tokenizer, lens=lens))
    save_figure(contextual_panel(result, setup.inputs.layout, model.tokenizer) if figure else None, figure)
    if table_path:
        frame = result.to_frame()
        decode = decoder(model.tokenizer)
        frame["token"] = frame["token_id"].map(lambda t: decode(int(t)))
        save_table(frame, table_path)
