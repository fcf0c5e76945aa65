"""The ``vlens`` command: the HTML report, model facts, one subcommand per analysis.

Every command runs on the shipped toy model and a generated scene when given no model
or image, so each works on a fresh install. Errors vlens raises on purpose (bad model
path, unreadable image, out-of-range layer, ...) print one line and exit with status 1;
click's own usage errors exit with status 2. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import click

from vlens.errors import VLensError

DEFAULT_MODEL = "toy"
DEFAULT_OUT = "vlens-report"
GENERIC_PROMPT = "Describe the image."


class _Group(click.Group):
    """A group whose commands turn vlens errors into one-line messages."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (VLensError, OSError) as err:
            if ctx.find_root().params.get("debug"):
                raise
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise click.ClickException(f"{type(err).__name__}: {message}") from None


def _say(message: str) -> None:
    click.echo(message, err=True)


def _int_list(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[list[int]]:
    if value is None or value == "":
        return None
    try:
        items = [int(v) for v in value.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 0,2,4, got {value!r}") from None
    if not items:
        raise click.BadParameter("expected at least one integer")
    return items


def _common_options(fn: Callable) -> Callable:
    """--model, --image, --seed, --prompt, --answer, --device, --dtype."""
    options = [
        click.option("--model", "model_name", default=DEFAULT_MODEL, show_default=True, metavar="NAME|PATH",
                     help="'toy' (shipped), a local checkpoint folder, or a hub id."),
        click.option("--image", "image_path", type=click.Path(dir_okay=False), default=None, metavar="PATH",
                     help="Image file. Default: a generated scene (see --seed)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generated scene when no --image is given."),
        click.option("--prompt", default=None, help="The question or instruction. Default: the captioning prompt."),
        click.option("--answer", default=None,
                     help="Answer to score. Default: the scene's caption for the generated scene, else the model's own greedy answer."),
        click.option("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)."),
        click.option("--dtype", default=None, type=click.Choice(["float32", "float16", "bfloat16"]), help="Weights' dtype (default float32)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


class _Setup:
    """What every analysis command loads: the model and one example."""

    def __init__(self, model_name: str, image_path: Optional[str], seed: int, prompt: Optional[str],
                 answer: Optional[str], device: Optional[str], dtype: Optional[str], need_answer: bool) -> None:
        from vlens import HookedVLM
        from vlens.images import to_rgb

        # The image is read first: a bad path must not wait for a model that takes minutes to load.
        user_image = None if image_path is None else to_rgb(image_path)
        _say(f"loading model {model_name!r} ...")
        started = time.perf_counter()
        self.model = HookedVLM.from_pretrained(model_name, device=device, dtype=dtype)
        _say(f"loaded {self.model.adapter.family} model with {self.model.n_layers} layers in {time.perf_counter() - started:.1f}s")
        self.scene = None
        if user_image is None:
            from vlens.data import CAPTION_QUESTION, generate_scene

            self.scene = generate_scene(seed)
            self.image = self.scene.image
            self.source = f"generated scene (seed {seed})"
            if prompt is None:
                prompt = CAPTION_QUESTION
                if answer is None:
                    answer = self.scene.caption
        else:
            self.image = user_image
            self.source = image_path
        if prompt is None:
            prompt = self._default_prompt()
        self.prompt = prompt
        self.answer_source = "given" if answer is not None else None
        if answer is None and need_answer:
            _say("generating the model's answer ...")
            answer = self.model.generate(self.model.prepare(self.image, prompt), max_new_tokens=20).text[0]
            if not answer.strip():
                raise click.ClickException("the model generated an empty answer; pass one with --answer")
            self.answer_source = "generated by the model (greedy)"
            _say(f"answer: {answer!r}")
        self.answer = answer
        self.inputs = self.model.prepare(self.image, prompt, answer=answer)

    def _default_prompt(self) -> str:
        from vlens.data import CAPTION_QUESTION

        return CAPTION_QUESTION if self.model.name == DEFAULT_MODEL else GENERIC_PROMPT

    def cache(self) -> Any:
        names = ["blocks.0.hook_resid_pre", "blocks.*.hook_resid_post", "blocks.*.attn.hook_pattern"]
        _logits, cache = self.model.run_with_cache(self.inputs, names_filter=names, device="cpu")
        return cache

    def lens_labels(self) -> Optional[list]:
        """Expected colour word per image token of the generated scene (None elsewhere)."""
        if self.scene is None:
            return None
        span = self.inputs.layout.images[0][0]
        labels = self.scene.patch_labels
        if span.grid is None or tuple(span.grid) != tuple(labels.shape):
            return None
        out = []
        for (r, c), ok in zip(span.row_col.tolist(), span.on_grid.tolist()):
            idx = int(labels[r, c]) if ok else -1
            out.append(self.scene.objects[idx].colour if idx >= 0 else None)
        # A colour word the vocabulary lacks cannot be a label: say so, and leave those tokens unlabelled.
        from vlens.analysis.lens import label_id

        unknown = sorted({w for w in out if w is not None and label_id(self.model.tokenizer, w) < 0})
        if unknown:
            _say(f"lens labels: {unknown} are not in the model's vocabulary; their tokens are unlabelled")
            out = [None if w in unknown else w for w in out]
        return out if any(w is not None for w in out) else None


def _setup(need_answer: bool = False) -> Callable:
    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(model_name: str, image_path: Optional[str], seed: int, prompt: Optional[str], answer: Optional[str],
                device: Optional[str], dtype: Optional[str], **kwargs: Any) -> Any:
            setup = _Setup(model_name, image_path, seed, prompt, answer, device, dtype, need_answer)
            return fn(setup, **kwargs)

        return run

    return deco


def _save_figure(fig: Any, path: Optional[str]) -> None:
    if path is None:
        return
    from vlens.viz._html import figure_png

    target = Path(path)
    if target.suffix.lower() != ".png":
        raise click.BadParameter(f"figure path must end in .png, got {path!r}", param_hint="--figure")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(figure_png(fig))
    _say(f"figure written to {target}")


def _save_table(frame: Any, path: Optional[str]) -> None:
    if path is None:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix.lower() == ".parquet":
        frame.to_parquet(target, index=False)
    else:
        frame.to_csv(target, index=False)
    _say(f"data written to {target}")


def _print_table(frame: Any) -> None:
    import pandas as pd

    with pd.option_context("display.max_rows", 200, "display.width", 160, "display.float_format", "{:.4f}".format):
        click.echo(frame.to_string(index=False))


_figure_option = click.option("--figure", type=click.Path(dir_okay=False), default=None, metavar="PATH.png",
                              help="Also draw the figure to this PNG file.")
_data_option = click.option("--data", "data_path", type=click.Path(dir_okay=False), default=None, metavar="PATH",
                            help="Also write the full result table (.csv, or .parquet).")


# ---- the group ---------------------------------------------------------------------


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="vlens")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """vlens: mechanistic interpretability for vision LLMs.

    \b
    Examples:
      vlens report                                  # toy model + generated scene -> vlens-report/
      vlens report --model ./llava-1.5-7b --image cat.jpg --prompt "What is this?"
      vlens info toy
      vlens lens --figure lens.png
      vlens attention --layers 0,1 --html attention.html
    """


# ---- report ------------------------------------------------------------------------


@main.command()
@_common_options
@click.option("--out", default=DEFAULT_OUT, show_default=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Folder for report.html and data/.")
@click.option("--data-format", type=click.Choice(["csv", "parquet"]), default="csv", show_default=True,
              help="Format of the data files.")
@click.option("--layers", "attention_layers", callback=_int_list, default=None, metavar="L,L,...",
              help="Layers of the attention-pattern view (default: all for <= 4 layers; else first, middle and last "
                   "for models with few heads, the middle one for many).")
@_setup(need_answer=True)
def report(setup: _Setup, out: str, data_format: str, attention_layers: Optional[list[int]]) -> None:
    """Run every analysis on one image and prompt; write one self-contained HTML report.

    Writes DIR/report.html (figures and the CircuitsVis bundle embedded: it opens from
    disk with no network) and DIR/data/*.csv, the tables behind every figure.

    \b
    Examples:
      vlens report
      vlens report --seed 7 --out scene7
      vlens report --model ./my-llava --image cat.jpg --prompt "What animal is this?" --answer "A cat."
      vlens report --device cuda --dtype float16 --data-format parquet
    """
    from vlens.viz.report import build_report

    meta = {"image": setup.source, "answer source": setup.answer_source}
    if setup.answer_source == "given":
        _say("generating the model's own answer for comparison ...")
        meta["model's greedy answer"] = setup.model.generate(setup.model.prepare(setup.image, setup.prompt),
                                                             max_new_tokens=20).text[0]
    result = build_report(setup.model, setup.inputs, lens_labels=setup.lens_labels(),
                          attention_layers=attention_layers, meta=meta, progress=_say)
    written = result.write(out, data_format=data_format)  # type: ignore[arg-type]
    for title, problem in result.problems.items():
        _say(f"warning: {title}: {problem}")
    click.echo(f"report written to {written['report']} ({len(written) - 1} data files in {Path(out) / 'data'})")


# ---- info --------------------------------------------------------------------------


@main.command()
@click.argument("model_name", metavar="MODEL", default=DEFAULT_MODEL)
@click.option("--device", default=None, help="cpu, cuda, cuda:N or mps.")
@click.option("--dtype", default=None, type=click.Choice(["float32", "float16", "bfloat16"]))
@click.option("--stage", default=None, help="List every hook name of this stage (vision, connector, language, ...).")
def info(model_name: str, device: Optional[str], dtype: Optional[str], stage: Optional[str]) -> None:
    """Family, size, hook names by stage and the token layout of a sample input.

    \b
    Examples:
      vlens info toy
      vlens info ./llava-1.5-7b --stage connector
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
    inputs = model.prepare(generate_scene(0).image, CAPTION_QUESTION)
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
    out, start, prev = [], None, None
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


# ---- one command per analysis -----------------------------------------------------------


def _analysis(name: str) -> Any:
    try:
        import vlens.analysis as va
    except ImportError as err:
        raise click.ClickException(f"vlens.analysis cannot be imported: {err}") from None
    if not hasattr(va, name):
        raise click.ClickException(f"this installation of vlens has no vlens.analysis.{name}")
    return getattr(va, name)


@main.command()
@_common_options
@click.option("--layers", callback=_int_list, default=None, metavar="L,L,...",
              help="Layer indices 0..n_layers (0 = embeddings). Default: all.")
@click.option("-k", "k", type=click.IntRange(1), default=5, show_default=True, help="Top-k tokens kept per layer and token.")
@_figure_option
@_data_option
@_setup(need_answer=False)
def lens(setup: _Setup, layers: Optional[list[int]], k: int, figure: Optional[str], data_path: Optional[str]) -> None:
    """Logit lens on the visual tokens: per layer, their most frequent top-1 words.

    \b
    Examples:
      vlens lens
      vlens lens --layers 0,2,4 --figure lens.png --data lens.csv
    """
    import pandas as pd

    from vlens.viz.lens_panel import decoder, lens_grid, lens_panel

    result = _analysis("logit_lens")(setup.model, setup.cache(), positions="image", layers=layers, k=k,
                                     labels=setup.lens_labels())
    _, words, probs, _, _ = lens_grid(result, setup.inputs.layout, setup.model.tokenizer)
    rows = []
    for i, layer in enumerate(result.layers.tolist()):
        counts = pd.Series([w for w in words[i].ravel() if w]).value_counts().head(3)
        row = {"layer": layer, "top-1 words (count)": ", ".join(f"{w} ({n})" for w, n in counts.items()),
               "mean top-1 prob": float(pd.Series(probs[i].ravel()).mean())}
        if result.match_rate is not None:
            row["match rate"] = float(result.match_rate[0, i])
        rows.append(row)
    _print_table(pd.DataFrame(rows))
    _save_figure(lens_panel(result, setup.inputs.layout, setup.model.tokenizer) if figure else None, figure)
    if data_path:
        frame = result.to_frame()
        decode = decoder(setup.model.tokenizer)
        frame["token"] = frame["token_id"].map(lambda t: decode(int(t)))
        _save_table(frame, data_path)


@main.command()
@_common_options
@click.option("--against", type=click.Choice(["text_states", "text_embeddings", "vocab"]), default="text_states",
              show_default=True, help="What visual-token states are compared with.")
@_figure_option
@_data_option
@_setup(need_answer=False)
def similarity(setup: _Setup, against: str, figure: Optional[str], data_path: Optional[str]) -> None:
    """Cosine similarity of visual-token states to text, per layer (0 = embeddings).

    \b
    Examples:
      vlens similarity
      vlens similarity --against vocab --figure similarity.png
    """
    from vlens.viz.curves import similarity_figure

    result = _analysis("modality_similarity")(setup.model, setup.cache(), against=against)
    _print_table(result.curve_frame())
    _save_figure(similarity_figure(result) if figure else None, figure)
    _save_table(result.to_frame() if data_path else None, data_path)


@main.command()
@_common_options
@click.option("--query", default="instruction", show_default=True,
              help="Query positions: instruction, answer, last, text, ...")
@click.option("--layers", callback=_int_list, default=None, metavar="L,L,...", help="Layers of the --html view.")
@click.option("--heads", callback=_int_list, default=None, metavar="H,H,...", help="Heads of the --html view (default all).")
@click.option("--window", default="auto", show_default=True,
              help="Tokens of the --html view: auto, all, or segments such as instruction+image.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None, metavar="PATH.html",
              help="Write a standalone CircuitsVis attention view (works offline).")
@_figure_option
@_data_option
@_setup(need_answer=False)
def attention(setup: _Setup, query: str, layers: Optional[list[int]], heads: Optional[list[int]], window: str,
              html_path: Optional[str], figure: Optional[str], data_path: Optional[str]) -> None:
    """Attention from text to the image, per block and head.

    \b
    Examples:
      vlens attention
      vlens attention --query last --figure mass.png
      vlens attention --layers 0,1 --heads 0,1 --window instruction+image --html attention.html
    """
    import pandas as pd

    from vlens.viz.attention import attention_view
    from vlens.viz.curves import attention_mass_figure

    cache = setup.cache()
    result = _analysis("attention_to_image")(cache, query=query)
    mass = result.mass[0].float()
    frame = pd.DataFrame({"block": range(mass.shape[0]), "mean mass": mass.mean(1).tolist(),
                          "max mass": mass.max(1).values.tolist(), "top head": mass.argmax(1).tolist()})
    _print_table(frame)
    _save_figure(attention_mass_figure(result) if figure else None, figure)
    _save_table(result.to_frame() if data_path else None, data_path)
    if html_path:
        view = attention_view(cache, setup.model.to_str_tokens(setup.inputs), layers=layers, heads=heads, window=window)
        target = Path(html_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        view.save(target)
        _say(f"attention view written to {target}")


@main.command("count-curve")
@_common_options
@click.option("--counts", callback=_int_list, default=None, metavar="N,N,...",
              help="Numbers of visual tokens to keep (default: every count).")
@click.option("--order", type=click.Choice(["raster", "random"]), default="raster", show_default=True,
              help="Which tokens are kept first.")
@_figure_option
@_data_option
@_setup(need_answer=True)
def count_curve(setup: _Setup, counts: Optional[list[int]], order: str, figure: Optional[str], data_path: Optional[str]) -> None:
    """Answer loss against the number of visual tokens kept.

    \b
    Examples:
      vlens count-curve
      vlens count-curve --counts 0,8,16,32,64 --order random --figure curve.png
    """
    from vlens.viz.curves import count_curve_figure

    result = _analysis("token_count_curve")(setup.model, setup.inputs, counts=counts, order=order)
    frame = result.to_frame()
    _print_table(frame)
    _save_figure(count_curve_figure(result) if figure else None, figure)
    _save_table(frame if data_path else None, data_path)


@main.command()
@_common_options
@click.option("--method", type=click.Choice(["drop", "gradient"]), default="drop", show_default=True,
              help="drop: remove each token in turn; gradient: first-order estimate.")
@click.option("--top", type=click.IntRange(1), default=10, show_default=True, help="How many tokens to list.")
@_figure_option
@_data_option
@_setup(need_answer=True)
def contributions(setup: _Setup, method: str, top: int, figure: Optional[str], data_path: Optional[str]) -> None:
    """Each visual token's contribution: answer loss without it minus the full loss.

    \b
    Examples:
      vlens contributions
      vlens contributions --top 5 --figure contributions.png
    """
    import pandas as pd
    import torch

    from vlens.viz.heatmap import image_heatmap, model_view_image

    result = _analysis("token_contributions")(setup.model, setup.inputs, estimator=method)
    delta = result.row(0).delta_loss.float()
    span = setup.inputs.layout.images[0][0]
    tokens = setup.model.to_str_tokens(setup.inputs)
    positions = result.row(0).image_positions
    frame = pd.DataFrame({"pos": positions.tolist(), "token": [tokens[p] for p in positions.tolist()], "delta loss": delta.tolist()})
    _print_table(frame.reindex(frame["delta loss"].abs().sort_values(ascending=False).index).head(top))
    if figure:
        from vlens.viz.report import _span_slice

        values = _span_slice(delta, positions, span)
        bound = float(values[torch.isfinite(values)].abs().max()) if torch.isfinite(values).any() else 1.0
        fig = image_heatmap(values, span, model_view_image(setup.inputs, setup.model.processor),
                            title="loss without the token - full loss", label="delta loss (nats)",
                            cmap="RdBu_r", vmin=-bound, vmax=bound)
        _save_figure(fig, figure)
    _save_table(result.to_frame() if data_path else None, data_path)


# ---- convert ---------------------------------------------------------------------------


@main.group(cls=_Group)
def convert() -> None:
    """Convert checkpoints of other layouts into ones vlens loads.

    \b
    Example:
      vlens convert minigpt4 --minigpt4 pretrained_minigpt4_7b.pth --blip2 ./blip2-opt-2.7b \\
          --vicuna ./vicuna-7b --out ./minigpt4-7b
    """


@convert.command("minigpt4")
@click.option("--minigpt4", "minigpt4_ckpt", required=True, type=click.Path(dir_okay=False), metavar="CKPT.pth",
              help="MiniGPT-4's projection checkpoint.")
@click.option("--blip2", required=True, type=click.Path(file_okay=False), metavar="DIR", help="A BLIP-2 checkpoint folder.")
@click.option("--vicuna", required=True, type=click.Path(file_okay=False), metavar="DIR", help="The Vicuna checkpoint folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), metavar="DIR", help="Where to write the converted model.")
def convert_minigpt4_cmd(minigpt4_ckpt: str, blip2: str, vicuna: str, out: str) -> None:
    """MiniGPT-4 (BLIP-2 Q-Former + Vicuna) to a BLIP-2-layout checkpoint.

    \b
    Example:
      vlens convert minigpt4 --minigpt4 pretrained_minigpt4_7b.pth --blip2 ./blip2-opt-2.7b \\
          --vicuna ./vicuna-7b --out ./minigpt4-7b
    """
    try:
        from vlens.convert.minigpt4 import convert_minigpt4
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("vlens.convert"):
            raise click.ClickException("MiniGPT-4 conversion is not available in this installation of vlens "
                                       "(vlens.convert.minigpt4 is missing)") from None
        raise
    written = convert_minigpt4(minigpt4_ckpt=minigpt4_ckpt, blip2_dir=blip2, vicuna_dir=vicuna, out_dir=out)
    click.echo(f"converted MiniGPT-4 checkpoint written to {written}")


# ---- commands other modules provide ------------------------------------------------------


def _attach_sweep() -> None:
    """``vlens sweep`` (vlens.sweep.cli) when this installation has it."""
    try:
        from vlens.sweep.cli import sweep_command
    except ImportError:
        return
    main.add_command(sweep_command)


_attach_sweep()


if __name__ == "__main__":  # pragma: no cover
    main()
