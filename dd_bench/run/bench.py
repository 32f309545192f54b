"""Speed regressions as ratios to a reference workload (``dd-bench bench``).

Absolute seconds depend on the machine; the ratio of two timings taken side by side in one
process depends much less on it. Every benchmark in ``tests/benchmarks/test_ratios.py`` times
its workload with pytest-benchmark and, before each round, a fixed reference workload
(:class:`ReferenceWorkload`: a plain ConvNet-3 forward and backward of one fixed batch, built
from ``torch.nn`` alone so that no change to dd-bench can move it). The number that is kept
and gated is

    ratio = median over rounds i of (workload_i / units_per_call) / reference_i

(paired rounds, so a machine that slows down in the middle of a run slows both sides). The
absolute seconds are shown beside it and never gated.

A baseline holds, per benchmark row, the median ratio over several runs, their relative spread
((max - min) / median) and the margin that spread justifies, ``max(k * spread, floor)``. The
check fails when a ratio exceeds ``baseline * (1 + margin)``; a faster row only says so. A row
the baseline lacks (a new method) is shown as "new" and a baseline row that did not run is
"not run"; neither fails the check.

The benchmarks themselves run in a pytest subprocess (``pytest -m perf --benchmark-enable
--benchmark-json``); this module is the thin layer over that JSON: ratio rows, baselines,
comparison and the table. It also works on any JSON saved with ``--benchmark-json`` or
``--benchmark-autosave`` from those benchmarks, since each row carries its reference timings.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dd_bench.errors import ConfigError

log = logging.getLogger(__name__)

#: Threads for every benchmark and the reference: one thread keeps the ratios independent of
#: the core count (two machines with different core counts scale workloads differently).
BENCH_THREADS = 1
REFERENCE_BATCH = 16
#: The reference is timed this many times before each round and the fastest is kept: it is
#: short (~60 ms on the 2-core dev machine), so one stray interruption would move it most.
REFERENCE_REPEATS = 3
ROUNDS_ENV = "DD_BENCH_BENCH_ROUNDS"
QUICK_ROUNDS = 9
FULL_ROUNDS = 25
#: Margin = max(MARGIN_K * spread over repeated runs, MARGIN_FLOOR) (see the module docstring).
MARGIN_K = 3.0
MARGIN_FLOOR = 0.20
BASELINE_FORMAT = 1
REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH_FILE = REPO_ROOT / "tests" / "benchmarks" / "test_ratios.py"
DEFAULT_BASELINE = REPO_ROOT / "tests" / "benchmarks" / "baseline.json"


# -- measuring (used by the benchmark tests) -------------------------------------------------
class ReferenceWorkload:
    """ConvNet-3 (width 128, instance norm, ReLU, average pooling) forward + backward of one
    fixed batch of 16 single-channel 32x32 images: what a DD method spends its time on, from
    ``torch.nn`` only. Weights and batch come from a fixed seed and never change."""

    def __init__(self, batch: int = REFERENCE_BATCH, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):  # building it must not move the caller's RNG
            torch.manual_seed(seed)
            layers: list[nn.Module] = []
            channels = 1
            for _ in range(3):
                layers += [nn.Conv2d(channels, 128, 3, padding=1), nn.GroupNorm(128, 128), nn.ReLU(), nn.AvgPool2d(2)]
                channels = 128
            self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 4 * 4, 10))
        self.images = torch.randn(batch, 1, 32, 32, generator=generator)
        self.labels = torch.randint(0, 10, (batch,), generator=generator)

    def __call__(self) -> None:
        self.net.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(self.net(self.images), self.labels).backward()

    def fastest_of(self, repeats: int) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            self()
            times.append(time.perf_counter() - started)
        return min(times)


@functools.lru_cache(maxsize=1)
def reference_workload() -> ReferenceWorkload:
    """One reference per process, shared by every benchmark of a run."""
    return ReferenceWorkload()


def rounds_from_env() -> int:
    raw = os.environ.get(ROUNDS_ENV, str(FULL_ROUNDS))
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{ROUNDS_ENV}: invalid value {raw!r} (expected an integer >= 1)")
    return int(raw)


def time_against_reference(benchmark: Any, workload: Callable[[], Any], *, row: str, unit: str = "call",
                           units_per_call: float = 1, warmup_rounds: int = 1, **info: Any) -> Any:
    """Time ``workload`` with pytest-benchmark, timing the reference before each round.

    ``row`` names the benchmark in tables and baselines; ``unit`` is what one unit of work is
    ("step", "epoch", "cell") and ``units_per_call`` how many of them one call does. Extra
    keyword arguments describe the workload (kept in the JSON). Returns the last call's value.
    """
    reference = reference_workload()
    reference_times: list[float] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(BENCH_THREADS)
    try:
        result = benchmark.pedantic(workload, setup=lambda: reference_times.append(reference.fastest_of(REFERENCE_REPEATS)),
                                    rounds=rounds_from_env(), warmup_rounds=warmup_rounds, iterations=1)
    finally:
        torch.set_num_threads(threads)
    benchmark.extra_info.update(row=row, unit=unit, units_per_call=units_per_call, threads=BENCH_THREADS,
                                reference_seconds=reference_times[warmup_rounds:], **info)
    return result


# -- ratio rows ----------------------------------------------------------------------------------
@dataclass
class RatioRow:
    """One benchmark of one run: the kept ratio and the absolute seconds beside it."""

    row: str
    ratio: float
    seconds: float  # median seconds per unit of work
    reference_seconds: float  # median reference seconds
    unit: str
    rounds: int


def rows_from_pytest_json(blob: dict[str, Any], source: str = "benchmark JSON") -> list[RatioRow]:
    """Ratio rows of the benchmarks in one pytest-benchmark JSON that timed a reference."""
    if not isinstance(blob, dict) or "benchmarks" not in blob:
        raise ConfigError(f"{source}: not a pytest-benchmark JSON (no 'benchmarks' key)")
    rows = []
    for entry in blob["benchmarks"]:
        info = entry.get("extra_info", {})
        data = entry.get("stats", {}).get("data")
        reference = info.get("reference_seconds")
        if "row" not in info or not data or not reference or len(reference) != len(data):
            continue  # a benchmark without a reference (the papers'-settings ones): not a ratio row
        units = float(info.get("units_per_call", 1))
        ratios = [(work / units) / ref for work, ref in zip(data, reference)]
        rows.append(RatioRow(info["row"], statistics.median(ratios), statistics.median(data) / units,
                             statistics.median(reference), info.get("unit", "call"), len(data)))
    return sorted(rows, key=lambda r: r.row)


# -- baselines -----------------------------------------------------------------------------------
@dataclass
class BaselineEntry:
    ratio: float
    margin: float
    spread: float = 0.0
    runs: list[float] | None = None


def make_baseline(runs: list[list[RatioRow]], k: float = MARGIN_K, floor: float = MARGIN_FLOOR) -> dict[str, BaselineEntry]:
    """Per row: median ratio over ``runs``, relative spread (max - min) / median, margin max(k * spread, floor)."""
    by_row: dict[str, list[float]] = {}
    for run in runs:
        for row in run:
            by_row.setdefault(row.row, []).append(row.ratio)
    baseline = {}
    for name, ratios in sorted(by_row.items()):
        median = statistics.median(ratios)
        spread = (max(ratios) - min(ratios)) / median
        baseline[name] = BaselineEntry(median, max(k * spread, floor), spread, ratios)
    return baseline


def save_baseline(path: Path, baseline: dict[str, BaselineEntry], k: float, floor: float, note: str = "") -> None:
    blob = {
        "format": BASELINE_FORMAT,
        "what": "ratio = median over rounds of (workload seconds per unit / reference seconds); see dd_bench/run/bench.py",
        "margin_rule": f"margin = max({k:g} * (max - min) / median over {_run_count(baseline)} runs, {floor:g})",
        "note": note,
        "reference": f"plain ConvNet-3 forward+backward, batch {REFERENCE_BATCH}, {BENCH_THREADS} thread(s)",
        "machine": _machine(),
        "rows": {name: asdict(entry) for name, entry in baseline.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(blob, indent=2) + "\n")


def load_baseline(path: Path, floor: float = MARGIN_FLOOR) -> dict[str, BaselineEntry]:
    """A baseline written by ``save_baseline``, or one pytest-benchmark JSON (margin = floor)."""
    try:
        blob = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"baseline: file not found: {path}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"baseline: {path} is not JSON ({error})") from None
    if isinstance(blob, dict) and "benchmarks" in blob:
        return make_baseline([rows_from_pytest_json(blob, str(path))], k=0.0, floor=floor)
    if not isinstance(blob, dict) or blob.get("format") != BASELINE_FORMAT or not isinstance(blob.get("rows"), dict):
        raise ConfigError(f"baseline: {path} is neither a dd-bench baseline (format {BASELINE_FORMAT}) "
                          "nor a pytest-benchmark JSON")
    return {name: BaselineEntry(**entry) for name, entry in blob["rows"].items()}


def _run_count(baseline: dict[str, BaselineEntry]) -> int:
    return max((len(e.runs or []) for e in baseline.values()), default=0)


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


# -- comparing -----------------------------------------------------------------------------------
@dataclass
class Verdict:
    row: str
    status: str  # "ok", "SLOWER" (fails), "faster", "new", "not run"
    current: RatioRow | None
    baseline: BaselineEntry | None

    @property
    def change(self) -> float | None:
        if self.current is None or self.baseline is None:
            return None
        return self.current.ratio / self.baseline.ratio - 1.0

    @property
    def failed(self) -> bool:
        return self.status == "SLOWER"


def compare(rows: list[RatioRow], baseline: dict[str, BaselineEntry]) -> list[Verdict]:
    """A verdict per row: SLOWER beyond the row's margin fails; faster beyond it is reported."""
    verdicts = []
    measured = {row.row: row for row in rows}
    for name in sorted(set(measured) | set(baseline)):
        current, base = measured.get(name), baseline.get(name)
        if current is None:
            verdicts.append(Verdict(name, "not run", None, base))
            continue
        if base is None:
            verdicts.append(Verdict(name, "new", current, None))
            continue
        change = current.ratio / base.ratio - 1.0
        status = "SLOWER" if change > base.margin else "faster" if change < -base.margin else "ok"
        verdicts.append(Verdict(name, status, current, base))
    return verdicts


