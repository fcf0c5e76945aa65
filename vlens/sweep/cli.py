"""``vlens sweep``: the command line of :func:`vlens.sweep.run`.

The ``vlens`` command (a click group) attaches it with ``cli.add_command(sweep_command)``:
``sweep_command`` is a click command named ``sweep`` that hands its arguments, unparsed, to
:func:`main` (so ``vlens sweep --help`` shows the options below). An argparse program uses
``add_arguments(subparser)`` and ``run_from_args(args)`` instead, and
``python -m vlens.sweep.cli ...`` runs it alone. Examples::

    vlens sweep --model toy --data-format scenes --data 500 --out runs/scenes
    accelerate launch --num_processes 4 -m vlens.sweep.cli --model llava-hf/llava-1.5-7b-hf \\
        --data-format coco --data captions_val2017.json --images val2017/ --out runs/coco
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional, Sequence

from vlens.errors import SweepConfigError, VLensError

HELP = "run analyses over a data set: resumable Parquet shards, data-parallel under accelerate launch"
DESCRIPTION = (
    "Run the chosen analyses (streaming forms) over a data set in batches, writing one Parquet shard per "
    "batch to --out. Rerun the same command to resume. Under `accelerate launch --num_processes N` the "
    "processes share the work (on CPU-only machines add --multi_gpu to accelerate launch so it starts N "
    "processes)."
)
FORMATS = ("scenes", "coco", "jsonl", "hf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the sweep's options to ``parser``."""
    from vlens.sweep.analyses import ANALYSES, DEFAULT_ANALYSES

    parser.add_argument("--model", help="'toy', a local checkpoint folder or a hub id")
    parser.add_argument("--out", required=True, help="the sweep folder (created; reused to resume)")
    data = parser.add_argument_group("data")
    data.add_argument("--data-format", choices=FORMATS, default="scenes")
    data.add_argument("--data", help="scenes: how many; coco: the captions JSON; jsonl: the JSONL file; "
                      "hf: a save_to_disk folder")
    data.add_argument("--images", help="coco/jsonl: the image folder")
    data.add_argument("--prompt", help="the prompt of every example (coco; jsonl/hf default prompt)")
    data.add_argument("--instances", help="coco: instances JSON with object boxes")
    data.add_argument("--split", help="hf: split of a DatasetDict; scenes: train or heldout")
    data.add_argument("--seed", type=int, default=0, help="scenes: stream seed")
    data.add_argument("--question", default="caption", help="scenes: 'caption' or a question kind")
    for col in ("image", "prompt", "answer", "id", "objects", "boxes"):
        data.add_argument(f"--{col}-column", help=f"hf: the {col} column")
    data.add_argument("--limit", type=int, help="use the first N examples")
    data.add_argument("--skip-bad", action="store_true", help="skip and report bad records instead of failing")
    run = parser.add_argument_group("run")
    run.add_argument("--analyses", default=",".join(DEFAULT_ANALYSES),
                     help=f"comma-separated, from {','.join(sorted(ANALYSES))}")
    run.add_argument("--param", action="append", default=[], metavar="ANALYSIS.KEY=VALUE",
                     help="an analysis parameter (VALUE read as JSON, else as a string), e.g. logit_lens.k=10 "
                     "or attention_to_image.stream=false; repeatable")
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--device", help="e.g. cpu, cuda:0 (default: accelerate's device for this process)")
    run.add_argument("--device-map", help="e.g. auto: spread the model over the visible GPUs")
    run.add_argument("--dtype", help="float32, float16 or bfloat16")
    run.add_argument("--memory-budget", help="e.g. 20GB, or off (default: memory available)")
    run.add_argument("--no-chat-template", action="store_true", help="prompts already hold the image placeholder")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--no-summary", action="store_true", help="do not aggregate at the end")
    run.add_argument("--summarize-only", action="store_true", help="only aggregate an existing folder")


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


def load_data(args: argparse.Namespace) -> Any:
    """The ExampleSet the options describe."""
    from vlens.data import load_coco_captions, load_hf_dataset, load_jsonl, load_scenes

    fmt = args.data_format
    if args.data is None:
        raise SweepConfigError(f"--data is required (for --data-format {fmt}: "
                               f"{'how many scenes' if fmt == 'scenes' else 'a path'})")
    if fmt == "scenes":
        try:
            n = int(args.data)
        except ValueError:
            raise SweepConfigError(f"--data for scenes is a number of scenes, got {args.data!r}") from None
        n = n if args.limit is None else min(n, args.limit)
        return load_scenes(n, args.seed, args.split or "train", question=args.question)
    if fmt == "coco":
        if not args.images:
            raise SweepConfigError("--images (the image folder) is required for --data-format coco")
        kw = {"prompt": args.prompt} if args.prompt else {}
        return load_coco_captions(args.data, args.images, instances=args.instances, skip_bad=args.skip_bad,
                                  limit=args.limit, **kw)
    if fmt == "jsonl":
        return load_jsonl(args.data, args.images, prompt=args.prompt, skip_bad=args.skip_bad, limit=args.limit)
    return load_hf_dataset(
        args.data, split=args.split, image_column=args.image_column or "image", prompt_column=args.prompt_column,
        prompt=args.prompt, answer_column=args.answer_column, id_column=args.id_column,
        objects_column=args.objects_column, boxes_column=args.boxes_column, skip_bad=args.skip_bad, limit=args.limit,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run (or only summarize) the sweep the parsed options describe; returns an exit code."""
    from vlens.sweep.runner import run
    from vlens.sweep.summary import summarize

    if args.summarize_only:
        summary = summarize(args.out)
        _print_summary(summary, args.out)
        return 0
    if not args.model:
        raise SweepConfigError("--model is required (e.g. --model toy)")
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vlens sweep: %(message)s"))
    logger = logging.getLogger("vlens.sweep")
    if not logger.handlers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    device_map = args.device_map
    if device_map and device_map.startswith("{"):
        device_map = json.loads(device_map)
    report = run(
        args.model, load_data(args), args.out,
        analyses=[a.strip() for a in args.analyses.split(",") if a.strip()],
        params=parse_params(args.param), batch_size=args.batch_size, skip_bad=args.skip_bad,
        chat_template=not args.no_chat_template, device=args.device, dtype=args.dtype, device_map=device_map,
        memory_budget=args.memory_budget, progress=not args.no_progress, summarize=not args.no_summary,
    )
    if report.summary is not None:
        _print_summary(report.summary, args.out)
    return 0


def _print_summary(summary: Any, out: Any) -> None:
    print(f"{summary.n_examples} examples in {out}; {len(summary.skipped)} skipped")
    for s in summary.skipped[:20]:
        print(f"  skipped {s.id}: {s.reason}")
    if len(summary.skipped) > 20:
        print(f"  ... and {len(summary.skipped) - 20} more (see summary.json)")
    print(f"per-layer means with CIs: {out}/summary.csv; figures: {len(summary.figures)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vlens sweep", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except VLensError as exc:
        print(f"vlens sweep: error: {exc}", file=sys.stderr)
        return 2


def _click_command() -> Any:
    import click

    @click.command(
        "sweep", help=DESCRIPTION, short_help=HELP, add_help_option=False,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "allow_interspersed_args": False},
    )
    @click.argument("argv", nargs=-1, type=click.UNPROCESSED)
    def sweep(argv: tuple[str, ...]) -> None:
        code = main(list(argv))
        if code:
            raise SystemExit(code)

    return sweep


def __getattr__(name: str) -> Any:  # sweep_command, built on first use so argparse users need no click
    if name == "sweep_command":
        command = _click_command()
        globals()[name] = command
        return command
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
