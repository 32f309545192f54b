"""Running cells: one cell end to end (``execute_cell``), and a suite through an executor.

One cell, in phases, each timed and its peak memory measured apart:

1. **prepare**: the method's shared artifact, built once per spec (``dd_bench.run.artifacts``);
   ``prepare_suite`` has normally built it already, and the record still carries its cost;
2. **init** and **distill**: the harness-owned loop (matched steps or seconds, loss curve,
   NaN checks, snapshots every ``snapshot_every`` steps);
3. **produce**: the set at the adaptation IPC (``result``) and, for a generator, one set per
   ``deploy_ipc`` (``deploy``), each with its own ``produce_seconds``; every set is saved;
4. **evaluate**: every (set, protocol, architecture) the suite asks for; snapshots under every
   protocol with the first architecture.

A finished cell that lacks some evaluation (a protocol or model added to the suite later) is
not distilled again: its saved sets are loaded and only the missing evaluations run.

``execute_cell`` never lets a cell's exception escape (it becomes a "failed" record with its
traceback), except ``KeyboardInterrupt``, which stops the suite with nothing half-written.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dd_bench.budget import Budget
from dd_bench.data import Dataset, load_dataset
from dd_bench.errors import ConfigError
from dd_bench.eval.evaluate import evaluate
from dd_bench.eval.protocol import AUTO, EVAL_VERSION, ProtocolSpec, resolve
from dd_bench.method import Method, RunContext, SyntheticSet, create_method
from dd_bench.run.allocator import tune_cpu_allocator
from dd_bench.run.artifacts import prepare_method
from dd_bench.run.cells import Cell, EvalRequest
from dd_bench.run.measure import (PeakMemory, Stopwatch, configure_device, describe_device, environment,
                                  resolve_device)
from dd_bench.run.store import CellResult, ResultStore
from dd_bench.run.suite import Suite
from dd_bench.seeding import derive_seed, seed_everything

log = logging.getLogger(__name__)

LOSS_HISTORY_POINTS = 200  # the loss curve kept in a record is subsampled to at most this many points


class NonFiniteError(RuntimeError):
    """A method produced NaN or infinite values (loss or images)."""


@dataclass
class RunOptions:
    """Where a run writes and computes; not part of a cell's identity."""

    results_dir: Path
    cache_dir: Path
    device: str = "auto"
    download: bool | None = None  # overrides the suite's data.download when set
    progress: bool = True
    gpu_share: float | None = None  # the fraction of a GPU a Ray trial holds (its timings are shared ones below 1)


@dataclass
class WorkItem:
    """A cell to run: distil and evaluate (``existing`` None), or evaluate a finished cell's sets."""

    cell: Cell
    existing: dict[str, Any] | None = None
    missing: list[tuple[EvalRequest, int, int | None]] = field(default_factory=list)


@dataclass
class SuiteOutcome:
    cells: int
    ran: list[dict[str, Any]] = field(default_factory=list)
    skipped_finished: int = 0
    skipped_failed: int = 0
    evaluated_only: int = 0

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.ran if r["status"] == "failed"]


# -- data ---------------------------------------------------------------------------------------
def dataset_loader(cell: Cell, download: bool | None = None) -> Callable[[str], Dataset]:
    """``load_dataset`` bound to the cell's data settings (root, download permission, ZCA)."""
    data = cell.data

    def load(name: str) -> Dataset:
        return load_dataset(name, root=data.root, download=data.download if download is None else download,
                            zca=data.zca, zca_mode=data.zca_mode, zca_reg=data.zca_reg)

    return load


def load_cell_data(cell: Cell, download: bool | None = None) -> Dataset:
    return dataset_loader(cell, download)(cell.dataset)


_ON_DEVICE: dict[tuple[str, str, str], Dataset] = {}


def on_device(data: Dataset, device: torch.device) -> Dataset:
    """``data`` with its tensors on ``device``, moved once per process (a Ray worker runs many cells)."""
    if device.type == "cpu":
        return data
    key = (data.name, data.fingerprint(), str(device))
    if key not in _ON_DEVICE:
        _ON_DEVICE[key] = data.to(device)
    return _ON_DEVICE[key]


