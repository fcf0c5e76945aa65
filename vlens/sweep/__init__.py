"""Data-set scale runs: sharded, resumable, data-parallel through accelerate.

A package rather than the single ``sweep.py`` DESIGN.md lists, because it is several
responsibilities (analyses in streaming form, the shard store and provenance, the memory
estimate, the runner, the summary), each a file. Its command line is ``vlens sweep``
(``vlens/cli/sweep.py``), one command of the ``vlens`` tool like the others.

Example:
    >>> from vlens import sweep
    >>> from vlens.data import load_scenes
    >>> report = sweep.run("toy", load_scenes(200), "runs/scenes", batch_size=16)  # doctest: +SKIP
    >>> report.summary.curves.query("analysis == 'logit_lens'")  # doctest: +SKIP
"""

from vlens.sweep.analyses import (
    ANALYSES,
    DEFAULT_ANALYSES,
    AttentionToImage,
    LogitLens,
    ModalitySimilarity,
    SweepAnalysis,
    TokenCountCurve,
)
from vlens.sweep.memory import MemoryEstimate, estimate_memory
from vlens.sweep.runner import SweepReport, run
from vlens.sweep.summary import SweepSummary, load_results, summarize

__all__ = [
    "ANALYSES",
    "DEFAULT_ANALYSES",
    "AttentionToImage",
    "LogitLens",
    "MemoryEstimate",
    "ModalitySimilarity",
    "SweepAnalysis",
    "SweepReport",
    "SweepSummary",
    "TokenCountCurve",
    "estimate_memory",
    "load_results",
    "run",
    "summarize",
]