def render(verdicts: list[Verdict]) -> str:
    """The ratio table: kept ratio, baseline and margin, change, and the absolute seconds (never gated)."""
    header = f"{'benchmark':<16} {'ratio':>8} {'baseline':>9} {'margin':>7} {'change':>8} {'s/unit':>9} {'ref s':>8}  status"
    lines = [header, "-" * len(header)]
    for v in verdicts:
        cur, base = v.current, v.baseline
        lines.append(
            f"{v.row:<16} {_num(cur and cur.ratio, 8, '.3f')} {_num(base and base.ratio, 9, '.3f')} "
            f"{_num(base and 100 * base.margin, 7, '.0f', '%')} {_num(v.change is not None and 100 * v.change, 8, '+.1f', '%')} "
            f"{_num(cur and cur.seconds, 9, '.4f')} {_num(cur and cur.reference_seconds, 8, '.4f')}  "
            f"{v.status}{f' (per {cur.unit})' if cur else ''}")
    return "\n".join(lines)


def _num(value: Any, width: int, spec: str, suffix: str = "") -> str:
    text = "-" if value is None or value is False else f"{value:{spec}}{suffix}"
    return f"{text:>{width}}"


def verdict_line(verdicts: list[Verdict], against: str) -> str:
    failed = [v.row for v in verdicts if v.failed]
    if failed:
        return f"bench: FAIL: slower beyond the margin of {against}: {', '.join(failed)}"
    compared = sum(1 for v in verdicts if v.status in ("ok", "faster"))
    return f"bench: PASS: {compared} ratio(s) within the margins of {against}"