def _context(cell: Cell, options: RunOptions, device: torch.device) -> RunContext:
    return RunContext(device=device, seed=cell.seed, budget=cell.budget,
                      load_dataset=dataset_loader(cell, options.download), progress=options.progress)


# -- one cell -------------------------------------------------------------------------------------
def execute_cell(cell: Cell, options: RunOptions, existing: dict[str, Any] | None = None) -> CellResult:
    """Run one cell (or, with ``existing``, evaluate its saved sets); always returns a record."""
    tune_cpu_allocator()  # before anything is measured, so every method runs under the same allocator
    device = resolve_device(options.device)
    if existing is not None:
        record = CellResult(**{k: copy.deepcopy(v) for k, v in existing.items() if k in CellResult.__dataclass_fields__})
        # The environment the cell was distilled in stays; each later evaluation adds its own.
        env = environment()
        record.env.setdefault("evaluated_later", []).append(
            {"at": _now(), "git_commit": env["git_commit"], "versions": env["versions"], "device": describe_device(device)})
    else:
        record = CellResult(cell.cell_id, cell.suite, "failed", cell.method, cell.label, cell.dataset, cell.ipc,
                            cell.seed, config=cell.params, method_version=cell.version,
                            deploy_ipc=list(cell.deploy_ipc), data=cell.data.identity(), budget=asdict(cell.budget),
                            device=describe_device(device), env=environment(), started_at=_now(),
                            gpu_share=options.gpu_share if device.type == "cuda" else None)
    try:
        if existing is not None:
            _evaluate_saved(cell, options, device, record)
        else:
            _run_cell_phases(cell, options, device, record)
        record.status = "ok"
        record.error = None
    except KeyboardInterrupt:
        raise
    except Exception as error:  # isolate the cell: record why it failed and carry on
        if existing is not None:
            # The distilled sets and earlier evaluations stay valid: the cell stays "ok", the
            # error is noted, and the next run tries the missing evaluations again.
            record.error = f"evaluating the saved sets failed: {type(error).__name__}: {error}"
            record.traceback = traceback.format_exc()
            log.error("cell %s (%s): %s", cell.cell_id, cell.describe(), record.error)
            record.finished_at = _now()
            return record
        record.status = "failed"
        record.error = f"{type(error).__name__}: {error}"
        record.traceback = traceback.format_exc()
        log.error("cell %s (%s) failed: %s", cell.cell_id, cell.describe(), record.error)
    record.finished_at = _now()
    return record


def _run_cell_phases(cell: Cell, options: RunOptions, device: torch.device, record: CellResult) -> None:
    seed_everything(cell.seed)
    data = on_device(load_cell_data(cell, options.download), device)  # once per worker, outside every timer
    record.env["device_settings"] = configure_device(device)
    record.dataset_info = data.describe()
    method = create_method(cell.method, cell.params)
    record.traits = type(method).traits()
    record.memory_kind = "cuda_allocated" if device.type == "cuda" else "process_rss"
    ctx = _context(cell, options, device)

    with PeakMemory(device) as memory:
        prepared = prepare_method(method, data, options.cache_dir, ctx, ctx.load_dataset)
    record.prepare_seconds, record.prepare_cached = prepared.build_seconds, prepared.cached
    record.artifact = prepared.describe()
    record.peak_memory_mb["prepare"] = round(memory.peak_mb, 1)
    ctx.artifact_dir = prepared.directory

    with PeakMemory(device) as memory:
        sets, snapshots = _distill(method, data, cell, ctx, record, options.progress)
    record.peak_memory_mb["distill"] = round(memory.peak_mb, 1)
    store = ResultStore(options.results_dir)
    for ipc, (syn, produce_seconds) in sets.items():
        _check_finite_set(syn, f"set at ipc {ipc}")
        entry: dict[str, Any] = {"ipc": ipc, "produce_seconds": produce_seconds, "size": len(syn), "path": None}
        if method.save_set:
            path = store.set_path(cell.cell_id, None if ipc == cell.ipc else ipc)
            _set_meta(syn, cell, data, ipc)
            syn.save(path)
            entry["path"] = str(path.relative_to(store.directory))
        record.sets.append(entry)
    for step, seconds, syn in snapshots:
        _check_finite_set(syn, f"snapshot at step {step}")
        path = store.snapshot_path(cell.cell_id, step)
        _set_meta(syn, cell, data, cell.ipc)
        syn.save(path)
        record.snapshots.append({"step": step, "distill_seconds": seconds, "path": str(path.relative_to(store.directory))})

    work = [(request, ipc, None, syn) for ipc, (syn, _) in sets.items() for request in cell.requests]
    work += [(request, cell.ipc, step, syn) for step, _, syn in snapshots for request in _snapshot_requests(cell)]
    with PeakMemory(device) as memory:
        _evaluate_all(work, method, data, cell, device, record)
    record.peak_memory_mb["evaluate"] = round(memory.peak_mb, 1)


