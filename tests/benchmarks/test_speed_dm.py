"""Speed of one DM step: Fashion-MNIST, IPC 10, batch_real 256, DSA on (PROTOCOL §5).

Run with ``pytest tests/benchmarks/test_speed_dm.py -m perf --benchmark-enable -p no:cacheprovider``.

``test_dm_step`` times ``DM.step``. ``test_dm_step_reference_layout`` times the same iteration
laid out as the official ``main_DM.py`` does it (one forward per class, real embeddings under
autograd with frozen parameters, the stock ConvNet forward), so the two rows of the table give
the speed-up of the fast path on this machine, measured side by side in one process.
"""

from __future__ import annotations

import pytest
import torch

from dd_bench.method import RunContext, create_method
from dd_bench.nets import create_model
from dd_bench.seeding import seed_everything

pytestmark = pytest.mark.perf

IPC = 10
BATCH_REAL = 256




@pytest.fixture(scope="module")
def dm_state(fashion_mnist):
    method = create_method("dm", {"batch_real": BATCH_REAL, "dsa": True})
    seed_everything(0)
    ctx = RunContext(seed=0)
    return method, method.init(fashion_mnist, IPC, ctx), ctx


def _reference_step(method, state) -> float:
    """One DM iteration in the official layout, on the same state (for the side-by-side row)."""
    cfg, data = method.config, state.data
    net = create_model(cfg.model, data.channels, data.num_classes, tuple(data.image_size))
    for param in net.parameters():
        param.requires_grad = False
    net.train()
    loss = torch.zeros(())
    for c in range(data.num_classes):
        real = data.sample_real(c, cfg.batch_real, generator=state.generator)
        syn = state.images[c * state.ipc : (c + 1) * state.ipc]
        draw = state.augment.draw(1, tuple(data.image_size), state.generator, siamese=True)
        real, syn = state.augment.apply(real, draw), state.augment.apply(syn, draw)
        loss = loss + ((net.embed(real).detach().mean(0) - net.embed(syn).mean(0)) ** 2).sum()
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    return float(loss.item())


def test_dm_step(benchmark, dm_state):
    method, state, ctx = dm_state
    benchmark.extra_info.update({"dataset": "fashion_mnist", "ipc": IPC, "batch_real": BATCH_REAL, "dsa": True,
                                 "threads": torch.get_num_threads()})
    metrics = benchmark.pedantic(method.step, args=(state, ctx), rounds=3, iterations=1, warmup_rounds=1)
    assert metrics["loss"] > 0


def test_dm_step_reference_layout(benchmark, dm_state):
    method, state, _ = dm_state
    benchmark.extra_info.update({"dataset": "fashion_mnist", "ipc": IPC, "batch_real": BATCH_REAL, "dsa": True,
                                 "threads": torch.get_num_threads(), "layout": "official main_DM.py"})
    loss = benchmark.pedantic(_reference_step, args=(method, state), rounds=3, iterations=1, warmup_rounds=1)
    assert loss > 0
