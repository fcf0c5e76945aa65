"""``vlens sweep``: the command line of :func:`vlens.sweep.run`.

Under ``accelerate launch`` every process runs this same command (``accelerate launch ... -m
vlens.cli sweep ...``); :func:`vlens.sweep.run` finds its rank through accelerate and the
processes share the work.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Mapping, Optional, Sequence

import click

from vlens.cli._common import (
    compose,
    debugging,
    device_option,
    dtype_option,
    error_message,
    model_option,
    prompt_option,
    seed_option,
)
from vlens.errors import SweepConfigError
from vlens.sweep.catalog import ANALYSIS_NAMES, DEFAULT_ANALYSES

SHORT_HELP = "Run analyses over a data set: resumable Parquet shards, data-parallel under accelerate launch."
DATA_FORMATS = ("scenes", "coco", "jsonl", "hf")

_data_options = compose(
    click.option("--data-format", type=click.Choice(DATA_FORMATS), default="scenes", show_default=True,
                 help="What --data is."),
    click.option("--data", default=None, metavar="N|PATH",
                 help="scenes: how many; coco: the captions JSON; jsonl: the JSONL file; hf: a save_to_disk folder."),
    click.option("--images", default=None, metavar="DIR", help="coco/jsonl: the image folder."),
    prompt_option("The prompt of every example (coco; jsonl/hf: the default prompt)."),
    click.option("--instances", default=None, metavar="PATH", help="coco: instances JSON with object boxes."),
    click.option("--split", default=None, help="hf: split of a DatasetDict; scenes: train or heldout."),
    seed_option("scenes: seed of the generated scene stream."),
    click.option("--question", default="caption", show_default=True, help="scenes: 'caption' or a question kind."),
    *[click.option(f"--{col}-column", default=None, metavar="NAME", help=f"hf: the {col} column.")
      for col in ("image", "prompt", "answer", "id", "objects", "boxes")],
    click.option("--limit", type=int, default=None, metavar="N", help="Use the first N examples."),
    click.option("--skip-bad", is_flag=True, help="Skip and report bad records instead of failing."),
)

_run_options = compose(
    click.option("--analyses", default=",".join(DEFAULT_ANALYSES), show_default=True, metavar="A,A,...",
                 help=f"Comma-separated, from {','.join(sorted(ANALYSIS_NAMES))}."),
    click.option("--param", "params", multiple=True, metavar="ANALYSIS.KEY=VALUE",
                 help="An analysis parameter (VALUE read as JSON, else as a string), e.g. logit_lens.k=10 or "
                      "attention_to_image.stream=false; repeatable."),
    click.option("--batch-size", type=int, default=8, show_default=True, help="Examples per batch (and per shard)."),
    device_option("cpu, cuda, cuda:N or mps (default: accelerate's device for this process)."),
    click.option("--device-map", default=None, help="e.g. auto: spread the model over the visible GPUs (or a JSON dict)."),
    dtype_option(),
    click.option("--memory-budget", default=None, metavar="SIZE", help="e.g. 20GB, or off (default: memory available)."),
    click.option("--no-chat-template", is_flag=True, help="Prompts already hold the image placeholder."),
    click.option("--no-progress", is_flag=True, help="No progress bar."),
    click.option("--no-summary", is_flag=True, help="Do not aggregate at the end."),
    click.option("--summarize-only", is_flag=True, help="Only aggregate an existing --out folder."),
)


@click.command("sweep", short_help=SHORT_HELP)
@model_option(default=None, help="'toy' (shipped), a local checkpoint folder, or a hub id (required unless "
                                 "--summarize-only).")
@click.option("--out", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="The sweep folder (created; reused to resume).")
@_data_options
@_run_options
@click.pass_context
def sweep_command(ctx: click.Context, **options: Any) -> None:
    """Run analyses over a data set: resumable Parquet shards, data-parallel under accelerate launch.

    Runs the chosen analyses (their streaming forms) over a data set in batches, writing one
    Parquet shard per batch to DIR. Rerun the same command to resume. Under `accelerate launch
    --num_processes N` the processes share the work (on CPU-only machines add --multi_gpu to
    accelerate launch so it starts N processes).

    \b
    Examples:
      vlens sweep --model toy --data 500 --out runs/scenes
      vlens sweep --model ./my-vlm --data-format jsonl --data prompts.jsonl --images imgs/ \\
          --analyses logit_lens,attention_to_image --param logit_lens.k=10 --out runs/mine
      vlens sweep --out runs/scenes --summarize-only
      accelerate launch --num_processes 4 -m vlens.cli sweep --model org/vlm-7b \\
          --data-format coco --data captions_val2017.json --images val2017/ --out runs/coco
    """
    # **options: exactly the options declared above, as click parsed them (read by name below).
    try:
        _sweep(options)
    except SweepConfigError as err:
        if debugging(ctx):
            raise
        # Shown whole, not as the group's one line: a refusal to resume into a folder lists each
        # differing field on a line of its own, and those lines are what the user has to read.
        raise click.ClickException(error_message(err, whole=True)) from None


def _sweep(options: Mapping[str, Any]) -> None:
    from vlens.sweep.runner import run
    from vlens.sweep.summary import summarize

    out = options["out"]
    if options["summarize_only"]:
        _print_summary(summarize(out), out)
        return
    if not options["model_name"]:
        raise SweepConfigError("--model is required (e.g. --model toy)")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vlens sweep: %(message)s"))
    logger = logging.getLogger("vlens.sweep")
    if not logger.handlers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    device_map = options["device_map"]
    if device_map and device_map.startswith("{"):
        device_map = json.loads(device_map)
    report = run(
        options["model_name"], load_data(options), out,
        analyses=[a.strip() for a in options["analyses"].split(",") if a.strip()],
        params=parse_params(options["params"]), batch_size=options["batch_size"], skip_bad=options["skip_bad"],
        chat_template=not options["no_chat_template"], device=options["device"], dtype=options["dtype"],
        device_map=device_map, memory_budget=options["memory_budget"], progress=not options["no_progress"],
        summarize=not options["no_summary"],
    )
    if report.summary is not None:
        _print_summary(report.summary, out)


def parse_params(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["logit_lens.k=10"]`` -> ``{"logit_lens": {"k": 10}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        analysis, dot, name = key.partition(".")
        if not sep or not dot or not analysis or not name:
            raise SweepConfigError(f"--param {item!r}: expected ANALYSIS.KEY=VALUE, e.g. logit_lens.k=10")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(analysis, {})[name] = value
    return out


def load_data(options: Mapping[str, Any]) -> Any:
    """The ExampleSet the sweep's data options describe.

    Args:
        options: The sweep command's parsed options (``click.Context.params``), of which the
            data options are read.
    """
    from vlens.data import load_coco_captions, load_hf_dataset, load_jsonl, load_scenes

    fmt, data, limit, skip_bad = options["data_format"], options["data"], options["limit"], options["skip_bad"]
    prompt = options["prompt"]
    if data is None:
        raise SweepConfigError(f"--data is required (for --data-format {fmt}: "
                               f"{'how many scenes' if fmt == 'scenes' else 'a path'})")
    if fmt == "scenes":
        try:
            n = int(data)
        except ValueError:
            raise SweepConfigError(f"--data for scenes is a number of scenes, got {data!r}") from None
        n = n if limit is None else min(n, limit)
        return load_scenes(n, options["seed"], options["split"] or "train", question=options["question"])
    if fmt == "coco":
        if not options["images"]:
            raise SweepConfigError("--images (the image folder) is required for --data-format coco")
        kw = {"prompt": prompt} if prompt else {}
        return load_coco_captions(data, options["images"], instances=options["instances"], skip_bad=skip_bad,
                                  limit=limit, **kw)
    if fmt == "jsonl":
        return load_jsonl(data, options["images"], prompt=prompt, skip_bad=skip_bad, limit=limit)
    return load_hf_dataset(
        data, split=options["split"], image_column=options["image_column"] or "image",
        prompt_column=options["prompt_column"], prompt=prompt, answer_column=options["answer_column"],
        id_column=options["id_column"], objects_column=options["objects_column"],
        boxes_column=options["boxes_column"], skip_bad=skip_bad, limit=limit,
    )


def _print_summary(summary: Any, out: Optional[str]) -> None:
    click.echo(f"{summary.n_examples} examples in {out}; {len(summary.skipped)} skipped")
    for s in summary.skipped[:20]:
        click.echo(f"  skipped {s.id}: {s.reason}")
    if len(summary.skipped) > 20:
        click.echo(f"  ... and {len(summary.skipped) - 20} more (see summary.json)")
    click.echo(f"per-layer means with CIs: {out}/summary.csv; figures: {len(summary.figures)}")