def _snapshot_requests(cell: Cell) -> list[EvalRequest]:
    """Snapshots are evaluated under every protocol, with the first evaluation architecture only."""
    first = cell.requests[0].model
    return [r for r in cell.requests if r.model == first]


def _set_meta(syn: SyntheticSet, cell: Cell, data: Dataset, ipc: int) -> None:
    """What a reader of the set needs: its origin and the space it lives in (normalisation, ZCA)."""
    syn.meta.update({"cell_id": cell.cell_id, "method": cell.method, "dataset": cell.dataset, "ipc": ipc,
                     "zca": cell.data.zca, "zca_mode": cell.data.zca_mode if cell.data.zca else None,
                     "zca_reg": cell.data.zca_reg if cell.data.zca else None,
                     "mean": list(data.mean), "std": list(data.std)})


def _distill(method: Method, data: Dataset, cell: Cell, ctx: RunContext, record: CellResult, progress: bool):
    """The harness-owned loop, then the sets at every IPC the cell produces."""
    budget: Budget = cell.budget
    seed_everything(derive_seed(cell.seed, "distill"))
    init_watch, watch = Stopwatch(ctx.device), Stopwatch(ctx.device)
    with init_watch:
        state = method.init(data, cell.ipc, ctx)
    losses: list[float] = []
    snapshots: list[tuple[int, float, SyntheticSet]] = []
    steps = 0
    bar = tqdm(total=budget.steps, desc=cell.describe(), leave=False, disable=not progress or not method.iterative)
    while method.iterative:
        if budget.steps is not None and steps >= budget.steps:
            break
        if budget.seconds is not None and watch.seconds >= budget.seconds:
            break
        with watch:
            metrics = method.step(state, ctx)
        steps += 1
        loss = metrics.get("loss") if metrics else None
        if loss is not None:
            if not math.isfinite(loss):
                raise NonFiniteError(f"step {steps}: loss is {loss}")
            losses.append(float(loss))
            bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        bar.update(1)
        if budget.snapshot_every and steps % budget.snapshot_every == 0 and steps != budget.steps:
            snapshots.append((steps, watch.seconds, method.result(state).detached()))
    bar.close()
    record.steps = steps
    record.init_seconds = init_watch.seconds
    record.distill_seconds = watch.seconds
    record.seconds_per_step = watch.seconds / steps if steps else None
    record.metrics = _loss_summary(losses)
    sets: dict[int, tuple[SyntheticSet, float]] = {}
    for ipc in cell.produced_ipcs:
        produce = Stopwatch(ctx.device)
        with produce:
            syn = method.result(state) if ipc == cell.ipc else method.deploy(state, ipc, ctx)
        sets[ipc] = (syn.detached(), produce.seconds)
    return sets, snapshots


