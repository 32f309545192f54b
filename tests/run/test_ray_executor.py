"""The Ray Tune executor: cells as trials, records in the same store, resume after a killed driver,
failure isolation. Real Ray, tiny cells (random real images, 2-epoch single-run evaluation).

Drivers that need the test-only methods or a SIGKILL run as subprocesses in their own session, so
their registrations never reach this process's registry and every process they start (Ray's GCS,
raylet, workers) can be found by session id and killed, never by name.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from dd_bench.run.store import ResultStore
from dd_bench.run.runner import RunOptions, run_suite
from dd_bench.run.suite import load_suite

ray = pytest.importorskip("ray")

from dd_bench.errors import ConfigError  # noqa: E402
from dd_bench.run.ray_executor import (  # noqa: E402
    RECORD_KEY, TUNE_DIR, _check_resources, _StoreRecorder, _trial_device, make_ray_executor)
from dd_bench.run.store import CellResult  # noqa: E402

FIXTURES = Path(__file__).parent.parent / "fixtures"
RAISES_MESSAGE = "test_raises: deliberate failure in init"  # as in fixtures/ray_fixture_methods.py

PROTOCOL = {"model": "ConvNet", "epochs": 2, "runs": 1, "augment": "none", "test_batch_size": 500}
# Plugins are imported by the driver before the CLI runs, as a user's script would.
DRIVER_WITH_TEST_METHODS = "import sys, ray_fixture_methods; from dd_bench.cli import main; sys.exit(main())"
SUBPROCESS_TIMEOUT = 240


def write_suite(directory: Path, name: str, methods: list, seeds: list[int], epochs: int = 2) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "executor": "ray", "datasets": ["mnist_sample"], "ipc": [1], "seeds": seeds,
        "budget": {"steps": 2}, "protocol": {**PROTOCOL, "epochs": epochs}, "methods": methods,
    }))
    return path


def read_lines(path: Path) -> list[dict]:
    """Every line of results.jsonl, parsed: fails on a torn or unreadable line."""
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), "results.jsonl ends in a torn line"
    return [json.loads(line) for line in raw.splitlines()]


def session_processes(session_id: int) -> list[int]:
    """Pids of the processes in a session (the one a subprocess started with start_new_session leads)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        if int(fields[3]) == session_id and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def kill_session(session_id: int) -> None:
    """SIGKILL everything in the session, including Ray workers that sit in process groups of their own."""
    for _ in range(20):
        pids = session_processes(session_id)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.25)
    raise AssertionError(f"processes of session {session_id} survive SIGKILL: {session_processes(session_id)}")


def start_driver(args: list[str], cwd: Path, with_test_methods: bool = False, log=subprocess.PIPE,
                 env: dict[str, str] | None = None) -> subprocess.Popen:
    env = dict(env or os.environ, RAY_USAGE_STATS_ENABLED="0")
    if with_test_methods:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FIXTURES), env.get("PYTHONPATH")]))
        command = [sys.executable, "-c", DRIVER_WITH_TEST_METHODS, *args]
    else:
        command = [sys.executable, "-m", "dd_bench.cli", *args]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def run_driver(args: list[str], cwd: Path, with_test_methods: bool = False,
               env: dict[str, str] | None = None) -> tuple[int, str]:
    process = start_driver(args, cwd, with_test_methods, env=env)
    try:
        output, _ = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    finally:
        kill_session(process.pid)  # whatever a driver leaves behind (it should leave nothing)
    return process.returncode, output


