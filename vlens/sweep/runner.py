"""``vlens.sweep.run``: analyses over a data set, sharded, resumable, data-parallel.

Work is cut into fixed units of ``batch_size`` consecutive examples (by data-set index).
Each unit becomes one batch and one Parquet shard, so the batches, and therefore the
numbers, are the same however many processes share the work and however often the sweep
is interrupted. On start every process reads which example ids the folder's shards
already hold; after a barrier, the units with unfinished examples are split between the
processes with accelerate's ``PartialState.split_between_processes``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch

from vlens.analysis.knockout import answer_losses
from vlens.data.loaders import Example, ExampleSet
from vlens.errors import DatasetError, SweepConfigError, VLensError
from vlens.sweep import store
from vlens.sweep.analyses import Batch, SweepAnalysis, build_analyses
from vlens.sweep.catalog import DEFAULT_ANALYSES
from vlens.sweep.memory import MemoryEstimate, check_budget, estimate_memory, fmt_bytes, parse_bytes

if TYPE_CHECKING:
    from accelerate import PartialState

    from vlens.inputs import VLMInputs
    from vlens.model import HookedVLM

log = logging.getLogger("vlens.sweep")


@dataclass(frozen=True)
class SweepReport:
    """What one call of :func:`run` did.

    Attributes:
        out: The sweep folder.
        total: Examples in the data set.
        already_done: Examples found finished in the folder when the run started.
        processed: Examples this process handled in this run (errors included).
        errors: Of those, examples recorded as skipped (unreadable images, with skip_bad).
        estimate: The memory estimate checked before the run (None if nothing was left to do).
        seconds: Wall time of this process's loop.
        summary: The summary (main process, when ``summarize=True`` and the sweep is complete).
    """

    out: Path
    total: int
    already_done: int
    processed: int
    errors: int
    estimate: Optional[MemoryEstimate]
    seconds: float
    summary: Any = None


def _state(device: Union[None, str, torch.device]) -> "PartialState":
    from accelerate import PartialState

    cpu = (device is not None and torch.device(device).type == "cpu") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def _load_model(
    model: Union[str, os.PathLike, "HookedVLM"],
    state: "PartialState",
    device: Union[None, str, torch.device],
    dtype: Union[None, str, torch.dtype],
    device_map: Union[None, str, dict],
) -> "HookedVLM":
    from vlens.model import HookedVLM

    if isinstance(model, HookedVLM):
        if device is not None or dtype is not None or device_map is not None:
            raise SweepConfigError("device, dtype and device_map apply when the model is given by name or path; "
                                   "this HookedVLM is already loaded")
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise SweepConfigError(f"model must be a HookedVLM, a name or a path, got {type(model).__name__}")
    if device_map is None and device is None:
        device = state.device  # one device per process under accelerate launch
    return HookedVLM.from_pretrained(model, device=device, dtype=dtype, device_map=device_map)


def _as_example_set(data: Any) -> ExampleSet:
    if isinstance(data, ExampleSet):
        return data
    if isinstance(data, (list, tuple)):
        return ExampleSet.from_examples(data)
    raise SweepConfigError(f"data must be an ExampleSet (from vlens.data.load_*) or a list of Examples, "
                           f"got {type(data).__name__}")


def _error_row(index: int, ex_id: str, reason: str) -> dict[str, Any]:
    return {"example_id": ex_id, "index": index, "error": reason}


def _load(data: ExampleSet, index: int, skip_bad: bool) -> tuple[Optional[Example], Any, Optional[str]]:
    """The example and its RGB image, or the reason it is unusable (raised unless skip_bad)."""
    try:
        ex = data[index]
        return ex, ex.load_image(), None
    except DatasetError as exc:
        if not skip_bad:
            raise
        return None, None, exc.reason


def _process(model: "HookedVLM", analyses: list[SweepAnalysis], data: ExampleSet, indices: list[int], skip_bad: bool,
             chat_template: bool, budget: float) -> list[dict[str, Any]]:
    """One batch: load, prepare, check the memory estimate of this batch, forward with the
    streaming hooks, and the rows (error rows for examples skipped)."""
    rows: dict[int, dict[str, Any]] = {}
    good: list[tuple[int, Example, Any]] = []
    for i in indices:
        ex, image, reason = _load(data, i, skip_bad)
        if reason is not None:
            rows[i] = _error_row(i, data.ids[i], reason)
        else:
            assert ex is not None  # _load gives the example whenever it gives no reason
            good.append((i, ex, image))
    good, inputs = _prepare(model, good, rows, skip_bad, chat_template)
    if good:
        assert inputs is not None  # _prepare gives inputs whenever it keeps an example
        lay = inputs.layout
        check_budget(estimate_memory(model, analyses, lay.batch_size, lay.seq_len, int(lay.image_mask.sum(1).max())),
                     budget, model.device)
        batch = Batch(inputs, [g[1] for g in good], [g[2] for g in good])
        cached = sorted({n for a in analyses if not a.stream for n in a.hook_names(model)})
        hooks = [h for a in analyses if a.stream for h in a.hooks(model, batch)]
        with torch.no_grad(), model.hooks(hooks):
            if cached:
                logits, cache = model.run_with_cache(inputs, names_filter=cached)
                for a in analyses:
                    if not a.stream:
                        a.reduce_cache(model, batch, cache)
                del cache
            else:
                logits = model(inputs)
        loss = answer_losses(logits, inputs)
        del logits
        per_analysis = [a.rows(model, batch) for a in analyses]
        for r, (i, ex, _) in enumerate(good):
            row = {"example_id": ex.id, "index": i, "error": None,
                   "n_image_tokens": int(inputs.layout.image_mask[r].sum()), "seq_len": int(inputs.layout.lengths[r]),
                   "answer_loss": loss[r]}
            for cols in per_analysis:
                row.update(cols[r])
            rows[i] = row
    return [rows[i] for i in indices]


def _prepare(model: "HookedVLM", good: list, rows: dict[int, dict[str, Any]], skip_bad: bool,
             chat_template: bool) -> tuple[list, Optional["VLMInputs"]]:
    """The batch's inputs. With skip_bad, examples the processor refuses become error rows
    (found one by one) and the rest form the batch."""

    def prepare(items: list) -> "VLMInputs":
        return model.prepare([g[2] for g in items], [g[1].prompt for g in items],
                             answer=[g[1].answer for g in items], chat_template=chat_template)

    if not good:
        return good, None
    try:
        return good, prepare(good)
    except VLensError:
        if not skip_bad:
            raise
    kept = []
    for g in good:
        try:
            prepare([g])
            kept.append(g)
        except VLensError as exc:
            rows[g[0]] = _error_row(g[0], g[1].id, f"cannot be prepared: {type(exc).__name__}: {exc}")
    return kept, (prepare(kept) if kept else None)


def run(
    model: Union[str, os.PathLike, "HookedVLM"],
    data: Union[ExampleSet, Sequence[Example]],
    out: Union[str, os.PathLike],
    analyses: Sequence[Union[str, SweepAnalysis]] = DEFAULT_ANALYSES,
    *,
    params: Optional[dict[str, dict[str, Any]]] = None,
    batch_size: int = 8,
    skip_bad: bool = False,
    chat_template: bool = True,
    device: Union[None, str, torch.device] = None,
    dtype: Union[None, str, torch.dtype] = None,
    device_map: Union[None, str, dict] = None,
    memory_budget: Union[None, int, float, str] = None,
    progress: bool = True,
    summarize: bool = True,
) -> SweepReport:
    """Run analyses over a data set, writing per-example rows as Parquet shards in ``out``.

    Rerunning the same call resumes: finished examples are skipped. Launched with
    ``accelerate launch --num_processes N`` (on CPU-only machines add ``--multi_gpu`` so
    accelerate starts N processes; several machines through accelerate's usual
    ``--num_machines``/``--machine_rank``/``--main_process_ip`` configuration, with ``out``
    on a shared file system), the processes share the work and together write exactly the
    rows of a one-process run. Do not start two independent sweeps into one folder at once.

    Args:
        model: A ``HookedVLM``, or a name/path each process loads (with ``device``,
            ``dtype``, ``device_map``; the default device is accelerate's per-process one).
        data: An ``ExampleSet`` from a ``vlens.data.load_*`` loader, or a list of ``Example``.
        out: The sweep folder (created if needed).
        analyses: Names from ``vlens.sweep.ANALYSES`` or ``SweepAnalysis`` instances.
        params: Per analysis name, keyword arguments, e.g. ``{"logit_lens": {"k": 10}}``.
        batch_size: Examples per batch (and per shard).
        skip_bad: Record examples whose image cannot be read as skipped (a row with an
            ``error``) instead of raising. Records the loader skipped are listed too.
        chat_template: Wrap prompts in the model's chat template.
        device: Passed to ``HookedVLM.from_pretrained``.
        dtype: Passed to ``HookedVLM.from_pretrained``.
        device_map: Passed to ``HookedVLM.from_pretrained``.
        memory_budget: Bytes (or ``"6GB"``, or ``"off"``) the estimated peak may use;
            default: the loaded weights plus the memory available on the device.
        progress: Show a progress bar with the time left (main process only).
        summarize: Aggregate the folder when the sweep is complete (main process).

    Returns:
        A :class:`SweepReport`.

    Raises:
        SweepConfigError: ``out`` holds a sweep made with another configuration.
        MemoryBudgetError: the estimated peak exceeds ``memory_budget``.
        DatasetError: an example's image cannot be read and ``skip_bad`` is False.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise SweepConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    budget = parse_bytes(memory_budget)
    built = build_analyses(analyses, params)
    data = _as_example_set(data)
    out = Path(out)
    state = _state(device)
    model = _load_model(model, state, device, dtype, device_map)  # a HookedVLM from here on

    meta = store.provenance(model, built, data, chat_template=chat_template, batch_size=batch_size,
                            num_processes=state.num_processes)
    fresh = store.check_provenance(out, meta)  # every process checks, so every process raises alike
    done = store.finished_ids(out)
    state.wait_for_everyone()  # nobody writes before everybody has read the folder
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        store.remove_temporaries(out)
        if fresh:
            store.write_json_atomic(out / store.PROVENANCE, meta)
            store.write_json_atomic(out / store.SKIPPED_AT_LOAD, [vars(s) for s in data.skipped])
    state.wait_for_everyone()

    ids = data.ids
    units = [list(range(s, min(s + batch_size, len(ids)))) for s in range(0, len(ids), batch_size)]
    pending = [(u, [i for i in idx if ids[i] not in done]) for u, idx in enumerate(units)]
    pending = [p for p in pending if p[1]]
    with state.split_between_processes(pending) as mine:
        mine = list(mine)
    estimate = None
    processed = errors = 0
    start = time.perf_counter()
    if mine:
        estimate = _estimate(model, built, data, mine[0][1], skip_bad, chat_template)
        budget = check_budget(estimate, budget, model.device)
        if state.is_main_process:
            log.info("memory estimate %s, budget %s; %d of %d examples to do (%d already in %s)", estimate,
                     fmt_bytes(budget), len(ids) - len(done), len(ids), len(done), out)
        run_token = store.new_run_token()
        bar = _progress(sum(len(p[1]) for p in mine), progress and state.is_main_process, state.num_processes)
        for unit, indices in mine:
            rows = _process(model, built, data, indices, skip_bad, chat_template, budget)
            store.write_shard(out, store.shard_name(unit, state.process_index, run_token), rows)
            processed += len(rows)
            errors += sum(r["error"] is not None for r in rows)
            if bar is not None:
                bar.update(len(rows))
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    state.wait_for_everyone()
    summary = None
    if summarize and state.is_main_process:
        from vlens.sweep.summary import summarize as _summarize

        if len(store.finished_ids(out)) == len(ids):
            summary = _summarize(out)
    return SweepReport(out, len(ids), len(done), processed, errors, estimate, seconds, summary)


def _estimate(model: "HookedVLM", analyses: list[SweepAnalysis], data: ExampleSet, indices: list[int], skip_bad: bool,
              chat_template: bool) -> MemoryEstimate:
    """Estimate from the layout of the first batch this process will run."""
    good = []
    for i in indices:
        ex, image, reason = _load(data, i, skip_bad)
        if reason is None:
            good.append((i, ex, image))
    good, inputs = _prepare(model, good, {}, skip_bad, chat_template)
    if inputs is None:
        return estimate_memory(model, analyses, len(indices), 1, 0)
    layout = inputs.layout
    return estimate_memory(model, analyses, len(indices), layout.seq_len, int(layout.image_mask.sum(1).max()))


def _progress(total: int, show: bool, num_processes: int) -> Any:
    if not show:
        return None
    from tqdm.auto import tqdm

    desc = "sweep" if num_processes == 1 else f"sweep (rank 0 of {num_processes})"
    return tqdm(total=total, desc=desc, unit="ex", file=sys.stderr, dynamic_ncols=True)
