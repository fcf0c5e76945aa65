"""Exceptions vlens raises for inputs it cannot use.

Each error subclasses the built-in a caller would expect (ValueError, TypeError,
FileNotFoundError), so ``except ValueError`` keeps working, and each message names
the offending value and what would have been accepted.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VLensError(Exception):
    """Base class of every error vlens raises on purpose."""


class UnsupportedArchitectureError(VLensError, ValueError):
    """The checkpoint's architecture or one of its settings is not handled."""


class UnstatedFactError(UnsupportedArchitectureError, NotImplementedError):
    """A family adapter does not state a fact of its family that vlens needs (see
    ``vlens.adapters.contract``): vlens refuses rather than assume a default."""


class CheckpointNotFoundError(VLensError, FileNotFoundError):
    """A local checkpoint folder is missing or does not hold a loadable model."""


class ImageInputError(VLensError, TypeError):
    """An image argument is of a type vlens does not accept."""


class ImageFileError(VLensError, ValueError):
    """A path points to a file that cannot be read as an image."""


class PromptError(VLensError, ValueError):
    """A prompt, answer or batch of them is malformed."""


class HookNameError(VLensError, ValueError):
    """A hook name or pattern matches nothing on this model."""


class DeviceError(VLensError, ValueError):
    """A device or dtype cannot be used on this machine."""


class AnalysisInputError(VLensError, ValueError):
    """An analysis was given arguments it cannot work with."""


class AnalysisUndefinedError(AnalysisInputError):
    """An analysis is not defined for this model (its architecture leaves the quantity without
    a meaning), whatever the arguments; the report shows the reason instead of a failure."""


def closest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The candidates that look most like ``name``, for 'did you mean' messages."""
    pool = list(candidates)
    found = difflib.get_close_matches(name, pool, n=n, cutoff=0.5)
    if not found:
        # Fall back to names sharing the last dotted part, e.g. every 'hook_resid_post'.
        tail = name.rsplit(".", 1)[-1]
        found = [c for c in pool if c.endswith(tail)][:n]
    return found


class DatasetError(VLensError, ValueError):
    """A data set file or one of its records cannot be used.

    Attributes:
        record: Id (or line number) of the offending record, None for a whole-file problem.
        reason: What is wrong with it.
    """

    def __init__(self, message: str, record: object = None, reason: str = "") -> None:
        super().__init__(message)
        self.record = record
        self.reason = reason or message


class SweepConfigError(VLensError, ValueError):
    """A sweep's output folder was made by a different configuration, or its settings are invalid."""


class MemoryBudgetError(VLensError, MemoryError):
    """A run is estimated to need more memory than its budget."""
