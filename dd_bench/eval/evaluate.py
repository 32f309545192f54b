"""The standard train-from-scratch evaluation protocol (PROTOCOL §2.1).

Train ``runs`` freshly initialised networks on the synthetic set and test each once, at the
end, on the real test set. Nothing is selected on the test set: there is one test pass per
network, after its last epoch.

Faithful details kept from the DC/DSA/DM code:
- SGD momentum 0.9, weight decay 5e-4, lr 0.01 (or the set's learned lr), batch 256, shuffled;
- the loop runs ``epochs + 1`` passes, and at pass ``epochs // 2 + 1`` the lr drops ×0.1 and
  the optimiser is re-created (so momentum is reset), as ``evaluate_synset`` does;
- per-image DSA augmentation (not Siamese) when the protocol says ``augment: dsa``;
- the std over runs is the population std (NumPy's default, as the papers report).

Soft labels (documented choice): ``soft_label_loss: soft_ce`` is cross-entropy against label
rows read as probabilities (negative entries are clipped, rows renormalised); ``mse`` regresses
the network's outputs onto the label vectors (FRePo's evaluation loss).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dd_bench.data.dsa import DSA
from dd_bench.errors import ConfigError
from dd_bench.method import SyntheticSet
from dd_bench.nets import create_model
from dd_bench.seeding import derive_seed, make_generator

log = logging.getLogger(__name__)

AugmentChoice = Literal["auto", "none", "dsa"]


@dataclass(frozen=True)
class EvalProtocol:
    """How a synthetic set is scored. Defaults are the DC/DSA/DM protocol, with fewer runs.

    ``augment: auto`` means "as the method's paper evaluates it" (DSA for DSA/DM/MTT, none for
    DC) and is resolved per cell; the resolved value is what every result records.
    """

    model: str = "ConvNet"
    epochs: int = 300
    runs: int = 5
    lr: float = 0.01
    use_learned_lr: bool = True
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    augment: AugmentChoice = "auto"
    dsa_strategy: str | None = None
    soft_label_loss: Literal["soft_ce", "mse"] = "soft_ce"
    test_batch_size: int = 256

    def __post_init__(self) -> None:
        for name in ("epochs", "runs", "batch_size", "test_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "epochs" else 1):
                raise ConfigError(f"protocol.{name}: invalid value {value!r} (expected a positive integer)")
        if not self.lr > 0:
            raise ConfigError(f"protocol.lr: invalid value {self.lr!r} (expected > 0)")

    def resolved(self, paper_augment: str, dataset_strategy: str) -> "EvalProtocol":
        """Fix ``augment: auto`` and the DSA strategy for one method and dataset."""
        augment = paper_augment if self.augment == "auto" else self.augment
        strategy = (self.dsa_strategy or dataset_strategy) if augment == "dsa" else None
        return replace(self, augment=augment, dsa_strategy=strategy)

    def lr_drop_epoch(self) -> int:
        return self.epochs // 2 + 1

    def describe(self) -> str:
        """One line that travels with every number this protocol produced."""
        aug = f"DSA({self.dsa_strategy})" if self.augment == "dsa" else self.augment
        return (
            f"{self.model}, {self.epochs} epochs, SGD lr {self.lr:g}"
            f"{' (or learned)' if self.use_learned_lr else ''} ×0.1 at epoch {self.lr_drop_epoch()}, "
            f"mom {self.momentum:g}, wd {self.weight_decay:g}, batch {self.batch_size}, aug {aug}, "
            f"{self.runs} runs"
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalResult:
    accuracies: list[float]
    train_seconds: float
    lr: float
    label_type: str
    protocol: dict = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.accuracies))


def evaluate(
    syn: SyntheticSet,
    data,
    protocol: EvalProtocol,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Train ``protocol.runs`` fresh networks on ``syn`` and test each on ``data``'s test set.

    ``protocol`` must be resolved (``augment`` is "none" or "dsa"). Accuracies are percentages.
    """
    if protocol.augment == "auto":
        raise ValueError("evaluate() needs a resolved protocol: call protocol.resolved(...) first")
    device = torch.device(device)
    lr = syn.learned_lr if (protocol.use_learned_lr and syn.learned_lr is not None) else protocol.lr
    accuracies = []
    started = time.perf_counter()
    for run in range(protocol.runs):
        run_seed = derive_seed(seed, "eval", run)
        with torch.random.fork_rng(devices=[]):  # evaluating must not move the caller's RNG
            net = _train_one(syn, data, protocol, lr, run_seed, device)
        accuracies.append(test_accuracy(net, data.test_images, data.test_labels, protocol.test_batch_size, device))
        log.debug("eval run %d/%d: %.2f%%", run + 1, protocol.runs, accuracies[-1])
    label_type = f"soft ({protocol.soft_label_loss})" if syn.soft_labels else "hard (CE)"
    return EvalResult(accuracies, time.perf_counter() - started, float(lr), label_type, protocol.to_dict())


def _train_one(syn: SyntheticSet, data, protocol: EvalProtocol, lr: float, seed: int, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)
    generator = make_generator(seed)
    net = create_model(protocol.model, data.channels, data.num_classes, tuple(data.image_size)).to(device)
    net.train()
    augment = _augmenter(protocol)
    images = syn.images.detach().to(device)
    labels = syn.labels.detach().to(device)
    loss_fn = _loss(syn, protocol)
    optimizer = _sgd(net, lr, protocol)
    count = images.shape[0]
    for epoch in range(protocol.epochs + 1):
        if epoch == protocol.lr_drop_epoch():
            # The reference code re-creates the optimiser here, which also resets momentum.
            optimizer = _sgd(net, lr * 0.1, protocol)
        order = torch.randperm(count, generator=generator).to(device)
        for start in range(0, count, protocol.batch_size):
            batch = order[start : start + protocol.batch_size]
            x = images[batch]
            if augment is not None:
                x = augment(x, generator=generator, siamese=False)
            loss = loss_fn(net(x), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return net


def _sgd(net: nn.Module, lr: float, protocol: EvalProtocol) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=lr, momentum=protocol.momentum, weight_decay=protocol.weight_decay)


def _augmenter(protocol: EvalProtocol):
    if protocol.augment != "dsa":
        return None
    return DSA(protocol.dsa_strategy or "")


def _loss(syn: SyntheticSet, protocol: EvalProtocol):
    if not syn.soft_labels:
        return F.cross_entropy
    if protocol.soft_label_loss == "mse":
        return lambda logits, target: F.mse_loss(logits, target)

    def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = target.clamp_min(0)
        probs = probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return -(probs * F.log_softmax(logits, dim=1)).sum(dim=1).mean()

    return soft_cross_entropy


@torch.no_grad()
def test_accuracy(
    net: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256, device: torch.device | str = "cpu"
) -> float:
    """Top-1 accuracy (%) of ``net`` in eval mode; the one test pass of a trained network."""
    net.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        correct += (net(x).argmax(dim=1) == y).sum().item()
    return 100.0 * correct / max(1, images.shape[0])
