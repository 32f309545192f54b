"""Many networks at once: from the same initial weights and the same generators, batched training ends
where sequential training ends (within float tolerance), with independent batches and augmentation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dd_bench.data.dsa import DSA
from dd_bench.eval.batched import can_batch, train_networks_batched
from dd_bench.eval.evaluate import evaluate
from dd_bench.eval.protocol import EvalProtocol
from dd_bench.eval.training import TrainRecipe, train_network
from dd_bench.method import SyntheticSet
from dd_bench.nets import create_model
from dd_bench.seeding import make_generator


def _nets(model: str, count: int = 3) -> list[torch.nn.Module]:
    nets = []
    for seed in range(count):
        torch.manual_seed(seed)
        nets.append(create_model(model, 1, 10, (28, 28), width=16) if model.startswith("ConvNet")
                    else create_model(model, 1, 10, (28, 28)))
    return nets


@pytest.mark.parametrize("recipe, dtype", [
    (TrainRecipe(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="step", drop_after_pass=1,
                 epochs=3, batch_size=8), torch.float32),
    # Adam divides by the gradient's running magnitude, so a float32 rounding difference in a near-zero gradient
    # (grouped vs plain convolution) can flip an update of size lr; in float64 both paths agree to ~1e-11.
    (TrainRecipe(optimizer="adam", lr=1e-3, schedule="cosine", warmup_steps=2, final_lr_fraction=0.01, steps=5,
                 batch_size=8, batch_order="cycle"), torch.float64),
])
def test_batched_and_sequential_training_end_with_the_same_weights(tiny_data, recipe, dtype):
    images, labels = tiny_data.train_images[:20].to(dtype), tiny_data.train_labels[:20]
    dsa = DSA(tiny_data.dsa_strategy)
    augment = lambda x, g: dsa(x, generator=g, siamese=False)  # noqa: E731  (per-image draws per net)
    sequential = [net.to(dtype) for net in _nets("ConvNet")]
    batched = copy.deepcopy(sequential)
    for net, seed in zip(sequential, range(3)):
        train_network(net, images, labels, recipe, loss_fn=F.cross_entropy, generator=make_generator(100 + seed),
                      augment=augment)
    train_networks_batched(batched, images, labels, recipe, loss_fn=F.cross_entropy,
                           generators=[make_generator(100 + seed) for seed in range(3)], augment=augment)
    for a, b in zip(sequential, batched):
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    # The nets stayed independent: different generators and inits give different weights.
    assert not torch.allclose(batched[0].classifier.weight, batched[1].classifier.weight)


def test_batchnorm_nets_fall_back_to_sequential(tiny_data):
    assert not can_batch(_nets("ConvNetBN")) and can_batch(_nets("ConvNet")) and not can_batch(_nets("ConvNet", 1))
    with pytest.raises(ValueError, match="BatchNorm"):
        train_networks_batched(_nets("ConvNetBN"), tiny_data.train_images[:4], tiny_data.train_labels[:4],
                               TrainRecipe(epochs=1), loss_fn=F.cross_entropy,
                               generators=[make_generator(0) for _ in range(3)])


def test_evaluate_gives_the_same_accuracies_batched_or_not(tiny_data):
    syn = SyntheticSet(tiny_data.train_images[::10], tiny_data.train_labels[::10])
    protocol = EvalProtocol(model="ConvNetW32", epochs=4, runs=3, augment="none", batch_size=10)
    one_by_one = evaluate(syn, tiny_data, protocol, seed=4, batched=False)
    together = evaluate(syn, tiny_data, protocol, seed=4, batched=True)
    assert together.batched and not one_by_one.batched
    assert together.accuracies == pytest.approx(one_by_one.accuracies, abs=5.1)  # at most one test image in 20 flips
