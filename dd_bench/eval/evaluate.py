"""Scoring a synthetic set: train fresh networks on it by a protocol, test each once on the real test set.

Nothing is selected on the test set: each network is trained for the protocol's whole length
and tested exactly once, after its last step. The std over runs is the population std
(NumPy's default, as the papers report).

Targets per label kind and protocol loss (documented choices where the papers are silent):
- hard labels, ``ce``: cross-entropy on class indices (DC/DSA/DM/MTT);
- hard labels, ``mse``: regression onto centred one-hot vectors (1 − 1/K on the class,
  −1/K elsewhere: FRePo's targets for real data);
- soft labels, ``soft_ce``: cross-entropy against label rows read as probabilities (negative
  entries clipped, rows renormalised);
- soft labels, ``mse``: regression of the outputs onto the label vectors (FRePo's evaluation).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dd_bench.data.dc_augment import DCAugment
from dd_bench.data.dsa import DSA, DSAParams
from dd_bench.eval.batched import can_batch, train_networks_batched
from dd_bench.eval.protocol import EvalProtocol
from dd_bench.eval.training import TrainRecipe, train_network
from dd_bench.method import SyntheticSet
from dd_bench.nets import create_model
from dd_bench.seeding import derive_seed, make_generator

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Accuracies (%) of every trained network, and what produced them."""

    accuracies: list[float]
    train_seconds: float
    lr: float
    label_type: str
    protocol: dict = field(default_factory=dict)
    protocol_text: str = ""
    batched: bool = False

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.accuracies))


def evaluate(syn: SyntheticSet, data, protocol: EvalProtocol, seed: int = 0,
             device: torch.device | str = "cpu", batched: bool | str = "auto") -> EvalResult:
    """Train ``protocol.runs`` fresh networks on ``syn`` and test each on ``data``'s test set.

    ``protocol`` must be resolved (``dd_bench.eval.protocol.resolve``). Run ``r`` draws its
    initialisation, batch order and augmentation from ``derive_seed(seed, "eval", r)``, so
    two protocols scoring one set with the same seed start from the same networks.
    ``batched``: train the runs together (``dd_bench.eval.batched``; same result up to rounding);
    ``"auto"`` does so on CUDA for nets without BatchNorm, where it is faster.
    """
    if not protocol.is_resolved:
        raise ValueError("evaluate() needs a resolved protocol: call dd_bench.eval.protocol.resolve first")
    device = torch.device(device)
    lr = syn.learned_lr if (protocol.use_learned_lr and syn.learned_lr is not None) else protocol.lr
    images = syn.images.detach().to(device)
    targets, loss_fn, label_type = training_targets(syn, data.num_classes, protocol)
    targets = targets.to(device)
    recipe = recipe_for(protocol, float(lr))
    augment = augmenter(protocol, tuple(data.image_size))
    started = time.perf_counter()
    nets, generators = [], []
    for run in range(protocol.runs):
        run_seed = derive_seed(seed, "eval", run)
        with torch.random.fork_rng(devices=[]):  # evaluating must not move the caller's RNG
            torch.manual_seed(run_seed)
            nets.append(create_model(protocol.model, data.channels, data.num_classes, tuple(data.image_size)).to(device))
        generators.append(make_generator(run_seed))
    together = (batched is True or (batched == "auto" and device.type == "cuda")) and can_batch(nets)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if together:
            train_networks_batched(nets, images, targets, recipe, loss_fn=loss_fn, generators=generators,
                                   augment=augment, precision=protocol.precision)
        else:
            for net, generator in zip(nets, generators):
                train_network(net, images, targets, recipe, loss_fn=loss_fn, generator=generator, augment=augment,
                              precision=protocol.precision)
    accuracies = [test_accuracy(net, data.test_images, data.test_labels, protocol.test_batch_size, device)
                  for net in nets]
    log.debug("eval: %s", ", ".join(f"{a:.2f}%" for a in accuracies))
    return EvalResult(accuracies, time.perf_counter() - started, float(lr), label_type, protocol.to_dict(),
                      protocol.describe(), batched=together)


def recipe_for(protocol: EvalProtocol, lr: float) -> TrainRecipe:
    """The training loop's recipe for a resolved protocol (step schedule: E + 1 passes, drop after E//2 + 1)."""
    common = dict(optimizer=protocol.optimizer, lr=lr, momentum=protocol.momentum,
                  weight_decay=protocol.weight_decay, batch_size=protocol.batch_size,
                  batch_order=protocol.batch_order, warmup_steps=protocol.warmup_steps,
                  final_lr_fraction=protocol.final_lr_fraction)
    if protocol.steps is not None:
        return TrainRecipe(schedule=protocol.schedule, steps=protocol.steps, **common)
    if protocol.schedule == "step":
        return TrainRecipe(schedule="step", epochs=protocol.passes(), drop_after_pass=protocol.lr_drop_epoch(),
                           **common)
    return TrainRecipe(schedule=protocol.schedule, epochs=protocol.passes(), **common)


def augmenter(protocol: EvalProtocol, image_size: tuple[int, int]) -> Callable[[Tensor, torch.Generator], Tensor] | None:
    """The per-image training augmentation of a resolved protocol (None for ``none``)."""
    if protocol.augment == "dsa":
        dsa = DSA(protocol.dsa_strategy or "", DSAParams(align_corners=protocol.dsa_align_corners))
        return None if not dsa.tokens else (lambda x, g: dsa(x, generator=g, siamese=False))
    if protocol.augment == "dc":
        return DCAugment(protocol.dc_strategy or "none")
    if protocol.augment == "frepo":
        from dd_bench.data.frepo_augment import FRePoAugment  # lands with the FRePo method (issue 13)

        return FRePoAugment(protocol.frepo_strategy or "", image_size)
    return None


def training_targets(syn: SyntheticSet, num_classes: int,
                     protocol: EvalProtocol) -> tuple[Tensor, Callable[[Tensor, Tensor], Tensor], str]:
    """(targets, loss, label description) for the set's labels under the protocol's losses."""
    labels = syn.labels.detach()
    if not syn.soft_labels:
        if protocol.hard_label_loss == "mse":
            centred = F.one_hot(labels.long(), num_classes).float() - 1.0 / num_classes
            return centred, F.mse_loss, "hard (MSE, centred one-hot)"
        return labels.long(), F.cross_entropy, "hard (CE)"
    if protocol.soft_label_loss == "mse":
        return labels.float(), F.mse_loss, "soft (MSE)"
    return labels.float(), soft_cross_entropy, "soft (soft CE)"


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy against label rows read as probabilities (negatives clipped, rows renormalised)."""
    probs = target.clamp_min(0)
    probs = probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return -(probs * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


@torch.no_grad()
def test_accuracy(net: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256,
                  device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy (%) of ``net`` in eval mode: the one test pass of a trained network."""
    net.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device, non_blocking=True)
        y = labels[start : start + batch_size].to(device, non_blocking=True)
        correct += (net(x).argmax(dim=1) == y).sum()  # summed on the device: one sync at the end
    return 100.0 * int(correct) / max(1, images.shape[0])