def _evaluate_all(work: list[tuple[EvalRequest, int, int | None, SyntheticSet]], method: Method, data: Dataset,
                  cell: Cell, device: torch.device, record: CellResult) -> None:
    paper_protocol = ProtocolSpec("paper", AUTO).protocol_for(type(method).paper_protocol)
    own_strategy = getattr(method.config, "dsa_strategy", None)
    for request, ipc, step, syn in work:
        protocol = resolve(request.protocol, paper=paper_protocol, model=request.model, dataset=data,
                           set_size=len(syn), method_dsa_strategy=own_strategy)
        result = evaluate(syn, data, protocol, seed=derive_seed(cell.seed, "final"), device=device)
        record.evaluations.append({
            "protocol_name": request.name, "request_key": request.key, "protocol": result.protocol,
            "protocol_text": result.protocol_text, "model": request.model, "ipc": ipc, "step": step,
            "accuracies": [round(a, 4) for a in result.accuracies], "accuracy_mean": result.mean,
            "accuracy_std": result.std, "seconds": result.train_seconds, "lr": result.lr,
            "label_type": result.label_type, "eval_version": EVAL_VERSION})
        record.evaluate_seconds += result.train_seconds
        where = f"ipc {ipc}" + (f", step {step}" if step is not None else "")
        log.info("%s [%s, %s]: %.2f ± %.2f %%", cell.describe(), request.group, where, result.mean, result.std)


def missing_evaluations(cell: Cell, record: dict[str, Any]) -> list[tuple[EvalRequest, int, int | None]]:
    """(request, ipc, step) the suite asks for that ``record`` has no current evaluation of."""
    done = {(e.get("request_key"), e.get("ipc"), e.get("step")) for e in record.get("evaluations", [])
            if e.get("eval_version") == EVAL_VERSION}
    wanted = [(r, ipc, None) for ipc in cell.produced_ipcs for r in cell.requests]
    wanted += [(r, cell.ipc, snap["step"]) for snap in record.get("snapshots", []) for r in _snapshot_requests(cell)]
    return [(r, ipc, step) for r, ipc, step in wanted if (r.key, ipc, step) not in done]


def _evaluate_saved(cell: Cell, options: RunOptions, device: torch.device, record: CellResult) -> None:
    """Evaluate a finished cell's saved sets under the evaluations it lacks; no distillation."""
    missing = missing_evaluations(cell, asdict(record))
    store = ResultStore(options.results_dir)
    paths = {s["ipc"]: s.get("path") for s in record.sets}
    paths.update({("step", s["step"]): s.get("path") for s in record.snapshots})
    log.info("%s: distilled in an earlier run; evaluating its saved sets only (%d new evaluation(s))",
             cell.describe(), len(missing))
    seed_everything(cell.seed)
    data = on_device(load_cell_data(cell, options.download), device)
    configure_device(device)
    method = create_method(cell.method, cell.params)
    work = []
    for request, ipc, step in missing:
        path = paths.get(("step", step) if step is not None else ipc)
        work.append((request, ipc, step, SyntheticSet.load(store.directory / path)))
    with PeakMemory(device) as memory:
        _evaluate_all(work, method, data, cell, device, record)
    record.peak_memory_mb["evaluate"] = round(max(memory.peak_mb, record.peak_memory_mb.get("evaluate", 0.0)), 1)


def _loss_summary(losses: list[float]) -> dict[str, Any]:
    if not losses:
        return {}
    stride = max(1, math.ceil(len(losses) / LOSS_HISTORY_POINTS))
    return {"loss_first": losses[0], "loss_last": losses[-1], "loss_history_stride": stride,
            "loss_history": losses[::stride]}


def _check_finite_set(syn: SyntheticSet, what: str) -> None:
    if not torch.isfinite(syn.images).all():
        raise NonFiniteError(f"{what}: images contain NaN or Inf")
    if syn.labels.is_floating_point() and not torch.isfinite(syn.labels).all():
        raise NonFiniteError(f"{what}: labels contain NaN or Inf")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- suites -------------------------------------------------------------------------------
def preflight(suite: Suite, download: bool | None = None) -> None:
    """Checks that need the data, done before any work: data present, every IPC possible."""
    seen = set()
    for cell in suite.cells():
        if (cell.dataset, cell.data) in seen:
            continue
        seen.add((cell.dataset, cell.data))
        data = load_cell_data(cell, download)
        smallest = min(data.class_count(c) for c in range(data.num_classes))
        for entry in suite.methods:
            for ipc in (*(entry.ipc or suite.ipc), *entry.deploy_ipc):
                if ipc > smallest:
                    raise ConfigError(f"ipc: {ipc} is impossible for {cell.dataset} (method {entry.label}): "
                                      f"its smallest class has {smallest} training images")