def render_runs(runs: list[list[RatioRow]], baseline: dict[str, BaselineEntry]) -> str:
    """Ratios of every run side by side, with spread and the margin it justifies."""
    lines = [f"{'benchmark':<16} " + " ".join(f"{'run ' + str(i + 1):>7}" for i in range(len(runs)))
             + f" {'median':>8} {'spread':>7} {'margin':>7}"]
    for name, entry in baseline.items():
        ratios = [next((r.ratio for r in run if r.row == name), None) for run in runs]
        lines.append(f"{name:<16} " + " ".join(_num(r, 7, ".3f") for r in ratios)
                     + f" {entry.ratio:8.3f} {_num(100 * entry.spread, 7, '.1f', '%')} {_num(100 * entry.margin, 7, '.0f', '%')}")
    return "\n".join(lines)


# -- running the benchmarks --------------------------------------------------------------------
class BenchRunError(RuntimeError):
    """The benchmark tests themselves failed (a broken workload, not a slow one)."""


def run_benchmarks(rounds: int, select: str | None = None, json_path: Path | None = None,
                   env: dict[str, str] | None = None, bench_file: Path = BENCH_FILE) -> tuple[list[RatioRow], list[str]]:
    """Run the ratio benchmarks once in a pytest subprocess; returns the rows and the skip reasons."""
    if not bench_file.is_file():
        raise ConfigError(f"bench: {bench_file} not found; dd-bench bench runs from a source checkout "
                          "(git clone, then pip install -e '.[dev]')")
    try:
        import pytest_benchmark  # noqa: F401  (only to say how to get it)
    except ImportError:
        raise ConfigError("bench: pytest-benchmark is not installed; pip install -e '.[dev]'") from None
    with tempfile.TemporaryDirectory(prefix="dd-bench-") as tmp:
        out = Path(json_path) if json_path else Path(tmp) / "benchmark.json"
        command = [sys.executable, "-m", "pytest", str(bench_file), "-m", "perf", "--benchmark-enable",
                   f"--benchmark-json={out}", "-q", "-rs", "-p", "no:cacheprovider"]
        if select:
            command += ["-k", select]
        child_env = {**os.environ, ROUNDS_ENV: str(rounds), **(env or {})}
        done = subprocess.run(command, cwd=bench_file.parents[2], env=child_env, capture_output=True, text=True)
        output = done.stdout + done.stderr
        if done.returncode == 5:
            raise ConfigError(f"bench: no benchmark matches -k {select!r}")
        if done.returncode != 0 or not out.is_file():
            raise BenchRunError(f"the benchmark run failed (pytest exit {done.returncode}):\n{output[-4000:]}")
        rows = rows_from_pytest_json(json.loads(out.read_text()), str(out))
    skips = [line.split(": ", 1)[-1] for line in output.splitlines() if line.startswith("SKIPPED")]
    return rows, skips


