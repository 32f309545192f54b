import json
import os

from dd_bench.run.store import CellResult, ResultStore


def _record(cell_id: str, status: str = "ok", **extra) -> CellResult:
    return CellResult(cell_id, "s", status, "random", "random", "mnist_sample", 1, 0, {}, {}, **extra)


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
    store.append(_record("a", accuracy_mean=math.nan, accuracies=[1.0, math.inf]))
    record = next(store.records())
    assert record["accuracy_mean"] is None and record["accuracies"] == [1.0, None]
