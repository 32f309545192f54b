"""MGDD (PROTOCOL §8): tiny problems, real assertions.

Everything runs with a narrow feature net (ConvNetW32: 512 features on 28x28) and a small
generator, so the file stays fast on two CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dd_bench.data import load_dataset
from dd_bench.errors import ConfigError
from dd_bench.eval.evaluate import evaluate
from dd_bench.eval.protocol import EvalProtocol
from dd_bench.method import METHODS, RunContext, SyntheticSet, create_method
from dd_bench.seeding import make_generator, seed_everything
from dd_bench.methods import mgdd_meta
from dd_bench.methods.mgdd import MGDD, MGDDConfig
from dd_bench.methods.mgdd_parts import (ResidualGenerator, adapt_images, embed_in_chunks, generate, krr_loss,
                                         krr_loss_given_real, label_weights, one_hot, random_feature_net)

SMALL = {"feature_model": "ConvNetW32", "generator_width": 8, "generator_levels": 1, "real_per_class": 8,
         "pool_size": 2}
TINY_META = {**SMALL, "meta_steps": 5, "meta_checkpoint_every": 2, "meta_classes_per_task": 5,
             "meta_task_per_class": 12, "meta_ipc": [1, 2], "real_per_class": 4}


def _adapt(data, ipc: int, steps: int, seed: int = 0, **params):
    method = create_method("mgdd", {**SMALL, "meta_train": False, **params})
    seed_everything(seed)
    ctx = RunContext(seed=seed)
    state = method.init(data, ipc, ctx)
    losses = [method.step(state, ctx)["loss"] for _ in range(steps)]
    return method, state, losses


def _build(directory: Path, data, params: dict, seed: int = 7) -> MGDD:
    method = create_method("mgdd", params)
    seed_everything(seed)
    method.build_artifacts(data, directory, RunContext(seed=seed, load_dataset=load_dataset))
    method.load_artifacts(directory, RunContext(seed=seed))
    return method


# -- registration and config --------------------------------------------------------------
def test_registered_with_documented_defaults():
    assert METHODS.get("mgdd") is MGDD
    assert MGDD.supports_deploy()
    config = create_method("mgdd").config
    assert config == MGDDConfig()
    assert (config.mode, config.meta_train, config.labels, config.label_real_per_class) == (
        "generator", True, "analytical", None)
    assert MGDD.paper_protocol["soft_label_loss"] in ("mse", "soft_ce")


@pytest.mark.parametrize("params", [{"mode": "gan"}, {"adapt_lr": 0}, {"pool_size": 0}, {"label_real_per_class": 0},
                                    {"meta_ipc": []}, {"meta_task_per_class": 5}, {"labels": "hard"}, {"no_such": 1},
                                    {"mode": "pixels", "adapt": False}, {"generator_condition": "class"}])
def test_bad_params_are_config_errors(params):
    with pytest.raises(ConfigError):
        create_method("mgdd", params)


def test_artifact_spec_names_what_the_generator_depends_on_and_nothing_else(data):
    spec = create_method("mgdd").artifact_spec(data)
    assert spec["source"]["name"] == "mnist_sample" and spec["meta"]["steps"] == 200
    assert spec["target_space"]["channels"] == 1 and spec["target_space"]["image_size"] == [28, 28]
    assert "checkpoint_every" not in spec["meta"]  # checkpoints do not change the artifact
    assert create_method("mgdd", {"meta_checkpoint_every": 3}).artifact_spec(data) == spec
    assert create_method("mgdd", {"meta_steps": 201}).artifact_spec(data) != spec
    assert "label_per_class" not in spec["meta"]  # 0 (the default) specs what older versions built
    assert create_method("mgdd", {"meta_label_per_class": 100}).artifact_spec(data)["meta"]["label_per_class"] == 100
    for params in ({"meta_train": False}, {"mode": "labels_only"}, {"mode": "pixels"}):
        assert create_method("mgdd", params).artifact_spec(data) is None


def test_meta_train_without_its_artifact_is_a_clear_error(data):
    method = create_method("mgdd", SMALL)
    with pytest.raises(ConfigError, match="meta_train"):
        method.init(data, 1, RunContext())


# -- analytical labels (Eq. 3) -------------------------------------------------------------
def test_labels_reproduce_a_linear_map_exactly_when_one_exists():
    data = load_dataset("mnist_sample").subset(per_class=80, test_per_class=10)  # 800 images > 512 features
    net = random_feature_net("ConvNetW32", 1, (28, 28), seed=0)
    features = embed_in_chunks(net, data.train_images)
    linear_map = torch.randn(features.shape[1], 10, generator=torch.Generator().manual_seed(1))
    weights = label_weights(features, features @ linear_map, reg=0.0)
    torch.testing.assert_close(weights, linear_map, rtol=1e-3, atol=1e-3)
    unseen = embed_in_chunks(net, data.test_images)
    torch.testing.assert_close(unseen @ weights, unseen @ linear_map, rtol=1e-3, atol=1e-3)


def test_primal_and_dual_solves_agree():
    generator = torch.Generator().manual_seed(0)
    for n, d in ((300, 120), (120, 300)):
        features = torch.randn(n, d, generator=generator)
        targets = one_hot(torch.randint(10, (n,), generator=generator), 10)
        primal = label_weights(features, targets, reg=1e-3, form="primal")
        dual = label_weights(features, targets, reg=1e-3, form="dual")
        torch.testing.assert_close(primal, dual, rtol=1e-4, atol=1e-5)


def test_labels_of_a_large_train_set_are_soft_and_sum_to_about_one(data):
    _, state, _ = _adapt(load_dataset("mnist_sample"), ipc=2, steps=0)  # 4,000 images > 512 features: primal
    labels = state.pool_labels[0]
    assert labels.shape == (20, 10)
    assert not torch.allclose(labels, one_hot(labels.argmax(1), 10), atol=1e-2)  # really soft
    torch.testing.assert_close(labels.sum(1), torch.ones(20), atol=0.2, rtol=0)
    assert (labels.argmax(1) == torch.arange(10).repeat_interleave(2)).float().mean() >= 0.8


# -- the generator -------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 1, 28, 28), (2, 3, 32, 32), (2, 3, 17, 23), (1, 4, 9, 9)])
def test_unadapted_generator_is_the_identity_at_any_size_and_channel_count(shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    generator = ResidualGenerator(shape[1], width=8, levels=2)
    assert torch.equal(generator(x), x)


def test_label_conditioned_generator_starts_as_the_identity_and_can_move_classes_apart():
    torch.manual_seed(0)
    x, labels = torch.randn(4, 1, 12, 12), torch.eye(4)
    generator = ResidualGenerator(1, width=8, levels=2, condition_dim=4)
    assert torch.equal(generator(x, labels), x)
    with pytest.raises(ValueError, match="condition"):
        generator(x)
    torch.nn.init.normal_(generator.head.weight, std=0.1)
    same_image = x[:1].expand(4, -1, -1, -1)  # one image under four labels: four different outputs
    out = generator(same_image, labels)
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[2], out[3])
    assert ResidualGenerator(1, 8, 2, 4).describe()["condition_dim"] == 4


def test_label_conditioned_mgdd_adapts_meta_trains_and_deploys(tmp_path, data):
    _, state, losses = _adapt(data, ipc=1, steps=3, generator_condition="labels")
    assert state.generator.condition_dim == data.num_classes and len(losses) == 3
    assert not torch.equal(state.generator.state_dict()["condition.0.weight"],
                           _adapt(data, ipc=1, steps=0, generator_condition="labels")[1].generator
                           .state_dict()["condition.0.weight"])
    method = _build(tmp_path, data, {**TINY_META, "generator_condition": "labels"})  # 5-class tasks, 10-class target
    assert method._meta_generator["generator_shape"]["condition_dim"] == 10
    seed_everything(0)
    ctx = RunContext()
    state = method.init(data, 1, ctx)
    method.step(state, ctx)
    assert method.deploy(state, 3, ctx).images.shape == (30, 1, 28, 28)
    spec = method.artifact_spec(data)
    assert spec["meta"]["generator_condition_dim"] == 10
    assert spec != create_method("mgdd", TINY_META).artifact_spec(data)


def test_untrained_mgdd_starts_from_its_initialisation(data):
    method, state, _ = _adapt(data, ipc=2, steps=0)
    assert torch.equal(method.result(state).images, state.pool_images[0])


# -- the training loss (Eq. 1) over adaptation ----------------------------------------------
# Why IPC 1 and a pool of one initialisation in the two tests below: the generator is one map
# shared by every image it serves. On this tiny problem, serving two IPC-2 initialisations (40
# images) it lowers Eq. 1 by 2-5 % in 40 steps, while pixels optimised directly fall 14 %; serving
# the 10 images of one IPC-1 set it follows the pixels closely (80 steps, lr 1e-2: Eq. 1
# 0.760 -> 0.625 vs 0.580 for pixels; accuracy 58.9 -> 66.1 vs 66.6 for pixels; seeds 1-3 of the
# same set-up: +8.6, +9.9, +4.5 points; measured with a throwaway script).
_SHARP = {"adapt_lr": 1e-2, "pool_size": 1}


def test_eq1_falls_over_adaptation_steps(data):
    # Each step draws a fresh θ* and real batch: compare the objective on FIXED nets and images.
    method, state, _ = _adapt(data, ipc=1, steps=0, **_SHARP)
    nets = [random_feature_net("ConvNetW32", 1, (28, 28), seed) for seed in (11, 12, 13)]
    generator = torch.Generator().manual_seed(5)
    real = torch.cat([data.sample_real(c, 16, generator=generator) for c in range(10)])
    targets = one_hot(torch.arange(10).repeat_interleave(16), 10)

    def objective() -> float:
        syn = method.result(state)
        with torch.no_grad():
            return sum(float(krr_loss(net, real, targets, syn.images, syn.labels, 1e-6)) for net in nets)

    before = objective()
    ctx = RunContext()
    for _ in range(80):
        method.step(state, ctx)
    after = objective()
    assert after < 0.9 * before, (before, after)
    # the probe form (real features computed once) is the same loss
    syn = method.result(state)
    torch.testing.assert_close(krr_loss(nets[0], real, targets, syn.images, syn.labels, 1e-6),
                               krr_loss_given_real(nets[0], embed_in_chunks(nets[0], real), targets, syn.images,
                                                   syn.labels, 1e-6))


def test_pixels_mode_lowers_eq1_and_labels_only_changes_nothing(data):
    method, state, losses = _adapt(data, ipc=2, steps=25, mode="pixels")
    assert sum(losses[-5:]) < sum(losses[:5])
    method, state, _ = _adapt(data, ipc=2, steps=3, mode="labels_only")
    assert state.generator is None and torch.equal(method.result(state).images, state.pool_images[0])


def test_mgdd_set_beats_its_initialisation(data):
    method, state, _ = _adapt(data, ipc=1, steps=0, **_SHARP)
    protocol = EvalProtocol(model="ConvNetW32", epochs=60, runs=3, augment="none", soft_label_loss="mse")
    initial = evaluate(method.result(state), data, protocol, seed=1).mean
    ctx = RunContext()
    for _ in range(80):
        method.step(state, ctx)
    adapted = evaluate(method.result(state), data, protocol, seed=1).mean
    assert adapted > initial + 3.0, (initial, adapted)  # measured +7.2 (see above)


# -- deployment ----------------------------------------------------------------------------
def test_deploy_gives_the_requested_ipc_without_adapting(data):
    method, state, _ = _adapt(data, ipc=2, steps=2)
    weights = [p.detach().clone() for p in state.generator.parameters()]
    ctx = RunContext()
    for ipc in (1, 2, 5):
        syn = method.deploy(state, ipc, ctx)
        assert isinstance(syn, SyntheticSet) and syn.images.shape == (10 * ipc, 1, 28, 28)
        assert syn.labels.shape == (10 * ipc, 10) and not syn.images.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(weights, state.generator.parameters()))
    # a deployment depends on its IPC, not on what was deployed before
    assert torch.equal(method.deploy(state, 1, ctx).images, method.deploy(state, 1, ctx).images)
    # it is the generator applied to deploy_initialisation's set, with that set's labels
    start, deployed = method.deploy_initialisation(state, 5), method.deploy(state, 5, ctx)
    assert torch.equal(deployed.labels, start.labels)
    torch.testing.assert_close(deployed.images, generate(state.generator, start.images, start.labels))
    with pytest.raises(ConfigError, match="pixels"):
        pixels, pstate, _ = _adapt(data, ipc=2, steps=0, mode="pixels")
        pixels.deploy(pstate, 5, ctx)


def test_initialisation_and_produce_serve_sets_outside_the_pool(data):
    method, state, _ = _adapt(data, ipc=2, steps=2)
    first, again = (method.initialisation(state, 3, make_generator(7)) for _ in range(2))
    assert first.images.shape == (30, 1, 28, 28) and first.labels.shape == (30, 10)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)  # a function of the stream
    made = method.produce(state, first)
    assert torch.equal(made.labels, first.labels)
    torch.testing.assert_close(made.images, generate(state.generator, first.images, first.labels))
    plain, plain_state, _ = _adapt(data, ipc=2, steps=0, mode="labels_only")
    start = plain.initialisation(plain_state, 3, make_generator(7))
    assert torch.equal(plain.produce(plain_state, start).images, start.images)


# -- determinism ---------------------------------------------------------------------------
def test_same_seed_same_set_and_another_seed_differs(data):
    first = _adapt(data, ipc=1, steps=2, seed=3)
    second = _adapt(data, ipc=1, steps=2, seed=3)
    other = _adapt(data, ipc=1, steps=2, seed=4)
    assert first[2] == second[2]
    a, b, c = (m.result(s) for m, s, _ in (first, second, other))
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


# -- meta-training (the artifact) ----------------------------------------------------------
def test_meta_training_changes_the_generator_and_adaptation_starts_from_it(tmp_path, data):
    method = _build(tmp_path, data, TINY_META)
    artifact = method._meta_generator
    assert artifact["steps"] == 5 and len(artifact["losses"]) == 5
    assert not torch.equal(artifact["generator"]["head.weight"], torch.zeros_like(artifact["generator"]["head.weight"]))
    assert not (tmp_path / mgdd_meta.CHECKPOINT_FILE).exists()
    seed_everything(0)
    state = method.init(data, 1, RunContext())
    torch.testing.assert_close(state.generator.state_dict()["head.weight"], artifact["generator"]["head.weight"])


def test_unadapted_meta_generator_is_the_zero_step_point_and_takes_no_harness_steps(tmp_path, data):
    method = _build(tmp_path, data, {**TINY_META, "adapt": False})
    assert method.iterative is False and create_method("mgdd", {"mode": "labels_only"}).iterative is False
    assert create_method("mgdd").iterative is True
    seed_everything(0)
    state = method.init(data, 1, RunContext())
    before = method.result(state).images
    expected = generate(state.generator, state.pool_images[0], state.pool_labels[0])
    assert torch.equal(before, expected) and not torch.equal(before, state.pool_images[0])
    method.step(state, RunContext())  # reports the loss, changes nothing
    assert torch.equal(method.result(state).images, before)


def _task_support_labels(label_per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Eq. 3 labels of a meta-training task's own images, and their classes."""
    source = load_dataset("mnist_sample")
    config = MGDDConfig(**{**TINY_META, "meta_label_per_class": label_per_class})
    task = mgdd_meta._Task(source.train_images, source.train_labels, source.num_classes, config.meta_settings(10),
                           torch.Generator().manual_seed(0), torch.device("cpu"))
    labels = torch.cat(task.features) @ task.weights
    return labels, torch.arange(task.k).repeat_interleave(task.images[0].shape[0])


