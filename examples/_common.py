"""What the example scripts share (plumbing of the recipes, not part of the vlens API).

- The command line every example takes: ``--model`` (``"toy"``, a local checkpoint folder
  or a hub id), ``--device``, ``--dtype``, ``--n-scenes``, ``--out``, ``--seed``,
  ``--batch-size``.
- Held-out synthetic scenes drawn on the model's own patch grid, and each image token's
  ground-truth object (``vlens.data.scenes`` labels every patch with the object covering it).
- Small dependency-free significance tests (one-sided sign test, permutation p-value).
- Writing tables (CSV) and figures (PNG) into ``--out``.

Every example exposes a ``measure(model, scenes, ...)`` function returning a frozen
dataclass of numbers with a ``reproduced`` property; its ``main()`` prints and draws them,
and ``tests/acceptance/test_findings.py`` asserts on the same function.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, TypeVar

import numpy as np

from vlens import HookedVLM
from vlens.data import COLOURS, SHAPES, QA, Scene, make_scenes

T = TypeVar("T")

STREAM_SEED = 40_000
"""Held-out scene stream of the examples and of the acceptance tests. The toy model's own
evaluation uses stream 10,000 and tests/acceptance/test_toy_model.py 20,000; held-out scenes
are never seen in training whatever the stream (the split hashes the caption)."""

ALPHA = 0.01
"""Significance level of every pre-declared one-sided test."""

SCENE_WORDS: tuple[str, ...] = tuple(COLOURS) + tuple(SHAPES)
"""The words an object patch can be read as: its colour (first 6) or its shape (last 5)."""


# ---- command line ---------------------------------------------------------------------


def parser(doc: Optional[str], n_scenes: int, batch_size: int = 16) -> argparse.ArgumentParser:
    """The arguments every example takes (its header is the ``--help`` text)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy", help='"toy" (default), a local checkpoint folder or a hub id')
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 (default), float16 or bfloat16")
    p.add_argument("--n-scenes", type=int, default=n_scenes, help=f"held-out scenes to aggregate over ({n_scenes})")
    p.add_argument("--out", type=Path, default=None, help="folder for the CSV and PNG files (default: none written)")
    p.add_argument("--seed", type=int, default=STREAM_SEED, help=f"held-out scene stream ({STREAM_SEED})")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"scenes per forward pass ({batch_size})")
    return p


def load_model(args: argparse.Namespace) -> HookedVLM:
    return HookedVLM.from_pretrained(args.model, device=args.device, dtype=args.dtype)


# ---- scenes on the model's grid -----------------------------------------------------------


def image_grid(model: HookedVLM) -> Optional[tuple[int, int]]:
    """(rows, cols) of the whole image's token grid, None for query tokens (no grid): the
    family adapter's scene geometry."""
    return model.adapter.scene_geometry().token_grid


def scene_geometry(model: HookedVLM) -> tuple[int, int]:
    """(image_size, patch_size) of scenes whose label grid is the model's token grid, as the
    family adapter states it (``adapter.scene_geometry()``).

    The toy model: 64 px, 8 px patches (its training distribution). LLaVA-1.5 (336 px,
    24x24 tokens): 336 px, 14 px patches. Models without a grid: the vision tower's size and
    patch (the grid their query tokens' attention is drawn on).
    """
    geometry = model.adapter.scene_geometry()
    return geometry.image_size, geometry.patch_size


def heldout_scenes(model: HookedVLM, n: int, seed: int = STREAM_SEED) -> list[Scene]:
    """The first ``n`` held-out scenes of stream ``seed``, labelled on the model's grid."""
    size, patch = scene_geometry(model)
    return make_scenes(n, seed=seed, split="heldout", image_size=size, patch_size=patch)


def token_objects(scene: Scene, span: Any) -> np.ndarray:
    """Per token of an image span, the index into ``scene.objects`` of the object covering
    its patch, -1 for background (and for tokens off the whole-image grid: separators,
    high-resolution tiles, Q-Former queries)."""
    owners = np.full(span.n_tokens, -1, dtype=np.int64)
    if span.grid is None:
        return owners
    rows, cols = span.grid
    if (rows, cols) != scene.patch_labels.shape:
        raise ValueError(f"scene labels are {scene.patch_labels.shape} but the image grid is {(rows, cols)}")
    on = span.on_grid.numpy()
    rc = span.row_col.numpy()
    owners[on] = scene.patch_labels[rc[on, 0], rc[on, 1]]
    return owners


