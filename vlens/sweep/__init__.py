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

from __future__ import annotations

from typing import TYPE_CHECKING

from vlens._lazy import lazy_exports
from vlens.sweep.catalog import ANALYSIS_NAMES, DEFAULT_ANALYSES

if TYPE_CHECKING:
    from vlens.sweep.analyses import (
        ANALYSES,
        AttentionToImage,
        LogitLens,
        ModalitySimilarity,
        SweepAnalysis,
        TokenCountCurve,
        VisualTokenPruning,
    )
    from vlens.sweep.memory import MemoryEstimate, estimate_memory
    from vlens.sweep.runner import SweepReport, run
    from vlens.sweep.summary import SweepSummary, load_results, summarize

# Imported on first use (PEP 562): the CLI reads the catalog without loading torch.
_LAZY = {
    "ANALYSES": "vlens.sweep.analyses",
    "AttentionToImage": "vlens.sweep.analyses",
    "LogitLens": "vlens.sweep.analyses",
    "ModalitySimilarity": "vlens.sweep.analyses",
    "SweepAnalysis": "vlens.sweep.analyses",
    "TokenCountCurve": "vlens.sweep.analyses",
    "VisualTokenPruning": "vlens.sweep.analyses",
    "MemoryEstimate": "vlens.sweep.memory",
    "estimate_memory": "vlens.sweep.memory",
    "SweepReport": "vlens.sweep.runner",
    "run": "vlens.sweep.runner",
    "SweepSummary": "vlens.sweep.summary",
    "load_results": "vlens.sweep.summary",
    "summarize": "vlens.sweep.summary",
}


__getattr__ = lazy_exports(globals(), _LAZY)


__all__ = [
    "ANALYSES",
    "ANALYSIS_NAMES",
    "DEFAULT_ANALYSES",
    "AttentionToImage",
    "LogitLens",
    "MemoryEstimate",
    "ModalitySimilarity",
    "SweepAnalysis",
    "SweepReport",
    "SweepSummary",
    "TokenCountCurve",
    "VisualTokenPruning",
    "estimate_memory",
    "load_results",
    "run",
    "summarize",
]
