"""A sweep's output folder: Parquet shards written atomically, and the provenance beside them.

Layout of a sweep folder::

    provenance.json                     what produced the results (see :func:`provenance`)
    skipped_at_load.json                records the loader skipped (skip_bad=True)
    shards/shard-u000012-r001-<run>.parquet
                                        one per batch: unit 12, written by rank 1 in run <run>
    summary.csv, summary.json, figures/ written by the summary step

Each shard row is one example: ``example_id``, ``index`` (its place in the data set),
``error`` (None, or why the example was skipped: its other columns are then empty),
``n_image_tokens``, ``seq_len``, ``answer_loss`` (mean cross-entropy over the answer
tokens, NaN without an answer), then each analysis's ``"<analysis>.<field>"`` columns
(lists, one entry per layer; see ``vlens.sweep.analyses``).

A shard is written to a hidden temporary file in the same folder and renamed into place
(``os.replace``, atomic on POSIX), so a shard either exists whole or not at all: a process
killed at any point leaves only finished batches behind, and a rerun redoes the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

import pandas as pd

from vlens._modules import config
from vlens.errors import SweepConfigError

if TYPE_CHECKING:
    from vlens.model import HookedVLM

PROVENANCE = "provenance.json"
SKIPPED_AT_LOAD = "skipped_at_load.json"
SHARDS = "shards"
TMP_PREFIX = ".tmp-"
# Fields of the provenance that must match to resume; the rest is informational.
IDENTITY = ("model", "analyses", "dataset", "dtype", "chat_template")


def new_run_token() -> str:
    """A short random token that names this run's shards."""
    return uuid.uuid4().hex[:8]


def shard_name(unit: int, rank: int, run: str) -> str:
    """The file name of one work unit's shard."""
    return f"shard-u{unit:06d}-r{rank:03d}-{run}.parquet"


def shard_paths(out: Path) -> list[Path]:
    """The finished shards of a sweep folder, in order."""
    folder = Path(out) / SHARDS
    return sorted(folder.glob("shard-*.parquet")) if folder.is_dir() else []


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so a killed write leaves no half file."""
    tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}-{path.name}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(out: Path, name: str, rows: list[dict[str, Any]]) -> Path:
    """Write rows as one Parquet shard, atomically (temporary file, fsync, rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(out) / SHARDS
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / name
    tmp = folder / f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}"
    table = pa.Table.from_pylist(rows)
    with open(tmp, "wb") as f:
        pq.write_table(table, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def remove_temporaries(out: Path) -> None:
    """Delete temporary files a killed run left (call before any process writes)."""
    for folder in (Path(out), Path(out) / SHARDS):
        if folder.is_dir():
            for tmp in folder.glob(f"{TMP_PREFIX}*"):
                tmp.unlink(missing_ok=True)


def finished_ids(out: Path) -> set[str]:
    """Ids of the examples some shard already holds (results or recorded errors)."""
    import pyarrow.parquet as pq

    done: set[str] = set()
    for path in shard_paths(out):
        done.update(pq.read_table(path, columns=["example_id"]).column("example_id").to_pylist())
    return done


def read_rows(out: Path) -> pd.DataFrame:
    """Every row of every shard, ordered by data-set index; raises if an example occurs twice."""
    import pyarrow.parquet as pq

    paths = shard_paths(out)
    if not paths:
        return pd.DataFrame(columns=["example_id", "index", "error"])
    frame = pd.concat([pq.read_table(p).to_pandas() for p in paths], ignore_index=True)
    dup = frame["example_id"][frame["example_id"].duplicated()]
    if len(dup):
        raise SweepConfigError(f"examples {sorted(set(dup))[:5]} occur in more than one shard of '{out}'")
    return frame.sort_values("index", kind="stable").reset_index(drop=True)


# ---- provenance ---------------------------------------------------------------------


def config_hash(model: "HookedVLM") -> str:
    """A hash of the model's Hugging Face config (path- and version-independent)."""
    cfg = config(model.hf_model).to_dict()
    for key in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"):
        cfg.pop(key, None)
    text = json.dumps(cfg, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _versions() -> dict[str, Optional[str]]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Optional[str]] = {}
    for pkg in ("vlens", "transformer-lens", "transformers", "torch", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def model_name(model: "HookedVLM") -> str:
    """The model's name as the provenance records it."""
    name = str(model.name)
    return str(Path(name).resolve()) if Path(name).exists() else name


def provenance(model: "HookedVLM", analyses: Iterable[Any], data: Any, *, chat_template: bool, batch_size: int,
               num_processes: int) -> dict[str, Any]:
    """What produced a sweep: model and config hash, versions, analyses, data set."""
    return {
        "model": {"name": model_name(model), "config_hash": config_hash(model), "family": model.adapter.family},
        "dtype": str(model.dtype),
        "chat_template": chat_template,
        "analyses": [a.describe() for a in analyses],
        "dataset": data.describe(),
        "versions": _versions(),
        "batch_size": batch_size,
        "num_processes": num_processes,
    }


def _by_name(value: Any) -> Any:
    """A list of named dicts (the analyses) as a dict by name, so diffs name the analysis."""
    if isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        return {v["name"]: {k: x for k, x in v.items() if k != "name"} for v in value}
    return value


def _diff(old: Any, new: Any, path: str) -> list[str]:
    old, new = _by_name(old), _by_name(new)
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{path}.{k}")
        return out
    old_n, new_n = json.loads(json.dumps(old, default=str)), json.loads(json.dumps(new, default=str))
    return [] if old_n == new_n else [f"{path}: folder has {old_n!r}, this run has {new_n!r}"]


def check_provenance(out: Path, current: dict[str, Any]) -> bool:
    """Compare with the folder's provenance; True when there is none yet.

    Raises:
        SweepConfigError: naming every identity field that differs.
    """
    path = Path(out) / PROVENANCE
    if not path.is_file():
        if shard_paths(out):
            raise SweepConfigError(f"'{out}' holds shards but no {PROVENANCE}; it was not made by vlens.sweep")
        return True
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SweepConfigError(f"'{path}' is not valid JSON ({exc}); cannot tell what made this folder") from exc
    diffs = [d for key in IDENTITY for d in _diff(old.get(key), current.get(key), key)]
    if diffs:
        raise SweepConfigError(
            f"'{out}' was made by a different configuration, refusing to resume into it:\n  " + "\n  ".join(diffs)
            + "\nUse a new output folder (or delete this one) to start afresh."
        )
    changed = _diff(old.get("versions"), current.get("versions"), "versions")
    if changed:
        warnings.warn(f"resuming '{out}' with other package versions: {'; '.join(changed)}", stacklevel=3)
    return False