def colour_question(scene: Scene) -> QA:
    """The scene's colour question: its answer is one word only the image can give."""
    return next(qa for qa in scene.questions if qa.kind == "colour")


def target_object(scene: Scene, qa: QA) -> int:
    """Index of the object a colour question asks about (by shape or by place)."""
    for i, obj in enumerate(scene.objects):
        asked = (f"what colour is the {obj.shape} ?", f"what colour is the object at {obj.place} ?")
        if obj.colour == qa.answer and qa.question in asked:
            return i
    raise ValueError(f"no object of {scene.caption!r} answers {qa.question!r}")


def batched(items: Sequence[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), max(1, size)):
        yield list(items[start : start + size])


# ---- statistics -------------------------------------------------------------------------


def sign_test(differences: Sequence[float]) -> tuple[int, int, float]:
    """One-sided sign test that differences are more often positive than negative.

    Returns ``(n_positive, n_nonzero, p)``: ``p = P(X >= n_positive)`` for X ~ Binomial(
    n_nonzero, 1/2); exact zeros are dropped (they favour neither side).
    """
    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d) & (d != 0)]
    n, k = int(d.size), int((d > 0).sum())
    if n == 0:
        return 0, 0, 1.0
    p = sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n
    return k, n, float(p)


def permutation_p(observed: float, null: np.ndarray) -> float:
    """One-sided permutation p-value, ``(1 + #{null >= observed}) / (1 + n)``."""
    null = np.asarray(null, dtype=np.float64)
    return float((1 + (null >= observed - 1e-12).sum()) / (1 + null.size))


def nanmean(values: Any, axis: Any = None) -> Any:
    """``np.nanmean`` that returns NaN for all-NaN slices without warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of ``values[..., mask]`` over the last axis; NaN (no warning) where the mask is empty."""
    n = mask.sum(-1)
    total = np.where(mask, values, 0.0).sum(-1)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def fmt_p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def verdict(ok: bool) -> str:
    return "REPRODUCED" if ok else "NOT REPRODUCED"


# ---- output -----------------------------------------------------------------------------


def print_table(frame: Any, float_format: str = "{:.4f}") -> None:
    print(frame.to_string(index=False, float_format=lambda v: float_format.format(v)))


def write_outputs(out: Optional[Path], tables: dict[str, Any], figures: dict[str, Any]) -> list[Path]:
    """Write each table as ``<name>.csv`` and each figure as ``<name>.png`` into ``out``."""
    if out is None:
        return []
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, frame in tables.items():
        path = out / f"{name}.csv"
        frame.to_csv(path, index=False)
        written.append(path)
    for name, fig in figures.items():
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


def announce(title: str, model: HookedVLM, scenes: Sequence[Scene]) -> None:
    print(f"{title}\nmodel: {model.name} ({model.n_layers} layers), {len(scenes)} held-out scenes "
          f"(scene seeds {scenes[0].seed}..{scenes[-1].seed})\n")


def finish(written: list[Path]) -> None:
    for path in written:
        print(f"wrote {path}")
    sys.stdout.flush()


def random_weights_toy(folder: Path) -> HookedVLM:
    """The random-weights control: the toy's architecture and processor before any training
    (``vlens.zoo.config.build_model`` after ``torch.manual_seed(0)``), saved to ``folder`` and
    loaded from it the way every checkpoint is."""
    import torch

    from vlens.zoo.config import Architecture, build_model
    from vlens.zoo.processor import build_processor

    torch.manual_seed(0)
    arch = Architecture()
    processor = build_processor(arch.image_size, arch.patch_size)
    build_model(arch, processor).save_pretrained(folder)
    processor.save_pretrained(folder)
    return HookedVLM.from_pretrained(folder, device="cpu")
