"""The ``vlens`` command: the HTML report, model facts, one subcommand per analysis, sweeps.

Every single-image command runs on the shipped toy model and a generated scene when given no
model or image, so each works on a fresh install. Errors vlens raises on purpose (bad model
path, unreadable image, out-of-range layer, ...) print one line and exit with status 1;
click's own usage errors exit with status 2. ``--debug`` shows the traceback instead.

The commands live by responsibility: ``_common`` (the shared options, the error handling,
loading one example), ``single`` (``report`` and one command per analysis), ``info``,
``sweep`` and ``convert``. ``python -m vlens.cli`` runs the same command (what ``accelerate
launch -m vlens.cli sweep ...`` starts in every process).
"""

from __future__ import annotations

import click

from vlens.cli import causal, pruning, single
from vlens.cli._common import Group
from vlens.cli.convert import convert_group
from vlens.cli.info import info
from vlens.cli.sweep import sweep_command


@click.group("vlens", cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="vlens")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """vlens: mechanistic interpretability for vision LLMs.

    \b
    Examples:
      vlens report                                  # toy model + generated scene -> vlens-report/
      vlens report --model ./my-vlm --image cat.jpg --prompt "What is this?"
      vlens info toy
      vlens lens --figure lens.png --table lens.csv
      vlens attention --layers 0,1 --html attention.html
      vlens prune --layers 2 --keep 0.25,0.5 --figure prune.png
      vlens contextual-lens --contexts captions.txt
      vlens sweep --model toy --data 500 --out runs/scenes
    """


for _command in (single.report, info, single.lens, single.similarity, single.attention, single.count_curve,
                 single.contributions, causal.knockout, causal.patching, causal.attribution, pruning.prune,
                 pruning.contextual_lens, sweep_command, convert_group):
    main.add_command(_command)
del _command

__all__ = ["main"]
