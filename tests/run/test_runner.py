"""The harness loop on tiny budgets: records, resume, failure isolation, NaN checks, artifacts,
deployment at several IPCs, evaluations added to a finished suite."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import torch

from dd_bench.errors import ConfigError
from dd_bench.method import Method, RunContext, SyntheticSet, register_method
from dd_bench.run.store import ResultStore
from dd_bench.run.runner import RunOptions, execute_cell, load_cell_data, run_suite
from dd_bench.run.suite import load_suite

FIXTURES = Path(__file__).parent.parent / "fixtures"


@register_method("test_raises")
class _Raises(Method):
    """Test-only: fails in init."""

    def init(self, data, ipc, ctx):
        raise RuntimeError("deliberate failure")

    def result(self, state):
        raise AssertionError


@dataclass
class _NoiseConfig:
    nan_at_step: int = 0  # 0: never


@register_method("test_noise_descent")
class _NoiseDescent(Method):
    """Test-only iterative method: pulls noise images towards class means; can emit NaN."""

    Config = _NoiseConfig

    def init(self, data, ipc, ctx):
        images = torch.randn(data.num_classes * ipc, data.channels, *data.image_size)
        labels = torch.arange(data.num_classes).repeat_interleave(ipc)
        means = torch.stack([data.class_images(c).mean(0) for c in range(data.num_classes)])
        return {"images": images, "labels": labels, "target": means[labels], "step": 0}

    def step(self, state, ctx):
        state["step"] += 1
        state["images"] += 0.5 * (state["target"] - state["images"])
        loss = float(((state["images"] - state["target"]) ** 2).mean())
        return {"loss": math.nan if state["step"] == self.config.nan_at_step else loss}

    def result(self, state):
        return SyntheticSet(state["images"].clone(), state["labels"])


@dataclass
class _ArtifactConfig:
    tag: str = "a"


@register_method("test_seeded_artifact")
class _SeededArtifact(Method):
    """Test-only: an artifact drawn from the global RNG the harness seeds for the build."""

    iterative = False

    def artifact_spec(self, data):
        return {"purpose": "seeded test artifact", "dataset": data.fingerprint()}

    def build_artifacts(self, data, directory: Path, ctx: RunContext):
        torch.save(torch.randn(16), directory / "value.pt")

    def init(self, data, ipc, ctx):
        return SyntheticSet(data.train_images[: data.num_classes], data.train_labels[: data.num_classes])

    def result(self, state):
        return state


@register_method("test_artifact")
class _WithArtifact(Method):
    """Test-only: one-off artifact, counted."""

    Config = _ArtifactConfig
    iterative = False
    builds = 0

    def artifact_spec(self, data):
        return {"purpose": "test", "tag": self.config.tag, "dataset": data.fingerprint()}

    def build_artifacts(self, data, directory: Path, ctx: RunContext):
        type(self).builds += 1
        torch.save(torch.tensor([7.0]), directory / "value.pt")

    def load_artifacts(self, directory, ctx):
        self.value = torch.load(directory / "value.pt")

    def init(self, data, ipc, ctx):
        assert self.value.item() == 7.0
        return SyntheticSet(data.train_images[: data.num_classes], data.train_labels[: data.num_classes])

    def result(self, state):
        return state


@dataclass
class _GeneratorConfig:
    scale: float = 0.5


@register_method("test_generator")
class _Generator(Method):
    """Test-only generator: adapts a per-class shift over steps; deploys at any IPC without adapting again."""

    Config = _GeneratorConfig
    inits = 0

    def init(self, data, ipc, ctx):
        type(self).inits += 1
        means = torch.stack([data.class_images(c).mean(0) for c in range(data.num_classes)])
        return {"data": data, "ipc": ipc, "shift": torch.zeros_like(means), "means": means}

    def step(self, state, ctx):
        state["shift"] += self.config.scale * (state["means"] - state["shift"])
        return {"loss": float((state["means"] - state["shift"]).pow(2).mean())}

    def _produce(self, state, ipc, generator):
        data = state["data"]
        images = torch.cat([data.sample_real(c, ipc, generator=generator) * 0.5 + state["shift"][c] * 0.5
                            for c in range(data.num_classes)])
        return SyntheticSet(images, torch.arange(data.num_classes).repeat_interleave(ipc))

    def result(self, state):
        return self._produce(state, state["ipc"], torch.Generator().manual_seed(0))

    def deploy(self, state, ipc, ctx):
        return self._produce(state, ipc, ctx.generator)


def _options(tmp_path: Path) -> RunOptions:
    return RunOptions(results_dir=tmp_path / "results", cache_dir=tmp_path / "cache", device="cpu", progress=False)


def test_cell_record_is_complete_and_the_set_is_saved(write_suite, tmp_path):
    cell = load_suite(write_suite({"methods": ["test_noise_descent"], "budget": {"steps": 4, "snapshot_every": 2}})).cells()[0]
    record = execute_cell(cell, _options(tmp_path))
    assert record.status == "ok", record.traceback
    assert record.format == 2 and record.method_version == "1" and record.traits["iterative"]
    assert record.steps == 4 and record.seconds_per_step > 0 and record.init_seconds >= 0
    assert record.metrics["loss_last"] < record.metrics["loss_first"]
    final, snapshot = record.evaluations
    assert final["step"] is None and snapshot["step"] == 2 and final["ipc"] == 1
    assert final["protocol"]["augment"] == "none" and "ConvNet" in final["protocol_text"]
    assert "2 epochs" in final["protocol_text"] and final["eval_version"] == 2 and len(final["accuracies"]) == 1
    assert record.env["versions"]["torch"] and record.device.startswith("cpu")
    assert set(record.peak_memory_mb) == {"prepare", "distill", "evaluate"}
    assert [s["step"] for s in record.snapshots] == [2]
    syn = SyntheticSet.load(tmp_path / "results" / record.sets[0]["path"])
    assert syn.images.shape == (10, 1, 28, 28) and syn.meta["cell_id"] == cell.cell_id
    assert syn.meta["zca"] is False and syn.meta["mean"] == [0.1307]


def test_second_run_skips_finished_cells(write_suite, tmp_path):
    suite = load_suite(write_suite({"seeds": [0, 1]}))
    first = run_suite(suite, _options(tmp_path))
    assert len(first.ran) == 2 and not first.failed
    second = run_suite(suite, _options(tmp_path))
    assert second.ran == [] and second.skipped_finished == 2


def test_same_seed_same_result(write_suite, tmp_path):
    cell = load_suite(write_suite({"methods": ["test_noise_descent"]})).cells()[0]
    a = execute_cell(cell, _options(tmp_path / "a"))
    b = execute_cell(cell, _options(tmp_path / "b"))
    assert a.evaluations[0]["accuracies"] == b.evaluations[0]["accuracies"]
    set_a = SyntheticSet.load(tmp_path / "a" / "results" / a.sets[0]["path"])
    set_b = SyntheticSet.load(tmp_path / "b" / "results" / b.sets[0]["path"])
    assert torch.equal(set_a.images, set_b.images)


def test_a_failing_cell_is_isolated_and_retried_on_request(write_suite, tmp_path):
    suite = load_suite(write_suite({"methods": ["test_raises", "random"]}))
    outcome = run_suite(suite, _options(tmp_path))
    statuses = {r["method"]: r["status"] for r in outcome.ran}
    assert statuses == {"test_raises": "failed", "random": "ok"}
    failed = outcome.failed[0]
    assert failed["error"] == "RuntimeError: deliberate failure" and "Traceback" in failed["traceback"]
    again = run_suite(suite, _options(tmp_path))
    assert again.ran == [] and again.skipped_failed == 1
    retried = run_suite(suite, _options(tmp_path), retry_failed=True)
    assert [r["method"] for r in retried.ran] == ["test_raises"]


def test_nan_loss_fails_the_cell(write_suite, tmp_path):
    cell = load_suite(write_suite({"methods": [{"name": "test_noise_descent", "params": {"nan_at_step": 2}}],
                                   "budget": {"steps": 5}})).cells()[0]
    record = execute_cell(cell, _options(tmp_path))
    assert record.status == "failed" and record.error == "NonFiniteError: step 2: loss is nan"


def test_seconds_budget_stops_the_loop(write_suite, tmp_path):
    cell = load_suite(write_suite({"methods": ["test_noise_descent"], "budget": {"steps": 10**9, "seconds": 2.0}})).cells()[0]
    record = execute_cell(cell, _options(tmp_path))
    assert record.status == "ok" and 0 < record.steps < 10**9 and record.distill_seconds >= 2.0


def test_artifacts_are_built_once_first_and_charged_to_every_cell(write_suite, tmp_path):
    suite = load_suite(write_suite({"seeds": [0, 1, 2], "methods": ["test_artifact"]}))
    _WithArtifact.builds = 0
    outcome = run_suite(suite, _options(tmp_path))
    assert _WithArtifact.builds == 1
    keys = {r["artifact"]["key"] for r in outcome.ran}
    assert len(keys) == 1 and all(r["prepare_cached"] for r in outcome.ran)  # built by prepare, before the cells
    build = json.loads((tmp_path / "cache" / keys.pop() / "build.json").read_text())
    assert build["status"] == "complete" and build["attempts"][0]["device"].startswith("cpu")
    assert all(r["prepare_seconds"] == pytest.approx(build["build_seconds"]) for r in outcome.ran)


def test_impossible_ipc_is_rejected_before_any_work(write_suite, tmp_path):
    suite = load_suite(write_suite({"ipc": [401]}))
    with pytest.raises(ConfigError, match="ipc: 401 is impossible for mnist_sample"):
        run_suite(suite, _options(tmp_path))
    assert not ResultStore(tmp_path / "results").path.exists()


def test_a_reduced_training_set_is_seeded_the_same_for_every_method_and_part_of_the_cell_id(write_suite, tmp_path):
    full = load_suite(write_suite()).cells()[0]
    suite = load_suite(write_suite({"data": {"train_per_class": 20}, "methods": ["random", "herding"]}))
    random_cell, herding_cell = suite.cells()
    assert random_cell.cell_id != full.cell_id and random_cell.data.identity()["train_per_class"] == 20
    a, b = load_cell_data(random_cell), load_cell_data(herding_cell)
    assert len(a.train_images) == 200 and torch.equal(a.train_images, b.train_images) and a.variant == b.variant
    assert len(a.test_images) == len(load_cell_data(full).test_images)  # the test set stays whole
    record = execute_cell(random_cell, _options(tmp_path))
    assert record.status == "ok" and record.dataset_info["variant"].startswith("subset20/")
    with pytest.raises(ConfigError, match="data.train_per_class: 401 is more than mnist_sample's smallest class"):
        load_cell_data(load_suite(write_suite({"data": {"train_per_class": 401}})).cells()[0])


# -- one adaptation, many IPCs ------------------------------------------------------------------
def test_a_generator_adapts_once_and_deploys_at_every_ipc(write_suite, tmp_path):
    suite = load_suite(write_suite({"methods": [{"name": "test_generator", "ipc": [10], "deploy_ipc": [1, 10, 50]}],
                                    "budget": {"steps": 3}}))
    cells = suite.cells()
    assert len(cells) == 1 and cells[0].produced_ipcs == (10, 1, 50)
    _Generator.inits = 0
    outcome = run_suite(suite, _options(tmp_path))
    record = outcome.ran[0]
    assert record["status"] == "ok", record["traceback"]
    assert _Generator.inits == 1 and record["steps"] == 3 and record["distill_seconds"] > 0
    assert sorted(s["ipc"] for s in record["sets"]) == [1, 10, 50]
    assert all(s["produce_seconds"] > 0 and s["path"] for s in record["sets"])
    assert sorted(e["ipc"] for e in record["evaluations"]) == [1, 10, 50]
    sizes = {s["ipc"]: s["size"] for s in record["sets"]}
    assert sizes == {1: 10, 10: 100, 50: 500}


def test_deploy_ipc_is_refused_for_a_method_that_cannot_deploy(write_suite):
    with pytest.raises(ConfigError, match=r"methods\[0\].deploy_ipc: method 'random' cannot deploy"):
        load_suite(write_suite({"methods": [{"name": "random", "deploy_ipc": [1, 10]}]}))


# -- evaluations added later ----------------------------------------------------------------------
def test_adding_a_protocol_and_a_model_evaluates_saved_sets_without_distilling(write_suite, tmp_path, caplog):
    base = {"methods": [{"name": "test_generator", "ipc": [1], "deploy_ipc": [2]}], "budget": {"steps": 2}}
    suite = load_suite(write_suite(base))
    _Generator.inits = 0
    run_suite(suite, _options(tmp_path))
    assert _Generator.inits == 1
    grown = dict(base, protocols={"main": {"model": "ConvNet", "epochs": 2, "runs": 1, "augment": "none",
                                           "test_batch_size": 500},
                                  "second": {"model": "ConvNet", "epochs": 1, "runs": 1, "augment": "none",
                                             "test_batch_size": 500}},
                 models=["ConvNet", "MLP"], protocol=None)
    with caplog.at_level(logging.INFO, logger="dd_bench.run.runner"):
        outcome = run_suite(load_suite(write_suite(grown, name="grown.yaml")), _options(tmp_path))
    assert _Generator.inits == 1, "no distillation step may run again"
    assert outcome.evaluated_only == 1
    assert any("evaluating its saved sets only (6 new evaluation(s))" in r.message for r in caplog.records)
    record = ResultStore(tmp_path / "results").latest()[outcome.ran[0]["cell_id"]]
    groups = sorted({(e["protocol_name"], e["model"]) for e in record["evaluations"]})
    assert groups == [("main", "ConvNet"), ("main", "MLP"), ("second", "ConvNet"), ("second", "MLP")]
    assert len(record["evaluations"]) == 8  # 2 sets x 2 protocols x 2 models, the first 2 kept
    again = run_suite(load_suite(write_suite(grown, name="grown.yaml")), _options(tmp_path))
    assert again.ran == [] and again.skipped_finished == 1


# -- artifacts: seeded from their spec, resumable ------------------------------------------------
def test_an_artifact_is_a_function_of_its_spec_not_of_the_cell_that_built_it(write_suite, tmp_path):
    values = []
    for order in ([0, 1], [1, 0]):
        suite = load_suite(write_suite({"seeds": order, "methods": ["test_seeded_artifact"]}, name=f"s{order[0]}.yaml"))
        outcome = run_suite(suite, _options(tmp_path / f"order{order[0]}"))
        key = outcome.ran[0]["artifact"]["key"]
        values.append(torch.load(tmp_path / f"order{order[0]}" / "cache" / key / "value.pt", weights_only=True))
    assert torch.equal(values[0], values[1])


def test_a_killed_build_resumes_from_its_checkpoint(write_suite, tmp_path):
    """SIGKILL mid-build: the next run resumes from the last checkpoint and ends with the same artifact."""
    suite = write_suite({"methods": ["test_chunked_artifact"]})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(FIXTURES), os.environ.get("PYTHONPATH", "")]))
    driver = "import sys, artifact_fixture_methods; from dd_bench.cli import main; sys.exit(main())"

    def prepare(root: Path, kill_after: int | None) -> subprocess.CompletedProcess:
        run_env = dict(env, **({"DD_BENCH_TEST_KILL_AFTER": str(kill_after)} if kill_after else {}))
        return subprocess.run([sys.executable, "-c", driver, "prepare", str(suite), "--results", str(root),
                               "--no-progress"], env=run_env, capture_output=True, text=True, timeout=120)

    killed = prepare(tmp_path / "killed", kill_after=3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    folder = next((tmp_path / "killed" / "_artifacts").glob("????????????????"))
    assert not (folder / ".complete").exists() and (folder / "chunks.log").read_text().split() == ["0", "1", "2"]
    last_write = max(p.stat().st_mtime for p in folder.iterdir() if p.name != "build.json")
    time.sleep(1.0)  # the pause before a resume is not build time
    resumed = prepare(tmp_path / "killed", kill_after=None)
    assert resumed.returncode == 0, resumed.stderr
    assert (folder / "chunks.log").read_text().split() == ["0", "1", "2", "3", "4", "5"]  # 0-2 not recomputed
    build = json.loads((folder / "build.json").read_text())
    assert [a["status"] for a in build["attempts"]] == ["killed", "complete"] and build["attempts"][1]["resumed"]
    killed_started = datetime.fromisoformat(build["attempts"][0]["started_at"]).timestamp()
    # started_at is stored to the second: the killed attempt's time is its last write minus that.
    assert build["attempts"][0]["seconds"] == pytest.approx(last_write - killed_started, abs=1e-3)
    fresh = prepare(tmp_path / "fresh", kill_after=None)
    assert fresh.returncode == 0, fresh.stderr
    uninterrupted = next((tmp_path / "fresh" / "_artifacts").glob("????????????????")) / "artifact.pt"
    assert torch.equal(torch.load(folder / "artifact.pt"), torch.load(uninterrupted))
