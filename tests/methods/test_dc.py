"""methods/dc.py: DC and DSA gradient matching (PROTOCOL §3, §4), on a tiny problem.

Tiny means: 40 MNIST digits per class, IPC 1, 32 real images per class and a width-32 ConvNet
(the paper's ConvNet at a quarter of the width), eager (``compile=False``) except in the one
test that checks the compiled path against the eager one.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dd_bench.errors import ConfigError
from dd_bench.eval.evaluate import evaluate
from dd_bench.eval.protocol import EvalProtocol
from dd_bench.method import METHODS, RunContext, create_method
from dd_bench.nets import create_model
from dd_bench.seeding import seed_everything
from dd_bench.methods.dc import DC, DSA, DCConfig, DSAConfig, distance_wb, get_loops, match_loss

TINY = {"batch_real": 32, "model": "ConvNetW32", "compile": False}




def distil(name: str, data, steps: int, seed: int = 0, ipc: int = 1, **params):
    """Seed as the harness does, then init and ``steps`` steps; returns (method, state, losses)."""
    seed_everything(seed)
    method = create_method(name, {**TINY, **params})
    ctx = RunContext(seed=seed)
    state = method.init(data, ipc, ctx)
    losses = [method.step(state, ctx)["loss"] for _ in range(steps)]
    return method, state, losses


# -- registry and config -------------------------------------------------------------------------
def test_dc_and_dsa_are_registered() -> None:
    assert METHODS.get("dc") is DC
    assert METHODS.get("gradient_matching") is DC
    assert METHODS.get("dsa") is DSA
    assert DC.paper_protocol == "dc"
    assert DSA.paper_protocol == "dsa"


def test_config_defaults_are_the_papers() -> None:
    dc, dsa = DCConfig(), DSAConfig()
    assert (dc.model, dc.lr_img, dc.momentum_img, dc.lr_net) == ("ConvNet", 0.1, 0.5, 0.01)
    assert (dc.batch_real, dc.batch_train, dc.dis_metric) == (256, 256, "ours")
    assert dc.init == "noise" and dsa.init == "real"
    assert dc.outer_loop is None and dc.inner_loop is None and dsa.dsa_strategy is None


def test_bad_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        create_method("dc", {"dis_metric": "l1"})
    with pytest.raises(ConfigError):
        create_method("dsa", {"batch_real": 0})


# -- loops ---------------------------------------------------------------------------------------
def test_get_loops_follows_the_paper_table() -> None:
    table = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
    for ipc, loops in table.items():
        assert get_loops(ipc) == loops


def test_get_loops_uses_the_nearest_tabulated_ipc_below_otherwise() -> None:
    assert get_loops(5) == (1, 1)
    assert get_loops(15) == (10, 50)
    assert get_loops(49) == (40, 15)
    assert get_loops(100) == (50, 10)
    with pytest.raises(ConfigError):
        get_loops(0)


def test_config_overrides_the_loops(data) -> None:
    method = create_method("dc", {**TINY, "outer_loop": 3, "inner_loop": 2})
    state = method.init(data, 10, RunContext())
    assert (state.outer_loop, state.inner_loop) == (3, 2)
    assert create_method("dc", TINY).init(data, 20, RunContext()).inner_loop == 25


# -- distances -----------------------------------------------------------------------------------
def test_distance_wb_is_zero_for_identical_gradients() -> None:
    g = torch.randn(8, 4, 3, 3)
    assert distance_wb(g, g.clone()).item() == pytest.approx(0.0, abs=1e-5)
    assert distance_wb(g, 3.0 * g).item() == pytest.approx(0.0, abs=1e-5)  # scale-free per row


def test_distance_wb_ignores_1d_tensors() -> None:
    assert distance_wb(torch.randn(16), torch.randn(16)).item() == 0.0
    grads = [torch.randn(5, 3), torch.randn(5)]
    others = [grads[0].clone(), torch.randn(5)]  # only the bias differs
    assert match_loss(others, grads, "ours").item() == pytest.approx(0.0, abs=1e-5)


def test_distance_wb_counts_rows() -> None:
    # Conv (out=2, in=1, 2x2): every output row of the real gradient is orthogonal to its
    # synthetic row -> each contributes 1; opposite rows contribute 2.
    real = torch.zeros(2, 1, 2, 2)
    syn = torch.zeros(2, 1, 2, 2)
    real[0, 0, 0, 0], syn[0, 0, 0, 1] = 1.0, 1.0
    real[1, 0, 1, 1], syn[1, 0, 1, 0] = 1.0, 1.0
    assert distance_wb(real, syn).item() == pytest.approx(2.0)
    assert distance_wb(real, -real).item() == pytest.approx(4.0)
    # LayerNorm weight (C=3, h, w): rows are channels.
    ln_real = torch.zeros(3, 2, 2)
    ln_real[:, 0, 0] = 1.0
    ln_syn = torch.zeros(3, 2, 2)
    ln_syn[:, 1, 1] = 1.0
    assert distance_wb(ln_real, ln_syn).item() == pytest.approx(3.0)
    # Linear: rows are output units.
    assert distance_wb(torch.eye(4), torch.eye(4).roll(1, dims=1)).item() == pytest.approx(4.0)


def test_mse_and_cos_variants() -> None:
    real = [torch.tensor([[1.0, 0.0]]), torch.tensor([2.0])]
    syn = [torch.tensor([[0.0, 1.0]]), torch.tensor([2.0])]
    assert match_loss(syn, real, "mse").item() == pytest.approx(2.0)
    assert match_loss(syn, real, "cos").item() == pytest.approx(1.0 - 4.0 / 5.0, abs=1e-5)
    assert match_loss(real, real, "cos").item() == pytest.approx(0.0, abs=1e-5)


# -- the algorithm -------------------------------------------------------------------------------
def test_matching_loss_falls(data) -> None:
    for name in ("dc", "dsa"):
        _, _, losses = distil(name, data, steps=8, init="noise")
        assert all(torch.isfinite(torch.tensor(losses)))
        first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        assert last < 0.95 * first, (name, losses)


def test_dc_beats_its_noise_initialisation(data) -> None:
    # lr_img 1 instead of the paper's 0.1, so that six steps visibly move noise (at 0.1 the
    # images need far more steps than a unit test can afford).
    protocol = EvalProtocol(model="ConvNetW32", epochs=100, runs=2, augment="none")
    seed_everything(0)
    method = create_method("dc", {**TINY, "lr_img": 1.0})
    state = method.init(data, 1, RunContext())
    before = evaluate(method.result(state), data, protocol, seed=1).mean
    for _ in range(6):
        method.step(state, RunContext())
    after = evaluate(method.result(state), data, protocol, seed=1).mean
    assert after > before + 15.0, (before, after)


def test_same_seed_same_synthetic_set(data) -> None:
    for name in ("dc", "dsa"):
        m1, s1, l1 = distil(name, data, steps=2, seed=3)
        m2, s2, l2 = distil(name, data, steps=2, seed=3)
        assert l1 == l2
        assert torch.equal(m1.result(s1).images, m2.result(s2).images)
    _, other, _ = distil("dsa", data, steps=2, seed=4)
    assert not torch.equal(m1.result(s1).images, other.images.detach())


def test_result_is_a_detached_class_sorted_set(data) -> None:
    method, state, _ = distil("dsa", data, steps=1, ipc=2, outer_loop=2, inner_loop=1)
    syn = method.result(state)
    assert syn.images.shape == (20, 1, 28, 28) and not syn.images.requires_grad
    assert syn.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert not syn.soft_labels


def test_real_initialisation_uses_real_images_of_each_class(data) -> None:
    seed_everything(0)
    method = create_method("dsa", TINY)
    state = method.init(data, 1, RunContext())
    for c in range(data.num_classes):
        image = state.images[c].detach()
        assert any(torch.equal(image, real) for real in data.class_images(c))


def test_dsa_is_siamese_in_matching(data) -> None:
    method = create_method("dsa", TINY)
    state = method.init(data, 1, RunContext())
    real = data.sample_real(0, 4)
    changed = 0
    for _ in range(6):
        seen_real, seen_syn = method._matching_views(state, real, real[:1].clone())
        assert torch.allclose(seen_real[:1], seen_syn)  # the same transform on both batches
        changed += int(not torch.allclose(seen_real, real))
    assert changed > 0  # and it does transform
    assert state.augment.strategy == data.dsa_strategy


def test_dc_does_not_augment(data) -> None:
    method = create_method("dc", TINY)
    state = method.init(data, 1, RunContext())
    real, syn = data.sample_real(0, 4), state.images[:1]
    assert method._matching_views(state, real, syn) == (real, syn)


def test_batchnorm_statistics_are_set_from_real_data_then_frozen(data) -> None:
    method = create_method("dc", {**TINY, "model": "ConvNetBN", "batch_real": 8})
    state = method.init(data, 1, RunContext())
    net = create_model("ConvNetBN", 1, 10, (28, 28))
    method._freeze_batchnorm(net, state)
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(not m.training for m in norms)
    assert all(m.running_mean.abs().sum() > 0 and m.num_batches_tracked == 1 for m in norms)
    # A full step with BN, two rounds and an inner loop runs and gives a finite loss.
    _, _, losses = distil("dc", data, steps=1, ipc=2, model="ConvNetBN", batch_real=8, outer_loop=2, inner_loop=1)
    assert torch.isfinite(torch.tensor(losses)).all()


@pytest.mark.slow
def test_compiled_passes_match_eager(data) -> None:
    """torch.compile is a speed-up only: one step moves the images the same way, to rounding.

    Fused kernels round differently, which flips a few ReLU masks on pre-activations within
    rounding of zero; training the net in the inner loop carries that a little further.
    """
    for name in ("dc", "dsa"):
        for params, tolerance in (({"ipc": 1}, 1e-3), ({"ipc": 2, "outer_loop": 2, "inner_loop": 2}, 2e-2)):
            _, start, _ = distil(name, data, steps=0, **params)
            _, eager, eager_loss = distil(name, data, steps=1, compile=False, **params)
            _, fast, fast_loss = distil(name, data, steps=1, compile=True, **params)
            assert fast.fast is not None and fast.fast.compiled is not None  # it did compile
            assert fast_loss == pytest.approx(eager_loss, rel=1e-3)
            eager_update = eager.images.detach() - start.images.detach()
            fast_update = fast.images.detach() - start.images.detach()
            assert (fast_update - eager_update).norm() < tolerance * eager_update.norm(), (name, params)
