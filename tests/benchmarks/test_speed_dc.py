"""Speed of one DC / DSA step: Fashion-MNIST, IPC 1, paper settings (batch_real 256; DSA on for DSA).

Run with ``pytest tests/benchmarks/test_speed_dc.py -m perf --benchmark-enable -p no:cacheprovider``.

Three rows per method, measured side by side in one process on the same state:

- ``compiled``: ``step`` as the harness runs it (``compile=True``, the default); the one-off
  compilation happens in the warm-up round and is not timed;
- ``eager``: ``step`` with ``compile=False``;
- ``reference``: the same iteration laid out as the official ``main.py`` does it (gradients of
  every parameter, cloned real gradients, the loss summed over classes and one backward).

IPC 1 means one matching round and no inner loop (``get_loops(1) == (1, 1)``), so a step is
ten real-batch gradients of 256 images plus ten cheap synthetic passes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dd_bench.run.measure import resolve_device
from dd_bench.method import RunContext, create_method
from dd_bench.nets import create_model
from dd_bench.seeding import seed_everything
from dd_bench.methods.dc import match_loss

pytestmark = pytest.mark.perf

IPC = 1
BATCH_REAL = 256




def _state(name: str, data, compile_passes: bool):
    method = create_method(name, {"batch_real": BATCH_REAL, "compile": compile_passes})
    seed_everything(0)
    ctx = RunContext(device=resolve_device("auto"), seed=0)
    return method, method.init(data, IPC, ctx), ctx


def _reference_step(method, state) -> float:
    """One iteration in the official layout (IPC 1: one round, no inner loop)."""
    data, cfg = state.data, method.config
    net = create_model(cfg.model, data.channels, data.num_classes, tuple(data.image_size)).to(state.images.device)
    net.train()
    parameters = list(net.parameters())
    loss = torch.zeros((), device=state.images.device)
    for c in range(data.num_classes):
        real = data.sample_real(c, cfg.batch_real, generator=state.generator)
        syn = state.images[c * state.ipc : (c + 1) * state.ipc]
        real, syn = method._matching_views(state, real, syn)
        real_loss = F.cross_entropy(net(real), torch.full((real.shape[0],), c, device=real.device))
        gw_real = [g.detach().clone() for g in torch.autograd.grad(real_loss, parameters)]
        syn_loss = F.cross_entropy(net(syn), torch.full((syn.shape[0],), c, device=syn.device))
        gw_syn = torch.autograd.grad(syn_loss, parameters, create_graph=True)
        loss = loss + match_loss(gw_syn, gw_real, cfg.dis_metric)
    state.optimizer.zero_grad()
    loss.backward()
    state.optimizer.step()
    return loss.item() / data.num_classes


def _info(benchmark, name: str, layout: str) -> None:
    benchmark.extra_info.update({"method": name, "dataset": "fashion_mnist", "ipc": IPC, "batch_real": BATCH_REAL,
                                 "layout": layout, "threads": torch.get_num_threads()})


@pytest.mark.parametrize("name", ["dc", "dsa"])
@pytest.mark.parametrize("layout", ["compiled", "eager"])
def test_step(benchmark, fashion_mnist, name: str, layout: str):
    method, state, ctx = _state(name, fashion_mnist, compile_passes=layout == "compiled")
    _info(benchmark, name, layout)
    metrics = benchmark.pedantic(method.step, args=(state, ctx), rounds=3, iterations=1, warmup_rounds=1)
    assert metrics["loss"] > 0


@pytest.mark.parametrize("name", ["dc", "dsa"])
def test_step_reference_layout(benchmark, fashion_mnist, name: str):
    method, state, _ = _state(name, fashion_mnist, compile_passes=False)
    _info(benchmark, name, "official main.py")
    loss = benchmark.pedantic(_reference_step, args=(method, state), rounds=3, iterations=1, warmup_rounds=1)
    assert loss > 0
