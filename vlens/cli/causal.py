"""The causal commands: ``knockout``, ``patching`` and ``attribution``.

``knockout`` blocks attention between two spans over windows of layers; ``patching`` and
``attribution`` compare the example (clean) with a corrupted one: another image of the same
size (``--corrupt-image``, or by default the generated scene of ``--corrupt-seed``) with the
same prompt, or another prompt with as many tokens (``--corrupt-prompt``).
"""

from __future__ import annotations

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

SPANS = ["predictor", "image", "instruction", "prefix", "answer", "last", "text", "real"]
KIND_CHOICES = ["resid_pre", "attn_out", "mlp_out"]


@click.command()
@example_options
@click.option("--query", type=click.Choice(SPANS), default="predictor", show_default=True,
              help="Span whose attention is blocked (predictor: the token predicting the answer).")
@click.option("--key", type=click.Choice(SPANS), default="image", show_default=True, help="Span it may not attend to.")
@click.option("--sizes", callback=int_list, default="1", show_default=True, metavar="N,N,...",
              help="Window sizes (layers); every window of each size is run.")
@figure_option
@table_option
@with_setup(need_answer=True)
def knockout(setup: Setup, query: str, key: str, sizes: list[int], figure: Optional[str], table_path: Optional[str]) -> None:
    """Attention knockout: the answer's log-probability with QUERY -> KEY attention blocked per layer window.

    \b
    Examples:
      vlens knockout
      vlens knockout --query instruction --key image --sizes 1,2 --figure knockout.png
    """
    from vlens.analysis.flow_knockout import attention_knockout
    from vlens.viz.causal import knockout_figure

    result = attention_knockout(setup.model, setup.inputs, query, key, sizes=sizes)
    say(f"route {result.route!r}, engine {result.engine!r}{' (' + result.engine_reason + ')' if result.engine_reason else ''}")
    frame = result.to_frame()
    print_table(frame)
    save_figure(knockout_figure(result) if figure else None, figure)
    save_table(frame if table_path else None, table_path)


corrupt_options = [
    click.option("--corrupt-image", type=click.Path(dir_okay=False), default=None, metavar="PATH",
                 help="The corrupted image (same size as the clean one)."),
    click.option("--corrupt-seed", type=int, default=1, show_default=True,
                 help="Without --corrupt-image: the generated scene of this seed."),
    click.option("--corrupt-prompt", default=None, help="A corrupted prompt (same number of tokens) instead."),
    click.option("--foil", default=None, help="Token the logit difference is taken against (default: none; prob only)."),
    click.option("--kinds", default="resid_pre,attn_out,mlp_out", show_default=True, help="Activation kinds."),
]


def _corrupted(setup: Setup, corrupt_image: Optional[str], corrupt_seed: int, corrupt_prompt: Optional[str]):
    from vlens.images import to_rgb

    if corrupt_prompt is not None:
        return setup.model.prepare(setup.image, corrupt_prompt, answer=setup.answer)
    if corrupt_image is not None:
        image = to_rgb(corrupt_image)
    else:
        from vlens.data import generate_scene

        image = generate_scene(corrupt_seed, **setup.model.adapter.scene_geometry().scene_kwargs()).image
    return setup.model.prepare(image, setup.prompt, answer=setup.answer)


def _kinds(value: str) -> list[str]:
    kinds = [k.strip() for k in value.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KIND_CHOICES]
    if bad or not kinds:
        raise click.BadParameter(f"{bad or value!r}; choose from {KIND_CHOICES}", param_hint="--kinds")
    return kinds


def _with_corrupt(fn):
    for option in reversed(corrupt_options):
        fn = option(fn)
    return fn


@click.command()
@example_options
@_with_corrupt
@click.option("--layers", callback=int_list, default=None, metavar="L,L,...", help="Layers to patch (default all).")
@figure_option
@table_option
@with_setup(need_answer=True)
def patching(setup: Setup, corrupt_image, corrupt_seed, corrupt_prompt, foil, kinds, layers, figure, table_path) -> None:
    """Activation patching: each clean activation (per layer, visual token) patched into the corrupted run.

    \b
    Examples:
      vlens patching
      vlens patching --corrupt-seed 3 --kinds resid_pre --figure patching.png
    """
    from vlens.analysis.patching import activation_patching
    from vlens.viz.causal import patching_heatmaps

    corrupted = _corrupted(setup, corrupt_image, corrupt_seed, corrupt_prompt)
    result = activation_patching(setup.model, setup.inputs, corrupted, foil=foil, kinds=_kinds(kinds), layers=layers)
    frame = result.to_frame()
    print_table(frame.sort_values("prob", ascending=False).head(20))
    value = "normalized" if foil is not None else "prob"
    fig = patching_heatmaps(result, setup.inputs.layout, kind=result.kinds[0], value=value) if figure else None
    save_figure(fig, figure)
    save_table(frame if table_path else None, table_path)


@click.command()
@example_options
@_with_corrupt
@click.option("--metric", type=click.Choice(["logit_diff", "prob"]), default="prob", show_default=True)
@click.option("--exact/--no-exact", default=False, show_default=True,
              help="Also run exact patching and print the rank correlation with it.")
@table_option
@with_setup(need_answer=True)
def attribution(setup: Setup, corrupt_image, corrupt_seed, corrupt_prompt, foil, kinds, metric, exact, table_path) -> None:
    """Attribution patching: the gradient estimate of patching (two forwards, one backward).

    \b
    Examples:
      vlens attribution
      vlens attribution --exact
    """
    from vlens.analysis.attribution import attribution_patching, rank_agreement
    from vlens.analysis.patching import activation_patching

    corrupted = _corrupted(setup, corrupt_image, corrupt_seed, corrupt_prompt)
    chosen = _kinds(kinds)
    result = attribution_patching(setup.model, setup.inputs, corrupted, foil=foil, metric=metric, kinds=chosen)
    frame = result.to_frame()
    print_table(frame.reindex(frame["estimate"].abs().sort_values(ascending=False).index).head(20))
    if exact:
        exact_result = activation_patching(setup.model, setup.inputs, corrupted, foil=foil, kinds=chosen)
        rho = rank_agreement(result, exact_result)[0]
        for kind, value in zip(result.kinds, rho.tolist()):
            click.echo(f"Spearman rank correlation with exact patching, {kind}: {value:.3f}")
    save_table(frame if table_path else None, table_path)
