"""``python -m vlens.cli``: the ``vlens`` command, e.g. under ``accelerate launch -m vlens.cli sweep ...``."""

from vlens.cli import main

main()
