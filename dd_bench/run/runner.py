"""Running cells: one cell end to end (``execute_cell``), and a suite through an executor.

``execute_cell`` never lets a cell's exception escape (it becomes a "failed" record with its
traceback), except ``KeyboardInterrupt``, which stops the suite with nothing half-written.
"""

from __future__ import annotations

import logging
import math
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from dd_bench.run.allocator import tune_cpu_allocator
from dd_bench.run.artifacts import prepare_method
from dd_bench.errors import ConfigError
from dd_bench.eval.evaluate import EvalProtocol, evaluate
from dd_bench.run.measure import PeakMemory, Stopwatch, describe_device, environment, resolve_device
from dd_bench.method import Method, RunContext, SyntheticSet, create_method
from dd_bench.run.store import CellResult, ResultStore
from dd_bench.seeding import derive_seed, seed_everything
from dd_bench.budget import Budget
from dd_bench.run.suite import Cell, Suite

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


@dataclass
class SuiteOutcome:
    cells: int
    ran: list[dict[str, Any]] = field(default_factory=list)
    skipped_finished: int = 0
    skipped_failed: int = 0

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.ran if r["status"] == "failed"]


def load_cell_data(cell: Cell, download: bool | None = None):
    from dd_bench.data import load_dataset

    return load_dataset(cell.dataset, root=cell.data.root,
                        download=cell.data.download if download is None else download, zca=cell.data.zca)


def execute_cell(cell: Cell, options: RunOptions) -> CellResult:
    """Run one cell: prepare, distill within the budget, evaluate; always returns a record."""
    tune_cpu_allocator()  # before anything is measured, so every method runs under the same allocator
    device = resolve_device(options.device)
    store = ResultStore(options.results_dir)
    record = CellResult(cell.cell_id, cell.suite, "failed", cell.method, cell.label, cell.dataset, cell.ipc, cell.seed,
                        config=cell.params, protocol=cell.protocol.to_dict(), budget=asdict(cell.budget),
                        device=describe_device(device), env=environment(), started_at=_now())
    try:
        _run_cell_phases(cell, options, device, store, record)
        record.status = "ok"
    except KeyboardInterrupt:
        raise
    except Exception as error:  # isolate the cell: record why it failed and carry on
        record.status = "failed"
        record.error = f"{type(error).__name__}: {error}"
        record.traceback = traceback.format_exc()
        log.error("cell %s (%s) failed: %s", cell.cell_id, cell.describe(), record.error)
    record.finished_at = _now()
    return record


def _run_cell_phases(cell: Cell, options: RunOptions, device: torch.device, store: ResultStore, record: CellResult) -> None:
    seed_everything(cell.seed)
    data = load_cell_data(cell, options.download)
    record.dataset_info = data.describe()
    method = create_method(cell.method, cell.params)
    ctx = RunContext(device=device, seed=cell.seed)
    # Interim until the protocol presets land: DC's paper evaluates without augmentation, the others with DSA.
    paper_augment = "none" if method.paper_protocol == "dc" else "dsa"
    protocol = cell.protocol.resolved(paper_augment, data.dsa_strategy)
    record.protocol = protocol.to_dict()
    record.protocol_text = protocol.describe()
    record.memory_kind = "cuda_allocated" if device.type == "cuda" else "process_rss"

    with PeakMemory(device) as memory:
        prepared = prepare_method(method, data, options.cache_dir, ctx)
    record.prepare_seconds, record.prepare_cached = prepared.build_seconds, prepared.cached
    record.peak_memory_mb["prepare"] = round(memory.peak_mb, 1)

    with PeakMemory(device) as memory:
        syn, snapshots = _distill(method, data, cell, ctx, record, options.progress)
    record.peak_memory_mb["distill"] = round(memory.peak_mb, 1)
    _check_finite_set(syn, "final synthetic set")
    if method.save_set:
        set_path = store.set_path(cell.cell_id)
        syn.meta.update({"cell_id": cell.cell_id, "method": cell.method, "dataset": cell.dataset, "ipc": cell.ipc,
                         "zca": cell.data.zca, "mean": list(data.mean), "std": list(data.std)})
        syn.save(set_path)
        record.synthetic_set = str(set_path.relative_to(store.directory))

    with PeakMemory(device) as memory:
        result = evaluate(syn, data, protocol, seed=derive_seed(cell.seed, "final"), device=device)
    record.peak_memory_mb["evaluate"] = round(memory.peak_mb, 1)
    record.accuracies = [round(a, 4) for a in result.accuracies]
    record.accuracy_mean, record.accuracy_std = result.mean, result.std
    record.eval_lr, record.label_type = result.lr, result.label_type
    record.evaluate_seconds = result.train_seconds
    record.snapshots = _evaluate_snapshots(snapshots, data, protocol, cell, device, store)


