import json
import os
import shutil
from pathlib import Path

import pytest

from dd_bench.errors import ConfigError
from dd_bench.run.store import CellResult, ResultStore

LEGACY = Path(__file__).parent.parent / "fixtures" / "legacy_v1"


def _record(cell_id: str, status: str = "ok", **extra) -> CellResult:
    return CellResult(cell_id, "s", status, "random", "random", "mnist_sample", 1, 0, {}, **extra)


def test_append_and_latest_wins(tmp_path):
    store = ResultStore(tmp_path)
    store.append(_record("a", "failed", error="boom"))
    store.append(_record("b"))
    store.append(_record("a", "ok"))
    assert store.finished_ids() == {"a", "b"}
    assert store.failed_ids() == set()
    assert len(list(store.records())) == 3


def test_torn_tail_is_ignored_then_cut(tmp_path):
    store = ResultStore(tmp_path)
    store.append(_record("a"))
    with open(store.path, "ab") as handle:  # what a crash in the middle of a write leaves
        handle.write(b'{"cell_id": "b", "status": "o')
    assert store.finished_ids() == {"a"}
    store.append(_record("c"))
    lines = store.path.read_bytes().splitlines()
    assert [json.loads(line)["cell_id"] for line in lines] == ["a", "c"]
    assert store.path.read_bytes().endswith(b"\n")


def test_concurrent_appends_from_processes_never_interleave(tmp_path):
    store = ResultStore(tmp_path)
    children = []
    for worker in range(4):
        pid = os.fork()
        if pid == 0:  # child: append many large records
            try:
                for i in range(25):
                    ResultStore(tmp_path).append(_record(f"w{worker}-{i}", traceback="x" * 20000))
            finally:
                os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    records = list(store.records())
    assert len(records) == 100
    assert len({r["cell_id"] for r in records}) == 100


def test_non_finite_numbers_are_stored_as_null(tmp_path):
    import math

    store = ResultStore(tmp_path)
    store.append(_record("a", evaluations=[{"accuracy_mean": math.nan, "accuracies": [1.0, math.inf]}]))
    record = next(store.records())
    assert record["evaluations"][0]["accuracy_mean"] is None and record["evaluations"][0]["accuracies"] == [1.0, None]


def test_format1_records_are_upgraded_when_read(tmp_path):
    """A results directory written before the evaluations list (tests/fixtures/legacy_v1) still loads."""
    shutil.copytree(LEGACY, tmp_path / "legacy")
    records = {r["method"]: r for r in ResultStore(tmp_path / "legacy").records()}
    assert set(records) == {"random", "dm"}
    dm = records["dm"]
    assert dm["format"] == 2 and dm["legacy_cell_id"] != dm["cell_id"] and dm["method_version"] == "1"
    final = [e for e in dm["evaluations"] if e["step"] is None]
    snaps = [e for e in dm["evaluations"] if e["step"] is not None]
    assert len(final) == 1 and final[0]["eval_version"] == 1 and len(final[0]["accuracies"]) == 2
    assert [e["step"] for e in snaps] == [1] and dm["snapshots"][0]["path"].endswith(".step1.pt")
    assert dm["sets"][0]["path"].startswith("sets/") and (tmp_path / "legacy" / dm["sets"][0]["path"]).exists()
    assert dm["traits"]["paper_protocol"] == "dm" and records["random"]["traits"]["reference"] == "lower"
    assert dm["init_seconds"] >= 0 and dm["distill_seconds"] >= 0


def test_a_record_from_a_newer_format_is_refused_with_a_line_saying_what_to_do(tmp_path):
    store = ResultStore(tmp_path)
    store.append({**_record("a").to_dict(), "format": 99})
    with pytest.raises(ConfigError, match="format 99, newer than this dd-bench reads.*upgrade dd-bench"):
        list(store.records())
