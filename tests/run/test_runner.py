"""The harness loop on tiny budgets: records, resume, failure isolation, NaN checks, artifacts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from dd_bench.method import Method, RunContext, SyntheticSet, register_method
from dd_bench.run.store import ResultStore
from dd_bench.run.runner import RunOptions, execute_cell, run_suite
from dd_bench.run.suite import load_suite


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


def _options(tmp_path: Path) -> RunOptions:
    return RunOptions(results_dir=tmp_path / "results", cache_dir=tmp_path / "cache", device="cpu", progress=False)


def test_cell_record_is_complete_and_the_set_is_saved(write_suite, tmp_path):
    cell = load_suite(write_suite({"methods": ["test_noise_descent"], "budget": {"steps": 4, "snapshot_every": 2}})).cells()[0]
    record = execute_cell(cell, _options(tmp_path))
    assert record.status == "ok", record.traceback
    assert record.steps == 4 and record.seconds_per_step > 0
    assert record.metrics["loss_last"] < record.metrics["loss_first"]
    assert record.protocol["augment"] == "none" and "ConvNet, 2 epochs" in record.protocol_text
    assert record.env["versions"]["torch"] and record.device.startswith("cpu")
    assert set(record.peak_memory_mb) == {"prepare", "distill", "evaluate"}
    assert [s["step"] for s in record.snapshots] == [2]
    syn = SyntheticSet.load(tmp_path / "results" / record.synthetic_set)
    assert syn.images.shape == (10, 1, 28, 28) and syn.meta["cell_id"] == cell.cell_id


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
    assert a.accuracies == b.accuracies
    set_a = SyntheticSet.load(tmp_path / "a" / "results" / a.synthetic_set)
    set_b = SyntheticSet.load(tmp_path / "b" / "results" / b.synthetic_set)
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


def test_artifacts_are_built_once_and_shared(write_suite, tmp_path):
    suite = load_suite(write_suite({"seeds": [0, 1, 2], "methods": ["test_artifact"]}))
    _WithArtifact.builds = 0
    outcome = run_suite(suite, _options(tmp_path))
    assert _WithArtifact.builds == 1
    assert [r["prepare_cached"] for r in outcome.ran] == [False, True, True]


def test_impossible_ipc_is_rejected_before_any_work(write_suite, tmp_path):
    import pytest

    from dd_bench.errors import ConfigError

    suite = load_suite(write_suite({"ipc": [401]}))
    with pytest.raises(ConfigError, match="ipc: 401 is impossible for mnist_sample"):
        run_suite(suite, _options(tmp_path))
    assert not ResultStore(tmp_path / "results").path.exists()