def median_rows(runs: list[list[RatioRow]]) -> list[RatioRow]:
    """One row per benchmark with the median ratio (and seconds) over runs."""
    by_row: dict[str, list[RatioRow]] = {}
    for run in runs:
        for row in run:
            by_row.setdefault(row.row, []).append(row)
    return [RatioRow(name, statistics.median(r.ratio for r in rows), statistics.median(r.seconds for r in rows),
                     statistics.median(r.reference_seconds for r in rows), rows[0].unit, sum(r.rounds for r in rows))
            for name, rows in sorted(by_row.items())]


def add_parser(commands: Any) -> None:
    """The ``dd-bench bench`` subcommand (wired into dd_bench.cli)."""
    bench = commands.add_parser("bench", help="speed benchmarks as ratios to a reference workload; save and "
                                "compare baselines")
    bench.add_argument("--quick", action="store_true", help=f"{QUICK_ROUNDS} rounds per benchmark (CI); "
                       f"default {FULL_ROUNDS}")
    bench.add_argument("--rounds", type=int, default=None, help="timed rounds per benchmark (overrides --quick)")
    bench.add_argument("--repeat", type=int, default=1, help="run the benchmarks N times (fresh processes); "
                       "the median ratio is compared and saved, the spread sets the saved margins")
    bench.add_argument("-k", dest="select", default=None, help="only benchmarks matching this pytest -k expression")
    bench.add_argument("--compare", type=Path, default=None, help="baseline to compare with: a file written by "
                       "--save, or a pytest-benchmark JSON of these benchmarks")
    bench.add_argument("--check", action="store_true", help=f"compare with the committed baseline "
                       f"({DEFAULT_BASELINE.relative_to(REPO_ROOT)}); exit 1 if a ratio regressed")
    bench.add_argument("--save", type=Path, default=None, help="write the ratios (and their margins) as a baseline")
    bench.add_argument("--from", dest="from_json", type=Path, nargs="+", default=None,
                       help="use these pytest-benchmark JSON files instead of running (one per run)")
    bench.add_argument("--json", type=Path, default=None, help="keep the pytest-benchmark JSON of each run here "
                       "(PATH, or PATH with _2, _3, ... for repeats)")
    bench.add_argument("--margin-k", type=float, default=MARGIN_K, help="margin = max(K * spread, FLOOR) when saving")
    bench.add_argument("--margin-floor", type=float, default=MARGIN_FLOOR, help="smallest margin when saving")
    bench.set_defaults(handler=command)


