"""What the ``vlens`` commands share: the error-handling group, the options, loading one example.

Every option that more than one command takes is defined here once, so a flag means the same
thing in every command (``--model``, ``--device``, ``--dtype``, ``--seed``, ``--prompt``, ...).
Their help may differ where a command reads them differently (the sweep's default device is
accelerate's device for each process), never their meaning.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import click

from vlens.errors import VLensError

DEFAULT_MODEL = "toy"
GENERIC_PROMPT = "Describe the image."
DTYPES = ("float32", "float16", "bfloat16")
TABLE_FORMATS = ("csv", "parquet")


def error_message(err: BaseException, whole: bool = False) -> str:
    """``"TypeName: message"``; only the message's first line unless ``whole``."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    return f"{type(err).__name__}: {text if whole else text.splitlines()[0]}"


def debugging(ctx: click.Context) -> bool:
    """Whether ``vlens --debug`` asked for tracebacks instead of one-line errors."""
    return bool(ctx.find_root().params.get("debug"))


class Group(click.Group):
    """A group whose commands turn vlens errors into one-line messages (exit status 1)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (VLensError, OSError) as err:
            if debugging(ctx):
                raise
            raise click.ClickException(error_message(err)) from None


def say(message: str) -> None:
    """Progress and notes go to stderr, so stdout holds only the command's result."""
    click.echo(message, err=True)