def test_held_out_label_images_make_a_tasks_labels_soft_like_adaptations():
    # 5 classes x 12 images = 60 < 512 features: the task's own solve interpolates (one-hot labels)
    interpolated, classes = _task_support_labels(0)
    torch.testing.assert_close(interpolated, one_hot(classes, 5), atol=1e-2, rtol=0)
    # + 5 x 300 label-only images = 1,560 > 512: overdetermined, the support's labels are soft
    soft, classes = _task_support_labels(300)
    assert (soft - one_hot(classes, 5)).abs().max() > 0.2
    assert (soft.argmax(1) == classes).float().mean() >= 0.7


def test_interrupted_meta_training_resumes_bit_identically(tmp_path, data, monkeypatch):
    uninterrupted = _build(tmp_path / "whole", data, TINY_META)._meta_generator

    def interrupt(done: int) -> None:
        if done == 3:  # after step 3, one step past the checkpoint at step 2
            raise KeyboardInterrupt

    monkeypatch.setattr(mgdd_meta, "after_meta_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "cut", data, TINY_META)
    assert (tmp_path / "cut" / mgdd_meta.CHECKPOINT_FILE).exists()
    assert not (tmp_path / "cut" / mgdd_meta.ARTIFACT_FILE).exists()
    monkeypatch.setattr(mgdd_meta, "after_meta_step", None)
    resumed = _build(tmp_path / "cut", data, TINY_META)._meta_generator
    assert resumed["losses"] == uninterrupted["losses"]
    for name, tensor in uninterrupted["generator"].items():
        assert torch.equal(resumed["generator"][name], tensor), name


# -- the source adapter --------------------------------------------------------------------
def test_adapter_maps_grey_to_colour_and_back_into_the_target_space(data):
    class Space:  # a 3-channel 32x32 target with its own normalisation
        name, channels, image_size, mean, std, zca = "rgb", 3, (32, 32), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), None

    grey = data.train_images[:4]
    colour = adapt_images(grey, data, Space)
    assert colour.shape == (4, 3, 32, 32)
    pixels = colour * torch.tensor(Space.std).view(1, 3, 1, 1) + torch.tensor(Space.mean).view(1, 3, 1, 1)
    torch.testing.assert_close(pixels[:, 0], pixels[:, 2])  # grey repeated in every channel
    torch.testing.assert_close(adapt_images(grey, data, data), grey, atol=1e-5, rtol=0)  # same space: unchanged
    Space.channels = 2
    with pytest.raises(ConfigError, match="channels"):
        adapt_images(grey, data, Space)