def command(args: argparse.Namespace) -> int:
    """Run (or read) the benchmarks, print the ratio table, compare and/or save; 1 on a regression."""
    if args.repeat < 1 or (args.rounds is not None and args.rounds < 1):
        raise ConfigError(f"bench: --repeat and --rounds must be >= 1 (got {args.repeat}, {args.rounds})")
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else FULL_ROUNDS)
    try:
        runs, skips = _collect_runs(args, rounds)
    except BenchRunError as error:
        print(f"bench: ERROR: {error}", file=sys.stderr)
        return 1
    against = args.compare or (DEFAULT_BASELINE if args.check else None)
    baseline = load_baseline(against) if against else {}
    rows = median_rows(runs)
    if len(runs) > 1:
        print(render_runs(runs, make_baseline(runs, args.margin_k, args.margin_floor)))
        print()
    print(f"ratio = workload seconds per unit / reference seconds (reference: plain ConvNet-3 forward+backward, "
          f"batch {REFERENCE_BATCH}, {BENCH_THREADS} thread); median of {rows[0].rounds if rows else 0} paired rounds"
          f"{f' over {len(runs)} runs' if len(runs) > 1 else ''}; seconds are shown, never gated")
    verdicts = compare(rows, baseline)
    print(render(verdicts))
    for reason in skips:
        print(f"skipped: {reason}")
    if args.save:
        save_baseline(args.save, make_baseline(runs, args.margin_k, args.margin_floor), args.margin_k,
                      args.margin_floor, note=f"{len(runs)} run(s) of {rows[0].rounds // len(runs) if rows else 0} rounds")
        print(f"bench: saved {len(rows)} ratio(s) to {args.save}")
    if not against:
        print("bench: no baseline compared (--check, or --compare PATH; --save PATH writes one)")
        return 0
    print(verdict_line(verdicts, str(against)))
    return 1 if any(v.failed for v in verdicts) else 0


def _collect_runs(args: argparse.Namespace, rounds: int) -> tuple[list[list[RatioRow]], list[str]]:
    if args.from_json:
        runs = []
        for path in args.from_json:
            try:
                runs.append(rows_from_pytest_json(json.loads(Path(path).read_text()), str(path)))
            except (OSError, json.JSONDecodeError) as error:
                raise ConfigError(f"--from: cannot read {path}: {error}") from None
        return runs, []
    runs, skips = [], []
    for index in range(args.repeat):
        json_path = args.json
        if json_path and index:
            json_path = json_path.with_name(f"{json_path.stem}_{index + 1}{json_path.suffix}")
        load = os.getloadavg()[0]
        print(f"bench: run {index + 1}/{args.repeat}, {rounds} rounds per benchmark "
              f"(1-minute load average before it: {load:.2f})", flush=True)
        rows, skips = run_benchmarks(rounds, args.select, json_path)
        runs.append(rows)
    return runs, skips