def int_list(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[list[int]]:
    """Click callback: ``"0,2,4"`` -> ``[0, 2, 4]`` (None when not given)."""
    if value is None or value == "":
        return None
    try:
        items = [int(v) for v in value.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 0,2,4, got {value!r}") from None
    if not items:
        raise click.BadParameter("expected at least one integer")
    return items


def compose(*decorators: Callable) -> Callable:
    """One decorator applying ``decorators`` so that the options list in the order given."""

    def apply(fn: Callable) -> Callable:
        for deco in reversed(decorators):
            fn = deco(fn)
        return fn

    return apply


# ---- the shared options ------------------------------------------------------------------


def model_option(default: Optional[str] = DEFAULT_MODEL,
                 help: str = "'toy' (shipped), a local checkpoint folder, or a hub id.") -> Callable:
    return click.option("--model", "model_name", default=default, show_default=default is not None,
                        metavar="NAME|PATH", help=help)


def device_option(help: str = "cpu, cuda, cuda:N or mps (default: cuda if available, else cpu).") -> Callable:
    return click.option("--device", default=None, help=help)


def dtype_option(help: str = "Weights' dtype (default float32).") -> Callable:
    return click.option("--dtype", default=None, type=click.Choice(DTYPES), help=help)


def seed_option(help: str) -> Callable:
    return click.option("--seed", type=int, default=0, show_default=True, help=help)


def prompt_option(help: str) -> Callable:
    return click.option("--prompt", default=None, help=help)


figure_option = click.option("--figure", type=click.Path(dir_okay=False), default=None, metavar="PATH.png",
                             help="Also draw the figure to this PNG file.")
table_option = click.option("--table", "table_path", type=click.Path(dir_okay=False), default=None, metavar="PATH",
                            help="Also write the full result table (.parquet for Parquet, else CSV).")

#: The options of every command that analyses one image: which model, which example, where.
example_options = compose(
    model_option(),
    click.option("--image", "image_path", type=click.Path(dir_okay=False), default=None, metavar="PATH",
                 help="Image file. Default: a generated scene (see --seed)."),
    seed_option("Seed of the generated scene when no --image is given."),
    prompt_option("The question or instruction. Default: the captioning prompt."),
    click.option("--answer", default=None,
                 help="Answer to score. Default: the scene's caption for the generated scene, else the model's own "
                      "greedy answer."),
    device_option(),
    dtype_option(),
)


# ---- one example, loaded -------------------------------------------------------------------


class Setup:
    """What every single-image command loads: the model and one example."""

    def __init__(self, model_name: str, image_path: Optional[str], seed: int, prompt: Optional[str],
                 answer: Optional[str], device: Optional[str], dtype: Optional[str], need_answer: bool) -> None:
        from vlens import HookedVLM
        from vlens.images import to_rgb

        # The image is read first: a bad path must not wait for a model that takes minutes to load.
        user_image = None if image_path is None else to_rgb(image_path)
        say(f"loading model {model_name!r} ...")
        started = time.perf_counter()
        self.model = HookedVLM.from_pretrained(model_name, device=device, dtype=dtype)
        say(f"loaded {self.model.adapter.family} model with {self.model.n_layers} layers in {time.perf_counter() - started:.1f}s")
        self.scene = None
        if user_image is None:
            from vlens.data import CAPTION_QUESTION, generate_scene

            # Drawn at the resolution the family sees, so the scene's cells are its token cells.
            self.scene = generate_scene(seed, **self.model.adapter.scene_geometry().scene_kwargs())
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
            say("generating the model's answer ...")
            answer = self.model.generate(self.model.prepare(self.image, prompt), max_new_tokens=20).text[0]
            if not answer.strip():
                raise click.ClickException("the model generated an empty answer; pass one with --answer")
            self.answer_source = "generated by the model (greedy)"
            say(f"answer: {answer!r}")
        self.answer = answer
        self.inputs = self.model.prepare(self.image, prompt, answer=answer)

    def _default_prompt(self) -> str:
        from vlens.data import CAPTION_QUESTION

        return CAPTION_QUESTION if self.model.name == DEFAULT_MODEL else GENERIC_PROMPT

    def run(self, *streams: Any, cache_names: Sequence[str] = ()) -> Any:
        """One forward pass of the example feeding the analyses' streams (nothing but
        ``cache_names`` is cached); returns that cache, or None."""
        from vlens.analysis import run_streams

        return run_streams(self.model, self.inputs, streams, cache_names)

    def lens_labels(self) -> Optional[list]:
        """Expected colour word per image token of the generated scene (None elsewhere)."""
        if self.scene is None:
            return None
        from vlens.data.ground_truth import token_words

        out = token_words(self.scene, self.inputs.layout.images[0][0], "colour")
        if out is None:
            return None
        # A colour word the vocabulary lacks cannot be a label: say so, and leave those tokens unlabelled.
        from vlens.analysis.lens import label_id

        unknown = sorted({w for w in out if w is not None and label_id(self.model.tokenizer, w) < 0})
        if unknown:
            say(f"lens labels: {unknown} are not in the model's vocabulary; their tokens are unlabelled")
            out = [None if w in unknown else w for w in out]
        return out if any(w is not None for w in out) else None

    def lens_label_ids(self) -> Optional[Any]:
        """:meth:`lens_labels` as token ids (-1: none), for a ``LensStream``."""
        from vlens.analysis.lens import label_ids

        words = self.lens_labels()
        return None if words is None else label_ids(self.model.tokenizer, words)


def with_setup(need_answer: bool = False) -> Callable:
    """Turn a command taking a :class:`Setup` into one taking :data:`example_options`' values."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(model_name: str, image_path: Optional[str], seed: int, prompt: Optional[str], answer: Optional[str],
                device: Optional[str], dtype: Optional[str], **command_options: Any) -> Any:
            # **command_options are the command's own options, exactly as click parsed them.
            setup = Setup(model_name, image_path, seed, prompt, answer, device, dtype, need_answer)
            return fn(setup, **command_options)

        return run

    return deco


# ---- output --------------------------------------------------------------------------------


def save_figure(fig: Any, path: Optional[str]) -> None:
    if path is None:
        return
    from vlens.viz._html import figure_png

    target = Path(path)
    if target.suffix.lower() != ".png":
        raise click.BadParameter(f"figure path must end in .png, got {path!r}", param_hint="--figure")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(figure_png(fig))
    say(f"figure written to {target}")


def save_table(frame: Any, path: Optional[str]) -> None:
    if path is None:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix.lower() == ".parquet":
        frame.to_parquet(target, index=False)
    else:
        frame.to_csv(target, index=False)
    say(f"table written to {target}")


def print_table(frame: Any) -> None:
    import pandas as pd

    with pd.option_context("display.max_rows", 200, "display.width", 160, "display.float_format", "{:.4f}".format):
        click.echo(frame.to_string(index=False))