def _distill(method: Method, data, cell: Cell, ctx: RunContext, record: CellResult, progress: bool):
    """The harness-owned loop: matched steps (or seconds), timing, loss curve, NaN checks, snapshots."""
    budget: Budget = cell.budget
    watch = Stopwatch(ctx.device)
    seed_everything(derive_seed(cell.seed, "distill"))
    with watch:
        state = method.init(data, cell.ipc, ctx)
    init_seconds = watch.seconds
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
    syn = method.result(state).detached()
    record.steps = steps
    record.distill_seconds = watch.seconds
    record.seconds_per_step = (watch.seconds - init_seconds) / steps if steps else None
    record.metrics = _loss_summary(losses)
    record.metrics["init_seconds"] = init_seconds
    return syn, snapshots


def _evaluate_snapshots(snapshots, data, protocol: EvalProtocol, cell: Cell, device, store: ResultStore) -> list[dict]:
    out = []
    for step, seconds, syn in snapshots:
        _check_finite_set(syn, f"snapshot at step {step}")
        result = evaluate(syn, data, protocol, seed=derive_seed(cell.seed, "final"), device=device)
        path = store.snapshot_path(cell.cell_id, step)
        syn.save(path)
        out.append({"step": step, "distill_seconds": seconds, "accuracies": result.accuracies,
                    "accuracy_mean": result.mean, "accuracy_std": result.std,
                    "synthetic_set": str(path.relative_to(store.directory))})
    return out


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
        if cell.dataset in seen:
            continue
        seen.add(cell.dataset)
        data = load_cell_data(cell, download)
        smallest = min(data.class_count(c) for c in range(data.num_classes))
        for entry in suite.methods:
            for ipc in entry.ipc or suite.ipc:
                if ipc > smallest:
                    raise ConfigError(f"ipc: {ipc} is impossible for {cell.dataset} (method {entry.label}): "
                                      f"its smallest class has {smallest} training images")


def pending_cells(suite: Suite, store: ResultStore, retry_failed: bool = False) -> tuple[list[Cell], int, int]:
    """Cells still to run, plus how many are skipped as finished and as failed earlier."""
    latest = store.latest()
    pending, finished, failed = [], 0, 0
    for cell in suite.cells():
        status = latest.get(cell.cell_id, {}).get("status")
        if status == "ok":
            finished += 1
        elif status == "failed" and not retry_failed:
            failed += 1
        else:
            pending.append(cell)
    return pending, finished, failed


Executor = Callable[[list[Cell], RunOptions, ResultStore, Suite], list[dict[str, Any]]]


def run_local(cells: list[Cell], options: RunOptions, store: ResultStore, suite: Suite) -> list[dict[str, Any]]:
    """In-process executor: cells one after another; each record is stored as soon as it exists."""
    records = []
    for cell in tqdm(cells, desc=f"suite {suite.name}", unit="cell", disable=not options.progress):
        log.info("running %s [%s]", cell.describe(), cell.cell_id)
        record = execute_cell(cell, options)
        store.append(record)
        records.append(record.to_dict())
        if record.status == "ok":
            log.info("%s: %.2f ± %.2f %% (%d steps, %.1f s distill)", cell.describe(), record.accuracy_mean,
                     record.accuracy_std, record.steps, record.distill_seconds)
    return records


def run_suite(suite: Suite, options: RunOptions, executor: Executor | None = None,
              retry_failed: bool = False) -> SuiteOutcome:
    store = ResultStore(options.results_dir)
    pending, finished, failed = pending_cells(suite, store, retry_failed)
    outcome = SuiteOutcome(cells=len(pending) + finished + failed, skipped_finished=finished, skipped_failed=failed)
    if failed:
        log.warning("%d cell(s) failed in an earlier run and are not retried (use --retry-failed)", failed)
    if not pending:
        return outcome
    preflight(suite, options.download)
    outcome.ran = (executor or run_local)(pending, options, store, suite)
    return outcome