def plan(suite: Suite, store: ResultStore, retry_failed: bool = False) -> tuple[list[WorkItem], int, int]:
    """What a run must do: cells to distil, finished cells to evaluate further; and how many
    cells are skipped as finished and as failed earlier."""
    latest = store.latest()
    work, finished, failed = [], 0, 0
    for cell in suite.cells():
        record = latest.get(cell.cell_id)
        status = (record or {}).get("status")
        if status == "ok":
            missing = missing_evaluations(cell, record)
            sets_saved = all(s.get("path") for s in record.get("sets", [])) and record.get("sets")
            if not missing:
                finished += 1
            elif sets_saved:
                work.append(WorkItem(cell, record, missing))
            else:  # nothing saved to evaluate (e.g. the whole training set): cheap to run again
                work.append(WorkItem(cell))
        elif status == "failed" and not retry_failed:
            failed += 1
        else:
            work.append(WorkItem(cell))
    return work, finished, failed


def prepare_suite(suite: Suite, options: RunOptions, cells: list[Cell] | None = None) -> list[dict[str, Any]]:
    """Build every artifact the suite's cells need, first, with the whole machine; returns one
    line of facts per artifact (key, seconds, cached)."""
    device = resolve_device(options.device)
    seen: dict[str, dict[str, Any]] = {}
    for cell in cells if cells is not None else suite.cells():
        method = create_method(cell.method, cell.params)
        if type(method).artifact_spec is Method.artifact_spec:
            continue
        data = load_cell_data(cell, options.download)
        if method.artifact_spec(data) is None:
            continue
        ctx = _context(cell, options, device)
        prepared = prepare_method(method, data, options.cache_dir, ctx, ctx.load_dataset)
        if prepared.key not in seen:
            seen[prepared.key] = {"method": cell.method, "dataset": cell.dataset, **prepared.describe()}
    return list(seen.values())


Executor = Callable[[list[WorkItem], RunOptions, ResultStore, Suite], list[dict[str, Any]]]


def run_local(items: list[WorkItem], options: RunOptions, store: ResultStore, suite: Suite) -> list[dict[str, Any]]:
    """In-process executor: one item after another; each record is stored as soon as it exists."""
    records = []
    for item in tqdm(items, desc=f"suite {suite.name}", unit="cell", disable=not options.progress):
        cell = item.cell
        log.info("%s %s [%s]", "evaluating" if item.existing else "running", cell.describe(), cell.cell_id)
        record = execute_cell(cell, options, item.existing)
        store.append(record)
        records.append(record.to_dict())
        if record.status == "ok" and item.existing is None:
            log.info("%s: %d steps, %.1f s distill (+%.1f s init)", cell.describe(), record.steps,
                     record.distill_seconds, record.init_seconds)
    return records


def run_suite(suite: Suite, options: RunOptions, executor: Executor | None = None,
              retry_failed: bool = False) -> SuiteOutcome:
    store = ResultStore(options.results_dir)
    items, finished, failed = plan(suite, store, retry_failed)
    evaluated_only = sum(1 for i in items if i.existing is not None)
    outcome = SuiteOutcome(cells=len(items) + finished + failed, skipped_finished=finished, skipped_failed=failed,
                           evaluated_only=evaluated_only)
    if failed:
        log.warning("%d cell(s) failed in an earlier run and are not retried (use --retry-failed)", failed)
    if not items:
        return outcome
    preflight(suite, options.download)
    started = time.perf_counter()
    built = prepare_suite(suite, options, [i.cell for i in items if i.existing is None])
    for line in built:
        log.info("artifact %s (%s, %s): %s, %.1f s to build", line["key"], line["method"], line["dataset"],
                 "cached" if line["cached"] else "built now", line["build_seconds"])
    if built:
        log.info("prepare: %d artifact(s) ready in %.1f s", len(built), time.perf_counter() - started)
    outcome.ran = (executor or run_local)(items, options, store, suite)
    return outcome