@pytest.fixture
def ray_cluster():
    """A one-node cluster as a user starts it (`ray start --head`), in a session and temp dir of its own:
    drivers join it with --address, its workers do not inherit a driver's environment."""
    temp_dir = tempfile.mkdtemp(prefix="ddb_ray_")  # short: Ray's socket paths must fit in 107 bytes
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    ray_cli = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                             "--disable-usage-stats", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = head.communicate(timeout=SUBPROCESS_TIMEOUT)
        assert head.returncode == 0, output
        yield f"127.0.0.1:{port}", env
    finally:
        kill_session(head.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_two_cells_run_as_trials_and_land_in_the_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths below: the trials' working directories differ
    suite = load_suite(write_suite(tmp_path, "tiny", ["random"], seeds=[0, 1]))
    options = RunOptions(results_dir=Path("results/tiny"), cache_dir=Path("cache"), progress=False)

    outcome = run_suite(suite, options, executor=make_ray_executor(verbose=0))

    assert not ray.is_initialized(), "the executor must shut down the Ray it started"
    store = ResultStore(tmp_path / "results" / "tiny")
    records = read_lines(store.path)
    assert sorted(r["cell_id"] for r in records) == sorted(c.cell_id for c in suite.cells())
    assert [r["status"] for r in records] == ["ok", "ok"], [r["error"] for r in records]
    assert sorted(r["cell_id"] for r in outcome.ran) == sorted(r["cell_id"] for r in records)
    for record in records:
        evaluation = record["evaluations"][0]
        assert 0 <= evaluation["accuracy_mean"] <= 100 and len(evaluation["accuracies"]) == 1
        assert record["device"].startswith("cpu") and record["gpu_share"] is None
        assert (store.directory / record["sets"][0]["path"]).is_file()
    assert not (store.directory / TUNE_DIR).exists(), "Tune's experiment files are removed after a clean run"

    again = run_suite(suite, options, executor=make_ray_executor(verbose=0))  # resume: nothing left to do
    assert again.ran == [] and again.skipped_finished == 2
    assert len(read_lines(store.path)) == 2


@pytest.mark.slow
def test_killed_driver_resumes_without_losing_or_duplicating_cells(tmp_path):
    suite_path = write_suite(tmp_path, "killme", ["random"], seeds=[0, 1, 2, 3])
    cell_ids = {c.cell_id for c in load_suite(suite_path).cells()}
    results = tmp_path / "results" / "killme" / "results.jsonl"
    args = ["run", str(suite_path), "--executor", "ray", "--results", str(tmp_path / "results"), "--no-progress"]

    log = tmp_path / "killed_driver.log"
    with log.open("w") as handle:  # a file, not a pipe nobody reads: Tune's output would fill it and block
        driver = start_driver(args, tmp_path, log=handle)
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while time.monotonic() < deadline and driver.poll() is None:
            if results.exists() and results.read_bytes().count(b"\n") >= 1:
                break
            time.sleep(0.1)
        assert driver.poll() is None, f"the driver ended before it could be killed:\n{log.read_text()}"
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        kill_session(driver.pid)
    assert session_processes(driver.pid) == []
    before = read_lines(results)
    assert 1 <= len(before) < len(cell_ids), "the kill should land mid-suite"

    code, output = run_driver(args, tmp_path)

    assert code == 0, output
    records = read_lines(results)
    assert Counter(r["cell_id"] for r in records) == Counter({cid: 1 for cid in cell_ids})
    assert all(r["status"] == "ok" for r in records), output
    assert records[:len(before)] == before


def test_failing_and_crashing_cells_are_isolated_and_retried_on_a_joined_cluster(tmp_path, ray_cluster):
    address, env = ray_cluster
    suite_path = write_suite(tmp_path, "failing", ["random", "test_raises", "test_crashes"], seeds=[0])
    results = tmp_path / "results" / "failing" / "results.jsonl"
    args = ["run", str(suite_path), "--executor", "ray", "--address", address, "--results", "results", "--no-progress"]

    code, output = run_driver(args, tmp_path, with_test_methods=True, env=env)

    assert code == 1, output
    records = read_lines(results)
    by_method = {r["method"]: r for r in records}
    assert len(records) == 3 and set(by_method) == {"random", "test_raises", "test_crashes"}, output
    assert by_method["random"]["status"] == "ok"
    raised = by_method["test_raises"]
    assert raised["status"] == "failed"
    assert raised["error"] == f"RuntimeError: {RAISES_MESSAGE}"
    assert "Traceback (most recent call last)" in raised["traceback"] and RAISES_MESSAGE in raised["traceback"]
    crashed = by_method["test_crashes"]  # the worker process died: Tune's error becomes the record
    assert crashed["status"] == "failed"
    assert "died" in crashed["error"] and crashed["traceback"], crashed

    code, output = run_driver([*args, "--retry-failed"], tmp_path, with_test_methods=True, env=env)

    assert code == 1, output
    records = read_lines(results)
    assert Counter(r["method"] for r in records) == {"random": 1, "test_raises": 2, "test_crashes": 2}
    assert [r["status"] for r in records[3:]] == ["failed", "failed"]


# -- the driver-side pieces, without starting Ray -------------------------------------------
def test_recorder_appends_each_cell_exactly_once(tmp_path):
    import cloudpickle

    cells = load_suite(write_suite(tmp_path, "unit", ["random"], seeds=[0, 1])).cells()
    store = ResultStore(tmp_path / "results")
    recorder = _StoreRecorder(cells, store)
    ok = CellResult(cells[0].cell_id, "unit", "ok", "random", "random", "mnist_sample", 1, 0, config={},
                    evaluations=[{"accuracy_mean": 50.0, "accuracy_std": 0.0}]).to_dict()
    first = SimpleNamespace(config={"cell_index": 0}, error_file=None, pickled_error_file=None)
    recorder.on_trial_result(1, [], first, {RECORD_KEY: json.dumps(ok)})
    recorder.on_trial_result(2, [], first, {RECORD_KEY: json.dumps(ok)})  # a repeated report
    recorder.on_trial_complete(2, [], first)
    recorder.on_trial_error(2, [], first)

    (tmp_path / "error.txt").write_text("Failure # 1 (occurred at now)\nTraceback ...\nthe worker was lost\n")
    with (tmp_path / "error.pkl").open("wb") as handle:
        cloudpickle.dump(RuntimeError("the worker was lost\n\tdetails"), handle)
    second = SimpleNamespace(config={"cell_index": 1}, error_file=str(tmp_path / "error.txt"),
                             pickled_error_file=str(tmp_path / "error.pkl"))
    recorder.on_trial_error(3, [], second)
    recorder.on_trial_complete(3, [], second)

    records = read_lines(store.path)
    assert [(r["cell_id"], r["status"]) for r in records] == [(cells[0].cell_id, "ok"), (cells[1].cell_id, "failed")]
    assert records[1]["error"] == "RuntimeError: the worker was lost"
    assert "Traceback" in records[1]["traceback"] and records[1]["seed"] == 1
    assert sorted(recorder.records) == [0, 1]


@pytest.mark.parametrize("device, assigned, expected", [
    ("auto", [], "cpu"), ("auto", ["0"], "cuda"), ("cuda:3", ["3"], "cuda"), ("cpu", ["0"], "cpu"),
])
def test_trial_device_follows_the_gpus_ray_assigned(monkeypatch, device, assigned, expected):
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: assigned)
    assert _trial_device(device) == expected


def test_impossible_resources_are_a_config_error_locally_a_warning_on_a_cluster(monkeypatch, caplog):
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(ConfigError, match=r"ray.gpus_per_cell: 0.25 but the Ray cluster has 0 GPU"):
        _check_resources({"cpu": 1.0, "gpu": 0.25}, joined=False)
    with caplog.at_level(logging.WARNING):
        _check_resources({"cpu": 1.0, "gpu": 0.25}, joined=True)
    assert "autoscaler" in caplog.text
    _check_resources({"cpu": 2.0, "gpu": 0.0}, joined=False)
