"""The summary step: per-layer means with confidence intervals, skipped records, figures."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union, cast

import numpy as np
import pandas as pd

from vlens.data.loaders import Skipped
from vlens.sweep import store

CURVE_COLUMNS = ("analysis", "field", "x", "mean", "ci_low", "ci_high", "std", "n")


@dataclass(frozen=True)
class SweepSummary:
    """Aggregates of a sweep folder.

    Attributes:
        curves: One row per (analysis, field, x): ``x`` is the layer index for per-layer
            fields (or the fraction index for ``token_count_curve``), ``x_value`` the layer
            index or the fraction of image tokens kept, ``mean``, ``ci_low``,
            ``ci_high`` (a ``confidence`` t-interval of the mean over examples; NaN values
            are left out), ``std`` and ``n``.
        scalars: The same for per-example scalars (``answer_loss``), ``x`` = 0.
        n_examples: Examples with results.
        skipped: Records the loader skipped and examples recorded with an error.
        figures: Paths of the figures written (empty without matplotlib).
        provenance: The folder's provenance.
    """

    curves: pd.DataFrame
    scalars: pd.DataFrame
    n_examples: int
    skipped: tuple[Skipped, ...]
    figures: tuple[Path, ...]
    provenance: dict[str, Any]


def mean_ci(values: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, ...]:
    """Per column of ``[n, x]``: mean, CI low, CI high, std, n (NaNs ignored)."""
    values = np.asarray(values, dtype=np.float64)
    n = np.sum(~np.isnan(values), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN, as they should
        mean = np.nanmean(values, axis=0) if len(values) else np.full(values.shape[1:], np.nan)
        std = np.sqrt(np.nansum((values - mean) ** 2, axis=0) / np.maximum(n - 1, 1))
        std = np.where(n > 1, std, np.nan)
        try:
            from scipy import stats

            crit = stats.t.ppf(0.5 + confidence / 2, np.maximum(n - 1, 1))
        except ImportError:  # normal approximation
            crit = np.full(n.shape, {0.9: 1.645, 0.95: 1.96, 0.99: 2.576}.get(confidence, 1.96))
        half = crit * std / np.sqrt(np.maximum(n, 1))
    return mean, mean - half, mean + half, std, n


def _stack(column: pd.Series) -> np.ndarray:
    rows = [np.asarray(v, dtype=np.float64) if v is not None else None for v in column]
    width = max((len(r) for r in rows if r is not None), default=0)
    return np.array([r if r is not None and len(r) == width else np.full(width, np.nan) for r in rows]).reshape(
        len(rows), width)


def summarize(out: Union[str, Path], confidence: float = 0.95, figures: bool = True) -> SweepSummary:
    """Aggregate a sweep folder into per-layer means with confidence intervals.

    Writes ``summary.csv`` (the curves and scalars), ``summary.json`` (counts, skipped
    records with reasons) and, with matplotlib, one figure per analysis under ``figures/``.
    """
    out = Path(out)
    prov_path = out / store.PROVENANCE
    if not prov_path.is_file():
        raise FileNotFoundError(f"'{out}' holds no {store.PROVENANCE}; it is not a sweep folder")
    prov = json.loads(prov_path.read_text())
    frame = store.read_rows(out)
    # A boolean mask selects rows: a DataFrame (pandas types frame[...] as Series | DataFrame).
    ok = cast(pd.DataFrame, frame[frame["error"].isna()]) if len(frame) else frame
    records = []
    # Curves are the numeric per-example columns; the counts axis and text columns (the
    # engine that ran) describe them.
    curve_cols = [c for c in ok.columns if "." in c and not c.endswith(".counts")
                  and not any(isinstance(v, str) for v in ok[c])]
    for col in curve_cols:
        analysis, fld = col.split(".", 1)
        stats_ = mean_ci(_stack(ok[col]), confidence)
        for x in range(len(stats_[0])):
            records.append((analysis, fld, x, *(float(s[x]) for s in stats_)))
    curves = pd.DataFrame(records, columns=CURVE_COLUMNS)
    curves.insert(3, "x_value", curves["x"].astype(float))
    fractions = {a["name"]: a["params"].get("fractions") for a in prov.get("analyses", [])}.get("token_count_curve")
    count_rows = curves["analysis"] == "token_count_curve"
    if fractions and count_rows.any():
        curves.loc[count_rows, "x_value"] = [fractions[int(x)] for x in curves.loc[count_rows, "x"]]
    scalar_records = []
    for col in ("answer_loss",):
        if col in ok.columns:
            stats_ = mean_ci(ok[col].to_numpy(dtype=np.float64)[:, None], confidence)
            scalar_records.append(("sweep", col, 0, *(float(s[0]) for s in stats_)))
    scalars = pd.DataFrame(scalar_records, columns=CURVE_COLUMNS)
    scalars.insert(3, "x_value", scalars["x"].astype(float))
    skipped_path = out / store.SKIPPED_AT_LOAD
    skipped = [Skipped(**s) for s in json.loads(skipped_path.read_text())] if skipped_path.is_file() else []
    if len(frame):
        skipped += [Skipped(str(r.example_id), str(r.error)) for r in frame[frame["error"].notna()].itertuples()]
    pd.concat([curves, scalars], ignore_index=True).to_csv(out / "summary.csv", index=False)
    store.write_json_atomic(out / "summary.json", {
        "n_examples": int(len(ok)), "n_rows": int(len(frame)), "confidence": confidence,
        "skipped": [vars(s) for s in skipped], "dataset": prov.get("dataset"),
    })
    paths = _figures(curves, out / "figures", prov) if figures and len(curves) else []
    return SweepSummary(curves, scalars, int(len(ok)), tuple(skipped), tuple(paths), prov)


def _figures(curves: pd.DataFrame, folder: Path, prov: dict[str, Any]) -> list[Path]:
    """One figure per analysis: each field's mean over examples with its CI band."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    size = prov.get("dataset", {}).get("size")
    paths = []
    for analysis, group in curves.groupby("analysis", sort=True):
        fields = list(dict.fromkeys(group["field"]))
        fig, axes = plt.subplots(1, len(fields), figsize=(4 * len(fields), 3.2), squeeze=False)
        for ax, fld in zip(axes[0], fields):
            g = group[group["field"] == fld]
            ax.plot(g["x_value"], g["mean"], marker="o", ms=3)
            ax.fill_between(g["x_value"], g["ci_low"], g["ci_high"], alpha=0.25)
            ax.set_title(fld)
            ax.set_xlabel("fraction of image tokens kept" if analysis == "token_count_curve" else "layer")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{analysis} (mean, CI; n={size})")
        fig.tight_layout()
        path = folder / f"{analysis}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def load_results(out: Union[str, Path]) -> pd.DataFrame:
    """Every per-example row of a sweep folder, in data-set order (errors included)."""
    return store.read_rows(Path(out))


__all__ = ["SweepSummary", "load_results", "mean_ci", "summarize"]
