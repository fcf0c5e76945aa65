"""The commands that analyse one image and prompt: ``report`` and one command per analysis.

Each runs on the shipped toy model and a generated scene when given no ``--model`` or
``--image``. ``--figure PATH.png`` draws the analysis's figure; ``--table PATH`` writes its
full result table (``report --table-format`` picks the format of the report's tables).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

import click

from vlens.cli._common import (
    TABLE_FORMATS,
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

if TYPE_CHECKING:
    from vlens.analysis.similarity import Against
    from vlens.analysis.tokens import Estimator
    from vlens.viz._report_page import DataFormat

DEFAULT_OUT = "vlens-report"

# Options with a click.Choice are annotated with the Literal of their choices: click has
# checked the value against them before the command runs.

# ---- report ------------------------------------------------------------------------


@click.command()
@example_options
@click.option("--out", default=DEFAULT_OUT, show_default=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Folder for report.html and data/.")
@click.option("--table-format", type=click.Choice(TABLE_FORMATS), default="csv", show_default=True,
              help="Format of the tables in DIR/data/.")
@click.option("--layers", "attention_layers", callback=int_list, default=None, metavar="L,L,...",
              help="Layers of the attention-pattern view (default: all for <= 4 layers; else first, middle and last "
                   "for models with few heads, the middle one for many).")
@with_setup(need_answer=True)
def report(setup: Setup, out: str, table_format: DataFormat, attention_layers: Optional[list[int]]) -> None:
    """Run every analysis on one image and prompt; write one self-contained HTML report.

    Writes DIR/report.html (figures and the CircuitsVis bundle embedded: it opens from
    disk with no network) and DIR/data/*.csv, the tables behind every figure.

    \b
    Examples:
      vlens report
      vlens report --seed 7 --out scene7
      vlens report --model ./my-vlm --image cat.jpg --prompt "What animal is this?" --answer "A cat."
      vlens report --device cuda --dtype float16 --table-format parquet
    """
    from vlens.viz.report import build_report

    meta = {"image": setup.source, "answer source": setup.answer_source}
    if setup.answer_source == "given":
        say("generating the model's own answer for comparison ...")
        meta["model's greedy answer"] = setup.model.generate(setup.model.prepare(setup.image, setup.prompt),
                                                             max_new_tokens=20).text[0]
    # A generated scene labels the lens's image tokens with its per-patch ground truth (the report says so).
    result = build_report(setup.model, setup.inputs, scene=setup.scene,
                          attention_layers=attention_layers, meta=meta, progress=say)
    written = result.write(out, data_format=table_format)
    for title, problem in result.problems.items():
        say(f"warning: {title}: {problem}")
    click.echo(f"report written to {written['report']} ({len(written) - 1} data files in {Path(out) / 'data'})")


# ---- one command per analysis -----------------------------------------------------------


@click.command()
@example_options
@click.option("--layers", callback=int_list, default=None, metavar="L,L,...",
              help="Layer indices 0..n_layers (0 = embeddings). Default: all.")
@click.option("-k", "k", type=click.IntRange(1), default=5, show_default=True, help="Top-k tokens kept per layer and token.")
@figure_option
@table_option
@with_setup(need_answer=False)
def lens(setup: Setup, layers: Optional[list[int]], k: int, figure: Optional[str], table_path: Optional[str]) -> None:
    """Logit lens on the visual tokens: per layer, their most frequent top-1 words.

    \b
    Examples:
      vlens lens
      vlens lens --layers 0,2,4 --figure lens.png --table lens.csv
    """
    import pandas as pd

    from vlens.analysis import LensStream
    from vlens.viz.lens_panel import decoder, lens_grid, lens_panel

    labels = setup.lens_label_ids()
    if labels is not None:
        from vlens.data.ground_truth import describe_labels

        say("match rate: labels are " + describe_labels("colour", int((labels >= 0).sum()), labels.numel()))
    stream = LensStream(setup.model, positions="image", k=k, layers=layers,
                        labels=None if labels is None else (lambda _inputs, _row: labels))
    setup.run(stream)
    batched = stream.last_batch
    assert batched is not None  # set by the forward pass setup.run just ran
    result = batched.row(0)
    _, words, probs, _, _ = lens_grid(result, setup.inputs.layout, setup.model.tokenizer)
    rows = []
    for i, layer in enumerate(result.layers.tolist()):
        counts = pd.Series([w for w in words[i].ravel() if w]).value_counts().head(3)
        row = {"layer": layer, "top-1 words (count)": ", ".join(f"{w} ({n})" for w, n in counts.items()),
               "mean top-1 prob": float(pd.Series(probs[i].ravel()).mean())}
        if result.match_rate is not None:
            row["match rate"] = float(result.match_rate[i])
        rows.append(row)
    print_table(pd.DataFrame(rows))
    save_figure(lens_panel(result, setup.inputs.layout, setup.model.tokenizer) if figure else None, figure)
    if table_path:
        frame = batched.to_frame()
        decode = decoder(setup.model.tokenizer)
        frame["token"] = frame["token_id"].map(lambda t: decode(int(t)))
        save_table(frame, table_path)


@click.command()
@example_options
@click.option("--against", type=click.Choice(["text_states", "text_embeddings", "vocab"]), default="text_states",
              show_default=True, help="What visual-token states are compared with.")
@figure_option
@table_option
@with_setup(need_answer=False)
def similarity(setup: Setup, against: Against, figure: Optional[str], table_path: Optional[str]) -> None:
    """Cosine similarity of visual-token states to text, per layer (0 = embeddings).

    \b
    Examples:
      vlens similarity
      vlens similarity --against vocab --figure similarity.png
    """
    from vlens.analysis import SimilarityStream
    from vlens.viz.curves import similarity_figure

    stream = SimilarityStream(setup.model, against=against)
    setup.run(stream)
    result = stream.last_batch
    assert result is not None  # set by the forward pass setup.run just ran
    print_table(result.curve_frame())
    save_figure(similarity_figure(result) if figure else None, figure)
    save_table(result.to_frame() if table_path else None, table_path)


@click.command()
@example_options
@click.option("--query", default="instruction", show_default=True,
              help="Query positions: instruction, answer, last, text, ...")
@click.option("--layers", callback=int_list, default=None, metavar="L,L,...", help="Layers of the --html view.")
@click.option("--heads", callback=int_list, default=None, metavar="H,H,...", help="Heads of the --html view (default all).")
@click.option("--window", default="auto", show_default=True,
              help="Tokens of the --html view: auto, all, or segments such as instruction+image.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None, metavar="PATH.html",
              help="Write a standalone CircuitsVis attention view (works offline).")
@figure_option
@table_option
@with_setup(need_answer=False)
def attention(setup: Setup, query: str, layers: Optional[list[int]], heads: Optional[list[int]], window: str,
              html_path: Optional[str], figure: Optional[str], table_path: Optional[str]) -> None:
    """Attention from text to the image, per block and head.

    \b
    Examples:
      vlens attention
      vlens attention --query last --figure mass.png
      vlens attention --layers 0,1 --heads 0,1 --window instruction+image --html attention.html
    """
    import pandas as pd

    from vlens.analysis import AttentionStream
    from vlens.viz.attention import attention_view
    from vlens.viz.curves import attention_mass_figure

    stream = AttentionStream(setup.model, query=query)
    # Only the patterns the --html view draws are cached; the stream reduces every block in its hook.
    view_layers = list(range(setup.model.n_layers)) if layers is None else layers
    cache = setup.run(stream, cache_names=[f"blocks.{l}.attn.hook_pattern" for l in view_layers] if html_path else ())
    result = stream.last_batch
    assert result is not None  # set by the forward pass setup.run just ran
    mass = result.mass[0].float()
    frame = pd.DataFrame({"block": range(mass.shape[0]), "mean mass": mass.mean(1).tolist(),
                          "max mass": mass.max(1).values.tolist(), "top head": mass.argmax(1).tolist()})
    print_table(frame)
    save_figure(attention_mass_figure(result) if figure else None, figure)
    save_table(result.to_frame() if table_path else None, table_path)
    if html_path:
        view = attention_view(cache, setup.model.to_str_tokens(setup.inputs), layers=layers, heads=heads, window=window)
        target = Path(html_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        view.save(target)
        say(f"attention view written to {target}")


@click.command("count-curve")
@example_options
@click.option("--counts", callback=int_list, default=None, metavar="N,N,...",
              help="Numbers of visual tokens to keep (default: every count).")
@click.option("--order", type=click.Choice(["raster", "random"]), default="raster", show_default=True,
              help="Which tokens are kept first.")
@figure_option
@table_option
@with_setup(need_answer=True)
def count_curve(setup: Setup, counts: Optional[list[int]], order: Literal["raster", "random"], figure: Optional[str], table_path: Optional[str]) -> None:
    """Answer loss against the number of visual tokens kept.

    \b
    Examples:
      vlens count-curve
      vlens count-curve --counts 0,8,16,32,64 --order random --figure curve.png
    """
    from vlens.analysis import token_count_curve
    from vlens.viz.curves import count_curve_figure

    result = token_count_curve(setup.model, setup.inputs, counts=counts, order=order)
    frame = result.to_frame()
    print_table(frame)
    echo_engine(result.engine, result.engine_reason)
    save_figure(count_curve_figure(result) if figure else None, figure)
    save_table(frame if table_path else None, table_path)


@click.command()
@example_options
@click.option("--estimator", type=click.Choice(["drop", "gradient"]), default="drop", show_default=True,
              help="drop: remove each token in turn; gradient: first-order estimate.")
@click.option("--top", type=click.IntRange(1), default=10, show_default=True, help="How many tokens to list.")
@figure_option
@table_option
@with_setup(need_answer=True)
def contributions(setup: Setup, estimator: Estimator, top: int, figure: Optional[str], table_path: Optional[str]) -> None:
    """Each visual token's contribution: answer loss without it minus the full loss.

    \b
    Examples:
      vlens contributions
      vlens contributions --top 5 --figure contributions.png
    """
    import pandas as pd
    import torch

    from vlens.analysis import token_contributions
    from vlens.viz.heatmap import image_heatmap, model_view_image

    result = token_contributions(setup.model, setup.inputs, estimator=estimator)
    delta = result.row(0).delta_loss.float()
    span = setup.inputs.layout.images[0][0]
    tokens = setup.model.to_str_tokens(setup.inputs)
    positions = result.row(0).image_positions
    frame = pd.DataFrame({"pos": positions.tolist(), "token": [tokens[p] for p in positions.tolist()], "delta loss": delta.tolist()})
    print_table(frame.reindex(frame["delta loss"].abs().sort_values(ascending=False).index).head(top))
    if estimator == "drop":
        echo_engine(result.engine, result.engine_reason)
    if figure:
        from vlens.viz.report import _span_slice

        values = _span_slice(delta, positions, span)
        bound = float(values[torch.isfinite(values)].abs().max()) if torch.isfinite(values).any() else 1.0
        fig = image_heatmap(values, span, model_view_image(setup.inputs, setup.model.processor),
                            title="loss without the token - full loss", label="delta loss (nats)",
                            cmap="RdBu_r", vmin=-bound, vmax=bound)
        save_figure(fig, figure)
    save_table(result.to_frame() if table_path else None, table_path)


def echo_engine(engine: Optional[str], reason: str) -> None:
    """Say (on stderr, beside the table) which token-removal engine ran, and why not kv."""
    click.echo(f"token removal: {engine} engine" + (f" ({reason})" if reason else ""), err=True)
