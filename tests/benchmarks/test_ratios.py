"""Speed regressions as ratios to a reference workload: fixed tiny workloads on the embedded data.

Each benchmark times one workload with pytest-benchmark and, before every round, the reference
(a plain ConvNet-3 forward+backward of a fixed batch; ``dd_bench.run.bench``); what is kept and
gated is their ratio, which holds across machines far better than seconds do. Everything runs
on one thread, seeded, on ``mnist_sample`` (nothing to download). Rows:

- ``step <method>``: one ``step()`` of every registered method that has a row in
  :data:`STEP_WORKLOADS` (a listed method that is not registered is skipped; a built-in method
  without a row is skipped with a reminder to add one);
- ``eval epoch``: ``evaluate()`` of an IPC-10 set, DSA augmentation, one run, per pass;
- ``cell overhead``: ``execute_cell`` of a cell whose method does nothing (10 no-op steps, one
  evaluation pass of a one-image-per-class set, a 100-image test pass): the harness's own cost.

Run them with ``dd-bench bench`` (ratio table, ``--check`` against ``baseline.json``, ``--save``)
or directly: ``DD_BENCH_BENCH_ROUNDS=5 pytest tests/benchmarks/test_ratios.py -m perf
--benchmark-enable``.

``DD_BENCH_TEST_SLOW=<row>[,<row>...]`` (e.g. ``step dm``) runs the named workloads twice per
round: doubled work, to show the check failing. Only this file reads it; tests/run/test_bench.py
sets it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from dd_bench.data import DATASETS, load_dataset
from dd_bench.data.dataset import RawSplits
from dd_bench.eval.evaluate import EvalProtocol, evaluate
from dd_bench.method import METHODS, Method, RunContext, SyntheticSet, create_method, register_method
from dd_bench.run.bench import time_against_reference
from dd_bench.run.runner import RunOptions, execute_cell
from dd_bench.run.suite import parse_suite
from dd_bench.seeding import seed_everything

pytestmark = pytest.mark.perf

SLOW_ENV = "DD_BENCH_TEST_SLOW"


@dataclass(frozen=True)
class StepWorkload:
    """A tiny, fixed ``step()`` workload: IPC and parameter overrides on a 40-per-class subset."""

    ipc: int
    params: dict[str, Any] = field(default_factory=dict)
    note: str = ""


#: One row per method. Keep a step well under a second on one thread: the quick check times
#: each row 10 times (1 warm-up, 9 rounds). Parameters depart from the paper only to make the step small.
STEP_WORKLOADS: dict[str, StepWorkload] = {
    # compile off as in the quick suite: a cold torch.compile costs more than the rounds.
    "dc": StepWorkload(1, {"batch_real": 16, "compile": False}, "IPC 1: one outer round, no inner loop"),
    "dsa": StepWorkload(1, {"batch_real": 16, "compile": False}, "IPC 1, Siamese DSA"),
    "dm": StepWorkload(10, {"batch_real": 32}, "IPC 10, DSA"),
    # One expert of 3 epochs (built untimed); 10 unrolled student steps per iteration.
    "mtt": StepWorkload(1, {"model": "ConvNet", "num_experts": 1, "train_epochs": 3, "expert_batch": 50,
                            "expert_epochs": 2, "max_start_epoch": 1, "syn_steps": 10, "lr_img": 100.0,
                            "lr_lr": 1e-5}, "IPC 1, N=10, M=2"),
    # FRePo's net (width 128, depth 3, BatchNorm) as in the paper; a pool of 2 and 64 real
    # images per step instead of 10 nets and 1024 images.
    "frepo": StepWorkload(1, {"batch_real": 64, "num_nn_state": 2}, "IPC 1, 64 real images, pool of 2"),
    # The generator from the identity (no meta-training artifact to build), 8 real images per class.
    "mgdd": StepWorkload(1, {"meta_train": False, "real_per_class": 8, "pool_size": 2}, "IPC 1, untrained generator"),
}

EVAL_IPC = 10
EVAL_EPOCHS = 4  # evaluate runs epochs + 1 passes (evaluate_synset's loop)
NOOP_STEPS = 10
TRAIN_PER_CLASS, TEST_PER_CLASS = 40, 10


def _slowed(row: str, workload):
    """The workload twice per call when the test-only switch names its row (doubled work)."""
    if row not in {name.strip() for name in os.environ.get(SLOW_ENV, "").split(",")}:
        return workload
    return lambda: (workload(), workload())[-1]


def _builtin_methods() -> list[str]:
    return [name for name in METHODS.names()
            if METHODS.get(name).__module__.startswith("dd_bench.methods.") and METHODS.get(name).iterative]


@pytest.fixture(scope="module")
def bench_data():
    return load_dataset("mnist_sample").subset(per_class=TRAIN_PER_CLASS, test_per_class=TEST_PER_CLASS)


def _method_state(name: str, workload: StepWorkload, data, tmp_path) -> tuple[Method, Any, RunContext]:
    """A method and its state after init (artifacts built and loaded first, untimed)."""
    method = create_method(name, workload.params)
    seed_everything(0)
    ctx = RunContext(seed=0)
    if method.artifact_spec(data) is not None:
        ctx.artifact_dir = tmp_path / "artifact"
        ctx.artifact_dir.mkdir()
        method.build_artifacts(data, ctx.artifact_dir, ctx)
        method.load_artifacts(ctx.artifact_dir, ctx)
    return method, method.init(data, workload.ipc, ctx), ctx


@pytest.mark.parametrize("name", sorted(set(STEP_WORKLOADS) | set(_builtin_methods())))
def test_step(benchmark, bench_data, tmp_path, name: str):
    if name not in METHODS:
        pytest.skip(f"step {name}: not registered")
    if name not in STEP_WORKLOADS:
        pytest.skip(f"step {name}: no tiny workload; add a row to STEP_WORKLOADS in {__name__}")
    workload = STEP_WORKLOADS[name]
    method, state, ctx = _method_state(name, workload, bench_data, tmp_path)
    row = f"step {name}"
    metrics = time_against_reference(benchmark, _slowed(row, lambda: method.step(state, ctx)), row=row, unit="step",
                                     method=name, ipc=workload.ipc, params=workload.params, note=workload.note)
    assert metrics is None or all(v == v for v in metrics.values() if isinstance(v, float))  # no NaN


def test_eval_epoch(benchmark, bench_data):
    per_class = [torch.nonzero(bench_data.train_labels == c)[:EVAL_IPC, 0] for c in range(bench_data.num_classes)]
    index = torch.cat(per_class)
    syn = SyntheticSet(bench_data.train_images[index].clone(), bench_data.train_labels[index].clone())
    protocol = EvalProtocol(epochs=EVAL_EPOCHS, runs=1, augment="dsa", dsa_strategy=bench_data.dsa_strategy)
    row = "eval epoch"
    result = time_against_reference(benchmark, _slowed(row, lambda: evaluate(syn, bench_data, protocol, seed=0)),
                                    row=row, unit="epoch", units_per_call=EVAL_EPOCHS + 1, ipc=EVAL_IPC,
                                    protocol=protocol.describe())
    assert 0 <= result.mean <= 100


# -- the harness's own cost: a cell whose method does nothing -------------------------------------
def _tiny_mnist(root, download: bool) -> RawSplits:
    """Test-only dataset: 10 train and 10 test images per class of the embedded sample, so the
    cell's own compute (one evaluation pass, the test pass) stays small next to the harness's."""
    raw = DATASETS.get("mnist_sample")(root, download)
    train = torch.cat([torch.nonzero(raw.train_labels == c)[:10, 0] for c in range(10)])
    test = torch.cat([torch.nonzero(raw.test_labels == c)[:10, 0] for c in range(10)])
    return RawSplits(raw.train_images[train], raw.train_labels[train], raw.test_images[test], raw.test_labels[test],
                     raw.class_names, raw.mean, raw.std, raw.dsa_strategy, raw.dc_strategy)


@register_method("test_bench_noop")
class _NoOp(Method):
    """Test-only: iterative, and each step does nothing; the set is the first image of each class."""

    def init(self, data, ipc, ctx):
        index = torch.cat([torch.nonzero(data.train_labels == c)[:ipc, 0] for c in range(data.num_classes)])
        return SyntheticSet(data.train_images[index].clone(), data.train_labels[index].clone())

    def step(self, state, ctx):
        return {"loss": 0.0}

    def result(self, state):
        return state


NOOP_SUITE = {
    "name": "bench_noop", "datasets": ["test_bench_tiny"], "ipc": [1], "seeds": [0], "budget": {"steps": NOOP_STEPS},
    "protocol": {"model": "ConvNet", "epochs": 0, "runs": 1, "augment": "none", "test_batch_size": 100},
    "methods": ["test_bench_noop"],
}


@pytest.fixture
def tiny_dataset() -> str:
    # Registered when the benchmark runs, not at import: other tests list the registered datasets.
    if "test_bench_tiny" not in DATASETS:
        DATASETS.register("test_bench_tiny")(_tiny_mnist)
    return "test_bench_tiny"


def test_cell_overhead(benchmark, tmp_path, tiny_dataset):
    cell = parse_suite(NOOP_SUITE).cells()[0]
    options = RunOptions(results_dir=tmp_path / "results", cache_dir=tmp_path / "artifacts", device="cpu",
                         progress=False)
    row = "cell overhead"
    record = time_against_reference(benchmark, _slowed(row, lambda: execute_cell(cell, options)), row=row, unit="cell",
                                    steps=NOOP_STEPS, protocol=cell.requests[0].protocol.describe())
    assert record.status == "ok", record.error
