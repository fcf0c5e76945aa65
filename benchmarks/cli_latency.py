"""How long the ``vlens`` command takes to answer before any model loads.

Times, in fresh processes (best of ``--repeats``): ``vlens --help``, ``vlens sweep --help``,
``vlens info --help``, an argument error (``vlens lens --k x``), and, as the floor any Python
command pays, ``python -c pass``. Target: help and argument errors within 1 s.

Usage: python -m benchmarks.cli_latency [--repeats 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "vlens --help": [sys.executable, "-m", "vlens.cli", "--help"],
    "vlens sweep --help": [sys.executable, "-m", "vlens.cli", "sweep", "--help"],
    "vlens info --help": [sys.executable, "-m", "vlens.cli", "info", "--help"],
    "vlens lens --k x (error)": [sys.executable, "-m", "vlens.cli", "lens", "-k", "x"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for name, command in COMMANDS.items():
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run(command, capture_output=True, check=False)
            best = min(best, time.perf_counter() - start)
        print(f"{name:28s} {best:6.3f} s")


if __name__ == "__main__":
    main()
