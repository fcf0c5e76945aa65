"""Dependency output that tells a vlens user nothing, silenced where vlens calls the dependency.

Nothing here changes the process's logging levels or warning filters: each silencer is a
context around one vlens call, restoring what it found.

- transformers draws a "Loading weights" progress bar for every checkpoint, the toy's
  (150 tensors in 10 ms) included. vlens keeps it where loading takes long enough to
  follow (checkpoints of at least ``PROGRESS_BAR_BYTES`` on disk, and hub downloads, whose
  bars are the hub client's and untouched), and hides it for small local ones.
- ``tqdm.auto``, which transformers imports, warns in a notebook without ipywidgets
  ("IProgress not found"); its text bars work there anyway.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Iterator

PROGRESS_BAR_BYTES = 1 << 30  # 1 GiB: a checkpoint that takes seconds to load


def checkpoint_bytes(source: str) -> int:
    """Bytes of weight files in a local checkpoint folder (0 when ``source`` is not one)."""
    folder = Path(source)
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".pth"))


@contextlib.contextmanager
def quiet_tqdm_import() -> Iterator[None]:
    """Import ``tqdm.auto`` (once per process) without its notebook-widget warning."""
    with warnings.catch_warnings():
        try:
            from tqdm import TqdmWarning
        except ImportError:  # pragma: no cover - tqdm is a dependency
            yield
            return
        warnings.filterwarnings("ignore", message="IProgress not found", category=TqdmWarning)
        import tqdm.auto  # noqa: F401

        yield


@contextlib.contextmanager
def weight_loading_bar(source: str) -> Iterator[None]:
    """Around ``from_pretrained``: transformers' "Loading weights" bar only for large
    checkpoints (see the module docstring); every other bar is left as it is."""
    with quiet_tqdm_import():
        from transformers.utils import logging as hf_logging

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if set_hook is None or checkpoint_bytes(source) >= PROGRESS_BAR_BYTES or not Path(source).is_dir():
        yield
        return
    previous = getattr(hf_logging, "_tqdm_hook", None)

    def hook(factory: Any, args: tuple, kwargs: dict) -> Any:
        if kwargs.get("desc") == "Loading weights":
            kwargs = {**kwargs, "disable": True}
        return previous(factory, args, kwargs) if previous is not None else factory(*args, **kwargs)

    set_hook(hook)
    try:
        yield
    finally:
        set_hook(previous)
