"""Converters from checkpoints published outside Hugging Face's format into one vlens loads.

``convert_minigpt4`` assembles MiniGPT-4 (BLIP-2's vision encoder and Q-Former, its
``llama_proj`` layer, Vicuna) as a ``Blip2ForConditionalGeneration`` checkpoint. The
``vlens`` command exposes it as ``vlens convert minigpt4`` (``add_convert_parser``).
"""

from __future__ import annotations

import argparse

from vlens.errors import VLensError


class CheckpointFormatError(VLensError, ValueError):
    """A checkpoint to convert lacks a tensor, has one of the wrong shape, or holds
    something the converter does not know how to place."""


def add_convert_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add ``convert`` (with its ``minigpt4`` subcommand) to a CLI's subparsers.

    Each leaf parser sets ``func``, which takes the parsed namespace and returns an
    exit code.
    """
    from vlens.convert.minigpt4 import add_minigpt4_parser

    convert = subparsers.add_parser("convert", help="convert a checkpoint into a format vlens loads")
    kinds = convert.add_subparsers(dest="kind", metavar="KIND", required=True)
    add_minigpt4_parser(kinds)
    return convert


# Imported after CheckpointFormatError, which the converters raise.
from vlens.convert.minigpt4 import convert_minigpt4  # noqa: E402

__all__ = ["CheckpointFormatError", "add_convert_parser", "convert_minigpt4"]
