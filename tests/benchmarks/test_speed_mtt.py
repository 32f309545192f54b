"""Speed and memory of one MTT step at PROTOCOL §6's CIFAR-10 IPC 1 settings.

Run with ``pytest tests/benchmarks/test_speed_mtt.py -m perf --benchmark-enable -p no:cacheprovider``.

Settings of the ``cifar10_ipc1`` preset (syn_steps 50, expert_epochs 2, max_start_epoch 2, the
whole set of 10 images per unrolled step, per-image DSA, ConvNet-3 with 320,010 parameters) on
random tensors of CIFAR-10's shape: no CIFAR is installed here, and a step's cost does not
depend on the pixel values. The expert is a random walk from a ConvNet initialisation (4
snapshots: start epochs 0-1 and M = 2; train_epochs 3 is the shortest buffer the row accepts).

One row per gradient mode (``unrolled``: the official graph through all steps; ``tesla``;
``tesla_exact``), each with its peak memory in ``extra_info``: the process's resident set
(``PeakMemory``, what the harness records on the CPU) and the peak of the bytes autograd holds
for backward (saved-tensor hooks: the graph memory a GPU would hold, independent of the
allocator).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dd_bench.checkpoint import save_atomic
from dd_bench.data.dataset import DSA_WITH_FLIP, Dataset
from dd_bench.method import RunContext, create_method
from dd_bench.nets import create_model
from dd_bench.run.measure import PeakMemory, resolve_device
from dd_bench.seeding import seed_everything
from dd_bench.methods.mtt import PRESETS

pytestmark = pytest.mark.perf

MODES = {"unrolled": {}, "tesla": {"tesla": True}, "tesla_exact": {"tesla": True, "tesla_exact": True}}


def random_cifar10(per_class: int = 20, seed: int = 0) -> Dataset:
    """A Dataset with CIFAR-10's shape (3x32x32, 10 classes) and N(0, 1) pixels."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(per_class)
    images = torch.randn(labels.numel(), 3, 32, 32, generator=generator)
    return Dataset("cifar10", images, labels, images[:10].clone(), labels[:10].clone(), 10, 3, (32, 32),
                   (0.0,) * 3, (1.0,) * 3, [str(c) for c in range(10)], DSA_WITH_FLIP, variant="random-benchmark")


def write_random_expert(directory: Path, model: str, data: Dataset, snapshots: int = 4, seed: int = 0) -> None:
    """One expert: a ConvNet initialisation followed by a random walk (steps ~1e-3 per parameter)."""
    torch.manual_seed(seed)
    net = create_model(model, data.channels, data.num_classes, tuple(data.image_size))
    start = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    walk = torch.randn(snapshots - 1, start.numel()).mul_(1e-3).cumsum(0)
    trajectory = torch.cat([start[None], start[None] + walk])
    save_atomic({"trajectory": trajectory, "index": 0, "seed": seed}, directory / "expert_0000.pt")


@pytest.fixture(scope="module")
def cifar_like():
    return random_cifar10()


@pytest.fixture(scope="module")
def expert_dir(cifar_like, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("random_expert")
    write_random_expert(directory, "ConvNet", cifar_like)
    return directory


def _state(data, expert_dir: Path, mode: str):
    # The cifar10_ipc1 row spelled out: the preset itself would insist on Kornia-ZCA'd CIFAR-10.
    row = {name: getattr(PRESETS["cifar10_ipc1"], name) for name in
           ("syn_steps", "expert_epochs", "max_start_epoch", "lr_img", "lr_lr", "syn_lr_init", "batch_syn")}
    params = {**row, "num_experts": 1, "train_epochs": 3, **MODES[mode]}
    method = create_method("mtt", params)
    ctx = RunContext(device=resolve_device("auto"), seed=0)
    method.load_artifacts(expert_dir, ctx)
    seed_everything(0)
    return method, method.init(data, 1, ctx), ctx


def graph_peak_bytes(method, state, ctx) -> int:
    """Peak bytes autograd holds for backward during one step (saved-tensor hooks)."""
    meter = {"live": 0, "peak": 0}

    class Held:
        def __init__(self, tensor: torch.Tensor):
            self.tensor, self.size = tensor, tensor.numel() * tensor.element_size()
            meter["live"] += self.size
            meter["peak"] = max(meter["peak"], meter["live"])

        def __del__(self):
            meter["live"] -= self.size

    with torch.autograd.graph.saved_tensors_hooks(Held, lambda held: held.tensor):
        method.step(state, ctx)
    return meter["peak"]


@pytest.mark.parametrize("mode", list(MODES))
def test_mtt_step(benchmark, cifar_like, expert_dir, mode: str):
    method, state, ctx = _state(cifar_like, expert_dir, mode)
    method.step(state, ctx)  # warm-up outside the memory meter
    with PeakMemory(torch.device(ctx.device)) as peak:
        method.step(state, ctx)
    benchmark.extra_info.update({"mode": mode, "dataset": "random CIFAR-10 shape", "ipc": 1, "syn_steps": 50,
                                 "threads": torch.get_num_threads(), "peak_mb": round(peak.peak_mb, 1),
                                 "peak_kind": peak.kind,
                                 "graph_peak_mb": round(graph_peak_bytes(method, state, ctx) / 2**20, 1)})
    metrics = benchmark.pedantic(method.step, args=(state, ctx), rounds=3, iterations=1, warmup_rounds=0)
    assert metrics["loss"] > 0
