"""DM (distribution matching, PROTOCOL §5): tiny problems, real assertions.

Most tests distil with a narrow ConvNet (ConvNetW32) so the file stays fast on two CPU cores;
the equivalence tests use the default ConvNet, whose CPU forward has its own fast path.
"""

from __future__ import annotations

import pytest
import torch

from dd_bench.errors import ConfigError
from dd_bench.eval.evaluate import evaluate
from dd_bench.eval.protocol import EvalProtocol
from dd_bench.method import METHODS, RunContext, SyntheticSet, create_method
from dd_bench.nets import create_model
from dd_bench.seeding import seed_everything
from dd_bench.methods.dm import DM, DMConfig, matching_loss, real_class_means, uses_batch_statistics

SMALL_NET = "ConvNetW32"




def _distil(data, ipc: int, steps: int, seed: int = 0, **params):
    method = create_method("dm", {"model": SMALL_NET, "batch_real": 32, **params})
    seed_everything(seed)
    ctx = RunContext(seed=seed)
    state = method.init(data, ipc, ctx)
    losses = [method.step(state, ctx)["loss"] for _ in range(steps)]
    return method, state, losses


def _frozen(name: str, data, seed: int):
    torch.manual_seed(seed)
    net = create_model(name, data.channels, data.num_classes, tuple(data.image_size))
    net.requires_grad_(False)
    return net.train()


def _class_sorted_real(data, per_class: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([data.sample_real(c, per_class, generator=generator) for c in range(data.num_classes)])


# -- registration and config --------------------------------------------------------------
def test_registered_under_both_names_with_paper_defaults():
    assert METHODS.get("dm") is DM
    assert METHODS.get("distribution_matching") is DM
    assert DM.paper_protocol == "dm"
    config = create_method("dm").config
    assert config == DMConfig()
    assert (config.model, config.lr_img, config.momentum_img, config.batch_real, config.init, config.dsa,
            config.dsa_strategy) == ("ConvNet", 1.0, 0.5, 256, "real", True, None)


@pytest.mark.parametrize("params", [{"init": "zeros"}, {"lr_img": 0}, {"batch_real": 0}, {"no_such": 1}])
def test_bad_params_are_config_errors(params):
    with pytest.raises(ConfigError):
        create_method("dm", params)


# -- the step ------------------------------------------------------------------------------
def test_step_reports_a_float_loss_and_result_is_a_hard_class_sorted_set(data):
    method, state, losses = _distil(data, ipc=2, steps=1)
    assert isinstance(losses[0], float) and losses[0] > 0
    syn = method.result(state)
    assert isinstance(syn, SyntheticSet)
    assert syn.images.shape == (20, 1, 28, 28) and not syn.images.requires_grad
    assert syn.labels.tolist() == [c for c in range(10) for _ in range(2)]
    syn.images.add_(1.0)  # the result is a copy: mutating it must not touch the state
    assert not torch.equal(syn.images, state.images.detach())


def test_loss_falls_on_a_fixed_net_and_real_batch(data):
    # Each step draws a fresh net, so compare the objective on FIXED nets and real images.
    method, state, _ = _distil(data, ipc=1, steps=0, init="noise")
    nets = [_frozen(SMALL_NET, data, seed) for seed in (11, 12)]
    real = _class_sorted_real(data, 32)

    def objective() -> float:
        with torch.no_grad():
            return sum(float(matching_loss(net, real, state.images, 10)) for net in nets)

    before = objective()
    ctx = RunContext()
    for _ in range(8):
        method.step(state, ctx)
    assert objective() < 0.5 * before


@pytest.mark.parametrize("init,margin", [("noise", 25.0), ("real", 5.0)])
def test_distilled_set_beats_its_initialisation(data, init, margin):
    # Ten steps at IPC 1 lift noise from ~10% to 50-60% and real images by 15-25 points
    # (seeds 0-4 checked); the margins leave room.
    method, state, _ = _distil(data, ipc=1, steps=0, init=init)
    protocol = EvalProtocol(model=SMALL_NET, epochs=40, runs=2, augment="none")
    initial = evaluate(method.result(state), data, protocol, seed=1).mean
    ctx = RunContext()
    for _ in range(10):
        method.step(state, ctx)
    distilled = evaluate(method.result(state), data, protocol, seed=1).mean
    assert distilled > initial + margin, (initial, distilled)


def test_same_seed_same_set_and_another_seed_differs(data):
    first = _distil(data, ipc=1, steps=2, seed=3)
    second = _distil(data, ipc=1, steps=2, seed=3)
    other = _distil(data, ipc=1, steps=2, seed=4)
    assert first[2] == second[2]
    assert torch.equal(first[0].result(first[1]).images, second[0].result(second[1]).images)
    assert not torch.equal(first[0].result(first[1]).images, other[0].result(other[1]).images)


def test_dsa_off_and_strategy_none_run(data):
    for params in ({"dsa": False}, {"dsa_strategy": "none"}):
        method, state, losses = _distil(data, ipc=1, steps=1, **params)
        assert state.augment is None and losses[0] > 0


def test_bn_variant_runs_and_matches_one_forward_over_all_classes(data):
    net = _frozen("ConvNetBN", data, seed=0)
    assert uses_batch_statistics(net, "ConvNetBN")
    real = _class_sorted_real(data, 8)
    # Official BN branch: one forward of every class's real images, then per-class means.
    expected = net.embed(real).view(10, 8, -1).mean(dim=1)
    got = real_class_means(net, real, 10, whole_batch=True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    per_class = torch.stack([net.embed(real[c * 8 : (c + 1) * 8]).mean(0) for c in range(10)])
    assert not torch.allclose(got, per_class, atol=1e-3)  # batch statistics really span all classes

    method = create_method("dm", {"model": "ConvNetBN", "batch_real": 16})
    seed_everything(0)
    state = method.init(data, 1, RunContext())
    assert torch.isfinite(torch.tensor(method.step(state, RunContext())["loss"]))


# -- the fast, equivalent embedding path ---------------------------------------------------
def test_batched_real_means_equal_the_per_class_computation(data):
    net = _frozen("ConvNet", data, seed=0)
    assert not uses_batch_statistics(net, "ConvNet")
    real = _class_sorted_real(data, 20)
    per_class = torch.stack([net.embed(real[c * 20 : (c + 1) * 20]).mean(0) for c in range(10)])
    for chunk in (7, 32, 200):  # chunks that split classes, and one batch of everything
        torch.testing.assert_close(real_class_means(net, real, 10, chunk=chunk), per_class, rtol=1e-4, atol=1e-5)


def test_step_leaves_global_conv_backend_flags_as_it_found_them(data):
    mkldnn = torch.backends.mkldnn.enabled
    nnpack = torch._C._get_nnpack_enabled()
    _distil(data, ipc=1, steps=1, model="ConvNet", batch_real=8)
    assert torch.backends.mkldnn.enabled == mkldnn
    assert torch._C._get_nnpack_enabled() == nnpack
