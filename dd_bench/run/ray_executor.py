"""The Ray Tune executor: each pending cell is one Tune trial; the driver stores each record as its trial ends.

    executor = make_ray_executor(address=None)      # None: a local Ray sized to this machine
    run_suite(suite, options, executor=executor)    # same store, same resume rules as run_local

How a run flows:
- the driver resolves every path to an absolute one (trials run in other processes, maybe other
  machines), puts the cells and options in Ray's object store once (``tune.with_parameters``) and
  grids over cell indices, so a trial's config is just ``{"cell_index": i}``;
- a trial runs ``execute_cell`` (which turns a cell's exception into a "failed" record; a finished
  cell whose suite gained evaluations only has its saved sets evaluated) and reports
  the record, JSON-encoded, as its one and only result;
- ``_StoreRecorder``, a Tune callback in the driver, appends that record to the ``ResultStore`` the
  moment the result arrives. The driver is the only writer, so a cell is appended at most once per
  run; a trial that dies without a record (worker crash, an exception escaping the trainable) is
  appended as a "failed" record with Tune's error text. A driver killed mid-run leaves only whole
  records behind, and a rerun executes just the cells without one (``dd_bench.run.runner.plan``).

Multi-node clusters (``address``): trials write synthetic sets and shared artifacts straight to
``options.results_dir`` and ``options.cache_dir``, and read data from the suite's ``data.root``,
as absolute paths of the driver's machine; every node must see them at the same path (a shared
filesystem) and have dd-bench (and any plugin package) installed in the same environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import re
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cloudpickle
import ray
from ray import tune
from ray.tune import CLIReporter, Callback

from dd_bench.data import DATASETS
from dd_bench.errors import ConfigError
from dd_bench.method import METHODS
from dd_bench.nets import MODELS
from dd_bench.run.allocator import allocator_env
from dd_bench.run.cells import Cell
from dd_bench.run.runner import Executor, RunOptions, WorkItem, execute_cell
from dd_bench.run.store import CellResult, ResultStore, finite_json
from dd_bench.run.suite import Suite

log = logging.getLogger(__name__)

RECORD_KEY = "dd_bench_record"  # the reported metric holding the JSON-encoded record
TUNE_DIR = "_ray"  # Tune's own experiment files, under the suite's results directory

# Set in the driver before Ray starts, so that a local Ray's workers inherit them too (and passed
# as the job's runtime_env when joining a cluster).
_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # Paths reaching trials are absolute anyway; not changing directory keeps any relative path a
    # method might use meaning what it means under the local executor.
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
    # The store holds the records; Tune's CSV/JSON/TensorBoard copies of them would be clutter.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    # Tune's classic reporter: one compact table (cell, status, accuracy) instead of a box per
    # trial start and result, which would also show the record's JSON.
    "RAY_AIR_NEW_OUTPUT": "0",
    # The CPU allocator setting every cell runs under (dd_bench.run.allocator), from process start.
    **allocator_env(),
}


def make_ray_executor(address: str | None = None, *, verbose: int = 1, keep_tune_dir: bool = False) -> Executor:
    """An executor running each cell as a Ray Tune trial.

    ``address`` joins an existing cluster (``ray start --head`` prints it; "auto" finds a local one);
    None starts a private local Ray with this machine's CPUs (and GPUs) and shuts it down afterwards.
    If Ray is already initialised in this process, that instance is used and left running.
    ``verbose`` is Tune's verbosity (0 silent, 1 a status table every 30 s, 2 also each trial's
    result); runs without progress display (``RunOptions.progress`` false, ``--no-progress``) use 0.
    Each trial gets ``suite.ray.cpus_per_cell`` CPUs (Ray sets OMP_NUM_THREADS, hence torch's
    thread count, to it) and ``gpus_per_cell`` GPUs, fractions allowed (0.25: four cells per GPU).
    Tune's experiment directory (``<results>/_ray/<run>``) is removed after a run in which no trial
    errored, unless ``keep_tune_dir``.
    """

    def run_ray(items: list[WorkItem], options: RunOptions, store: ResultStore, suite: Suite) -> list[dict[str, Any]]:
        return _run(items, options, store, suite, address=address, verbose=verbose, keep_tune_dir=keep_tune_dir)

    return run_ray


# -- driver ---------------------------------------------------------------------------------
def _run(items: list[WorkItem], options: RunOptions, store: ResultStore, suite: Suite, *, address: str | None,
         verbose: int, keep_tune_dir: bool) -> list[dict[str, Any]]:
    if not items:
        return []
    cells = [item.cell for item in items]
    trial_items = [dataclasses.replace(item, cell=_absolute_cell(item.cell)) for item in items]
    trial_options = dataclasses.replace(
        options, results_dir=Path(options.results_dir).expanduser().resolve(),
        cache_dir=Path(options.cache_dir).expanduser().resolve(),
        progress=False,  # Tune's status table is the progress; per-cell bars from workers would interleave
        gpu_share=suite.ray.gpus_per_cell or None)
    resources = {"cpu": suite.ray.cpus_per_cell, "gpu": suite.ray.gpus_per_cell}
    if suite.ray.gpus_per_cell == 0 and str(options.device).startswith("cuda"):
        log.warning("device %s, but ray.gpus_per_cell is 0: Ray reserves no GPU for the cells", options.device)

    with _environment(_RAY_ENV):
        return _run_tune(cells, trial_items, trial_options, store, suite, resources, address=address,
                         verbose=verbose if options.progress else 0, keep_tune_dir=keep_tune_dir)


def _run_tune(cells: list[Cell], trial_items: list[WorkItem], trial_options: RunOptions, store: ResultStore, suite: Suite,
              resources: dict[str, float], *, address: str | None, verbose: int,
              keep_tune_dir: bool) -> list[dict[str, Any]]:
    started = _init_ray(address)
    recorder = _StoreRecorder(cells, store)
    tune_root = trial_options.results_dir / TUNE_DIR
    run_name = f"{suite.name}-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
    try:
        _check_resources(resources, joined=address is not None)
        trainable = tune.with_resources(
            tune.with_parameters(_cell_trial, items=trial_items, options=trial_options, plugins=_plugin_modules(),
                                 driver_sys_path=list(sys.path)),
            resources)
        tuner = tune.Tuner(
            trainable,
            param_space={"cell_index": tune.grid_search(list(range(len(cells))))},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=suite.ray.max_concurrent,
                # One process runs cell after cell, as run_local does: torch, dd_bench and the
                # per-process dataset cache are loaded once per worker, not once per cell.
                reuse_actors=True,
                trial_name_creator=lambda trial: _trial_name(cells, trial),
                trial_dirname_creator=lambda trial: _trial_dirname(cells, trial)),
            run_config=tune.RunConfig(
                name=run_name, storage_path=str(tune_root), verbose=verbose, callbacks=[recorder],
                progress_reporter=_reporter(),
                # A cell is deterministic: a retry would fail the same way; --retry-failed is the retry.
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
        )
        log.info("Ray Tune: %d cell(s), %g CPU and %g GPU per cell, at most %s at once", len(cells),
                 resources["cpu"], resources["gpu"], suite.ray.max_concurrent or "as resources allow")
        with _quiet_missing_metrics():
            grid = tuner.fit()
        missing = [cell for i, cell in enumerate(cells) if i not in recorder.records]
        if missing:
            # Only an interrupted Tune run (Ctrl-C, SIGUSR1) ends with trials that never reported or
            # failed; their cells have no record, so the next run picks them up.
            raise KeyboardInterrupt(f"Ray Tune stopped with {len(missing)} cell(s) unfinished")
        if not keep_tune_dir and not grid.errors:
            shutil.rmtree(tune_root / run_name, ignore_errors=True)
            _remove_if_empty(tune_root)
    finally:
        if started:
            ray.shutdown()
    return [recorder.records[i] for i in sorted(recorder.records)]


def _init_ray(address: str | None) -> bool:
    """Start or join Ray unless this process already did; True when we started it (and must stop it)."""
    if ray.is_initialized():
        log.info("Ray: using the instance this process already initialised")
        return False
    quiet = dict(logging_level=logging.WARNING, log_to_driver=True)  # workers' warnings and errors still show
    if address:
        try:
            ray.init(address=address, runtime_env={"env_vars": dict(_RAY_ENV)}, **quiet)
        except ConnectionError as error:
            cause = f"{error}: {error.__cause__}" if error.__cause__ else str(error)
            hint = ""
            if "token" in cause.lower():
                hint = (" (a cluster with token authentication, `ray start`'s default, needs RAY_AUTH_MODE=token "
                        "and its token in RAY_AUTH_TOKEN or ~/.ray/auth_token)")
            raise ConfigError(f"address: cannot join the Ray cluster at {address!r}{hint}: "
                              f"{cause.splitlines()[0]}") from error
    else:
        # "local" always starts a private instance, never attaching to someone's `ray start` cluster.
        ray.init(address="local", num_cpus=_usable_cpus(), include_dashboard=False, **quiet)
    have = ray.cluster_resources()
    log.info("Ray: %g CPU, %g GPU", have.get("CPU", 0), have.get("GPU", 0))
    return True


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """Set variables the user has not set, for this run only (a local Ray's processes inherit them)."""
    added = [name for name in values if name not in os.environ]
    os.environ.update({name: values[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


@contextlib.contextmanager
def _quiet_missing_metrics():
    """Tune's result grid warns that it found no result.json: we turned those loggers off on purpose."""
    logger = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_resources(resources: dict[str, float], joined: bool) -> None:
    have = ray.cluster_resources()
    for key, field in (("cpu", "cpus_per_cell"), ("gpu", "gpus_per_cell")):
        need, total = resources[key], have.get(key.upper(), 0.0)
        if need > total:
            message = f"ray.{field}: {need:g} but the Ray cluster has {total:g} {key.upper()}(s)"
            if not joined:
                raise ConfigError(message)
            log.warning("%s; the cells wait until an autoscaler adds some", message)


def _absolute_cell(cell: Cell) -> Cell:
    """The cell with its data root made absolute (not part of the cell id, which stays the same)."""
    root = str(Path(cell.data.root).expanduser().resolve())
    return dataclasses.replace(cell, data=dataclasses.replace(cell.data, root=root))


def _plugin_modules() -> list[str]:
    """Modules of methods, datasets and models registered in the driver (a script, a test, an entry
    point) that workers must import too: a fresh worker process only knows the built-in ones."""
    modules = set()
    for registry in (METHODS, DATASETS, MODELS):
        for name in registry.names():
            module = getattr(registry.get(name), "__module__", "") or ""
            if module == "__main__":
                log.warning("%s %r is defined in __main__, which Ray workers cannot import: put it in a module",
                            registry.kind, name)
            elif module and module.split(".")[0] != "dd_bench":
                modules.add(module)
    return sorted(modules)


def _reporter() -> Any:
    return CLIReporter(parameter_columns=[], metric_columns={"status": "result", "accuracy_mean": "acc % (first eval)"},
                       max_progress_rows=40, max_error_rows=10, max_report_frequency=30)


def _trial_name(cells: list[Cell], trial: Any) -> str:
    """What the progress table shows: the cell, readable."""
    index = trial.config["cell_index"]
    cell = cells[index]
    return re.sub(r"[^\w.=-]+", "_", f"{index:04d}_{cell.label}_{cell.dataset}_ipc{cell.ipc}_seed{cell.seed}")


def _trial_dirname(cells: list[Cell], trial: Any) -> str:
    index = trial.config["cell_index"]
    return f"cell{index:04d}_{cells[index].cell_id}"


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass


class _StoreRecorder(Callback):
    """Tune callback in the driver: appends each cell's record to the store as soon as it exists.

    Exactly once per run: a cell index is stored the first time a record (or a failure) arrives
    for it and ignored afterwards.
    """

    def __init__(self, cells: list[Cell], store: ResultStore):
        self.cells = cells
        self.store = store
        self.records: dict[int, dict[str, Any]] = {}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        index = trial.config["cell_index"]
        if RECORD_KEY in result and index not in self.records:
            self._store(index, json.loads(result[RECORD_KEY]))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        index = trial.config["cell_index"]
        if index not in self.records:
            self._store(index, self._failed(index, "RuntimeError: the trial ended without reporting a record", ""))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        index = trial.config["cell_index"]
        if index not in self.records:
            line, text = _trial_error(trial)
            self._store(index, self._failed(index, line, text))

    def _store(self, index: int, record: dict[str, Any]) -> None:
        cell = self.cells[index]
        if record.get("cell_id") != cell.cell_id:  # cannot happen unless cells and trials got out of step
            raise RuntimeError(f"trial for cell {cell.cell_id} reported a record of {record.get('cell_id')}")
        try:
            self.store.append(record)
        except ValueError as error:  # a NaN or infinity somewhere in the record: not valid JSON
            record = self._failed(index, f"ValueError: record not storable as JSON: {error}", "")
            self.store.append(record)
        self.records[index] = record
        if record["status"] == "ok":
            log.info("%s: %d steps, %.1f s distill, %d evaluation(s)", cell.describe(), record["steps"],
                     record["distill_seconds"], len(record.get("evaluations", [])))
        else:
            log.error("cell %s (%s) failed: %s", cell.cell_id, cell.describe(), record["error"])

    def _failed(self, index: int, error: str, trace: str) -> dict[str, Any]:
        cell = self.cells[index]
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return CellResult(cell.cell_id, cell.suite, "failed", cell.method, cell.label, cell.dataset, cell.ipc,
                          cell.seed, config=cell.params, method_version=cell.version,
                          deploy_ipc=list(cell.deploy_ipc), data=cell.data.identity(),
                          budget=dataclasses.asdict(cell.budget), error=error, traceback=trace or None,
                          finished_at=now).to_dict()


def _trial_error(trial: Any) -> tuple[str, str]:
    """(one line, full text) of a trial's error, from the files Tune writes before calling back."""
    text = ""
    try:
        if trial.error_file and Path(trial.error_file).is_file():
            text = Path(trial.error_file).read_text(errors="replace").strip()
    except OSError:
        pass
    line = ""
    try:
        if trial.pickled_error_file and Path(trial.pickled_error_file).is_file():
            with open(trial.pickled_error_file, "rb") as handle:
                error = cloudpickle.load(handle)
            message = next((s.strip() for s in str(error).splitlines() if s.strip()), "")
            line = f"{type(error).__name__}: {message}"
    except Exception:  # an error that cannot be unpickled here: the text file still says what happened
        pass
    if not line:
        lines = [s.strip() for s in text.splitlines() if s.strip() and not s.startswith("Failure #")]
        line = lines[0] if lines else "the trial failed (Ray gave no error text)"
    return line[:500], text


# -- worker ---------------------------------------------------------------------------------
def _cell_trial(config: dict[str, Any], items: list[WorkItem], options: RunOptions, plugins: list[str],
                driver_sys_path: list[str]) -> None:
    """The function trainable: one cell (or a finished cell's missing evaluations), one reported result."""
    _import_plugins(plugins, driver_sys_path)
    item = items[config["cell_index"]]
    record = execute_cell(item.cell, dataclasses.replace(options, device=_trial_device(options.device)), item.existing)
    payload = record.to_dict()
    try:
        encoded = json.dumps(payload, sort_keys=True, default=str, allow_nan=False)
    except ValueError:  # a NaN or infinity: keep the record, with those values as null
        encoded = json.dumps(finite_json(payload), sort_keys=True, default=str)
    first = record.evaluations[0]["accuracy_mean"] if record.evaluations else None
    tune.report({RECORD_KEY: encoded, "status": record.status, "accuracy_mean": first})


def _import_plugins(plugins: list[str], driver_sys_path: list[str]) -> None:
    for module in plugins:
        if module in sys.modules:
            continue
        try:
            importlib.import_module(module)
        except ModuleNotFoundError:
            # A local worker may lack the driver's sys.path additions (pytest, a script's own dir).
            sys.path.extend(p for p in driver_sys_path if p not in sys.path and os.path.exists(p or "."))
            importlib.import_module(module)


def _trial_device(device: str) -> str:
    """The device a trial computes on: the GPU(s) Ray assigned it (CUDA_VISIBLE_DEVICES is set to
    them, so they are cuda:0...), or the CPU when it was assigned none and the suite says auto."""
    gpus = ray.get_gpu_ids()
    if device == "auto":
        return "cuda" if gpus else "cpu"
    if device.startswith("cuda:") and gpus:
        return "cuda"  # indices are remapped inside CUDA_VISIBLE_DEVICES
    return device
