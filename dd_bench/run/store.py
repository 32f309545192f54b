"""The result store: ``results/<suite>/results.jsonl`` plus the synthetic sets beside it.

Records are format 2 (``CellResult``): one JSON line per finished cell holding a list of
``evaluations``. Lines written by the format-1 store (one protocol per record, before this
change) are upgraded when read (``dd_bench.run.legacy``), so old results keep loading and
reporting, and a suite re-run over them evaluates their saved sets instead of distilling again.

Append-only and crash-safe:
- each record is one JSON line written with a single ``write`` on an ``O_APPEND`` descriptor,
  then ``fsync``ed, under an exclusive ``flock`` (several Ray workers may append at once);
- a line torn by a crash (no trailing newline) is cut off before the next append, and is
  ignored when reading, so a killed run never leaves a corrupt record behind;
- the newest record of a cell wins, so ``--retry-failed`` simply appends the new outcome.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from dd_bench.errors import ConfigError
from dd_bench.run.legacy import upgrade_format1

log = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"


FORMAT = 2


@dataclass
class CellResult:
    """One finished (or failed) cell: what ran, what it cost, and every evaluation of its sets.

    Costs are per phase: ``prepare_seconds`` is the build time of the shared artifact the cell
    used (also when this run found it cached: ``prepare_cached``), ``init_seconds`` the
    method's ``init`` (compilation warm-ups included), ``distill_seconds`` the steps alone,
    ``sets[i].produce_seconds`` what producing each set took after the steps (a generator's
    forward pass at each deployed IPC). ``evaluations`` holds one entry per (set, protocol,
    architecture), snapshots' entries carry their ``step``.
    """

    cell_id: str
    suite: str
    status: str  # "ok" | "failed"
    method: str
    label: str
    dataset: str
    ipc: int
    seed: int
    config: dict[str, Any]
    method_version: str = "1"
    traits: dict[str, Any] = field(default_factory=dict)
    deploy_ipc: list[int] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] = field(default_factory=dict)
    steps: int = 0
    prepare_seconds: float = 0.0
    prepare_cached: bool = False
    artifact: dict[str, Any] | None = None
    init_seconds: float = 0.0
    distill_seconds: float = 0.0
    seconds_per_step: float | None = None
    evaluate_seconds: float = 0.0
    sets: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    peak_memory_mb: dict[str, float] = field(default_factory=dict)
    memory_kind: str = ""
    device: str = ""
    gpu_share: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    dataset_info: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    traceback: str | None = None
    started_at: str = ""
    finished_at: str = ""
    format: int = FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def finite_json(value: Any) -> Any:
    """Strict JSON has no NaN: a non-finite number is stored as null (shown as missing)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


class ResultStore:
    """Reads and appends the records of one suite's results directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / RESULTS_FILE

    # -- writing ------------------------------------------------------------------------
    def append(self, record: CellResult | dict[str, Any]) -> None:
        data = record.to_dict() if isinstance(record, CellResult) else record
        line = (json.dumps(finite_json(data), sort_keys=True, default=str, allow_nan=False) + "\n").encode()
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._cut_torn_tail(fd)
            os.write(fd, line)
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @staticmethod
    def _cut_torn_tail(fd: int) -> None:
        """Drop a last line without its newline: it is a record a crash interrupted."""
        size = os.fstat(fd).st_size
        if size == 0:
            return
        if os.pread(fd, 1, size - 1) == b"\n":
            return
        chunk = min(size, 1 << 20)
        tail = os.pread(fd, chunk, size - chunk)
        cut = tail.rfind(b"\n")
        keep = (size - chunk + cut + 1) if cut >= 0 else 0
        log.warning("results: dropping a torn last record (%d bytes) left by an interrupted run", size - keep)
        os.ftruncate(fd, keep)

    def set_path(self, cell_id: str, ipc: int | None = None) -> Path:
        """The final set of a cell (``ipc`` given: a generator's set deployed at that IPC)."""
        suffix = f".ipc{ipc}" if ipc is not None else ""
        return self.directory / "sets" / f"{cell_id}{suffix}.pt"

    def snapshot_path(self, cell_id: str, step: int) -> Path:
        return self.directory / "sets" / f"{cell_id}.step{step}.pt"

    # -- reading ------------------------------------------------------------------------
    def records(self) -> Iterator[dict[str, Any]]:
        """Every complete record in format 2, oldest first (a torn or unreadable line is skipped;
        format-1 lines are upgraded as they are read)."""
        if not self.path.exists():
            return
        with self.path.open("rb") as handle:
            for number, raw in enumerate(handle, 1):
                if not raw.endswith(b"\n"):
                    log.warning("results: ignoring torn line %d of %s", number, self.path)
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError:
                    log.warning("results: ignoring unreadable line %d of %s", number, self.path)
                    continue
                yield upgrade_record(record, number, self.path)

    def latest(self) -> dict[str, dict[str, Any]]:
        """The newest record of each cell."""
        latest: dict[str, dict[str, Any]] = {}
        for record in self.records():
            latest[record["cell_id"]] = record
        return latest

    def finished_ids(self) -> set[str]:
        return {cid for cid, r in self.latest().items() if r.get("status") == "ok"}

    def failed_ids(self) -> set[str]:
        return {cid for cid, r in self.latest().items() if r.get("status") == "failed"}


def upgrade_record(record: dict[str, Any], line: int = 0, path: Path | None = None) -> dict[str, Any]:
    """A record in the current format: format 2 passes through, format 1 is upgraded.

    A record from a newer dd-bench is refused with a line saying what to do.
    """
    version = record.get("format", 1)
    if version == FORMAT:
        return record
    if version == 1:
        return upgrade_format1(record)
    raise ConfigError(f"results: line {line} of {path} is format {version}, newer than this dd-bench reads "
                      f"(format {FORMAT}); upgrade dd-bench to read it")
