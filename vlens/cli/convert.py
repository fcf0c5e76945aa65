"""``vlens convert``: checkpoints of other layouts into ones vlens loads."""

from __future__ import annotations

import click

from vlens.cli._common import Group


@click.group("convert", cls=Group)
def convert_group() -> None:
    """Convert checkpoints of other layouts into ones vlens loads.

    \b
    Example:
      vlens convert minigpt4 --minigpt4 pretrained_minigpt4_7b.pth --blip2 ./blip2-opt-2.7b \\
          --vicuna ./vicuna-7b --out ./minigpt4-7b
    """


@convert_group.command("minigpt4")
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
    from vlens.convert.minigpt4 import convert_minigpt4

    written = convert_minigpt4(minigpt4_ckpt=minigpt4_ckpt, blip2_dir=blip2, vicuna_dir=vicuna, out_dir=out)
    click.echo(f"converted MiniGPT-4 checkpoint written to {written}")
