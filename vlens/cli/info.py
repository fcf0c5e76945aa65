"""``vlens info``: what vlens sees in a model (family, sizes, hook names, token layout)."""

from __future__ import annotations

from typing import Optional, Sequence

import click

from vlens.cli._common import DEFAULT_MODEL, device_option, dtype_option


@click.command()
@click.argument("model_name", metavar="MODEL", default=DEFAULT_MODEL)
@device_option()
@dtype_option()
@click.option("--stage", default=None, help="List every hook name of this stage (vision, connector, language, ...).")
def info(model_name: str, device: Optional[str], dtype: Optional[str], stage: Optional[str]) -> None:
    """Family, size, hook names by stage and the token layout of a sample input.

    \b
    Examples:
      vlens info toy
      vlens info ./my-vlm --stage connector
    """
    from vlens import HookedVLM
    from vlens.data import CAPTION_QUESTION, generate_scene

    model = HookedVLM.from_pretrained(model_name, device=device, dtype=dtype)
    cfg = model.cfg
    facts = model.adapter.describe()
    click.echo(f"model:        {model.name}")
    click.echo(f"family:       {facts.get('family')}")
    click.echo(f"layers:       {model.n_layers}   d_model: {cfg.d_model}   heads: {cfg.n_heads}   vocab: {cfg.d_vocab}")
    click.echo(f"image token:  {facts.get('image_token')!r} (id {facts.get('image_token_id')})")
    click.echo(f"dtype/device: {model.dtype} / {model.device}")
    click.echo("hooks by stage:")
    for name in model.adapter.stage_prefixes:
        names = model.hook_names(name)
        sample = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        click.echo(f"  {name:<10} {len(names):>4}  {sample}")
    if stage is not None:
        click.echo(f"every {stage} hook:")
        for hook in model.hook_names(stage):
            click.echo(f"  {hook}")
    inputs = model.prepare(generate_scene(0, **model.adapter.scene_geometry().scene_kwargs()).image, CAPTION_QUESTION)
    layout = inputs.layout
    tokens = model.to_str_tokens(inputs)
    click.echo(f"sample input: generated scene 0 + {CAPTION_QUESTION!r} -> {int(layout.lengths[0])} tokens")
    for seg in ("prefix", "image", "marker", "instruction"):
        pos = layout.mask(seg)[0].nonzero().flatten().tolist()
        if not pos:
            continue
        shown = " ".join(tokens[p] for p in pos[:6]) + (" ..." if len(pos) > 6 else "")
        click.echo(f"  {seg:<12} {len(pos):>4} tokens at {_ranges(pos)}: {shown}")
    for i, span in enumerate(layout.images[0]):
        if span.grid:
            where = f"{span.grid[0]}x{span.grid[1]} grid"
        elif span.query_attention is not None:
            rows, cols = span.query_attention.shape[1:]
            where = f"no grid (query tokens; heatmaps spread them over the {rows}x{cols} patches they attend to)"
        else:
            where = "no grid (query tokens)"
        click.echo(f"  image {i}: {span.n_tokens} tokens, {where}, tiles {sorted(span.tile_grids) or '-'}")


def _ranges(positions: Sequence[int]) -> str:
    out: list[str] = []
    start: Optional[int] = None
    prev = 0  # read only once start is set, which sets it too
    for p in positions:
        if start is None:
            start = prev = p
        elif p == prev + 1:
            prev = p
        else:
            out.append(f"{start}-{prev}" if prev != start else str(start))
            start = prev = p
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else str(start))
    return ",".join(out)
