"""Selection baselines: random real images, herding and k-center (coresets; no optimisation).

Herding and k-center select in an embedding. The default embedding is the penultimate layer
(``embed``) of a ConvNet trained on the full real training set, as the DC paper's coreset
baselines use a trained ConvNet's features. That network is a one-off artifact: trained once
per dataset and config, cached, and timed as the cell's preparation. ``pixels`` and
``random_convnet`` embeddings are cheaper alternatives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from dd_bench.method import Method, RunContext, SyntheticSet, register_method
from dd_bench.nets import create_model
from dd_bench.seeding import make_generator

log = logging.getLogger(__name__)


def _hard_set(images_by_class: list[torch.Tensor]) -> SyntheticSet:
    labels = torch.cat([torch.full((len(x),), c, dtype=torch.long) for c, x in enumerate(images_by_class)])
    return SyntheticSet(torch.cat(images_by_class), labels)


@register_method("random", "random_real")
class RandomReal(Method):
    """Random real images: ``ipc`` training images drawn per class without replacement."""

    iterative = False

    def init(self, data, ipc: int, ctx: RunContext) -> SyntheticSet:
        return _hard_set([data.sample_real(c, ipc, generator=ctx.generator) for c in range(data.num_classes)])

    def result(self, state: SyntheticSet) -> SyntheticSet:
        return state


@register_method("full", "whole_dataset")
class FullDataset(Method):
    """The whole real training set (the upper-bound reference column; ``ipc`` is ignored)."""

    iterative = False
    save_set = False

    def init(self, data, ipc: int, ctx: RunContext) -> SyntheticSet:
        return SyntheticSet(data.train_images, data.train_labels, meta={"ipc_ignored": True})

    def result(self, state: SyntheticSet) -> SyntheticSet:
        return state


@dataclass
class EmbeddingConfig:
    """Where herding and k-center measure distances.

    ``trained_convnet`` (default): ``embed_model`` trained for ``embed_epochs`` on the real
    training set (SGD lr 0.01, momentum 0.9, wd 5e-4, batch 256) from ``embed_seed``.
    """

    embedding: Literal["trained_convnet", "random_convnet", "pixels"] = "trained_convnet"
    embed_model: str = "ConvNet"
    embed_epochs: int = 3
    embed_seed: int = 0


class _EmbeddingSelector(Method):
    """Shared machinery: compute per-class embeddings, then pick ``ipc`` indices per class."""

    Config = EmbeddingConfig
    iterative = False

    def __init__(self, config: EmbeddingConfig | None = None):
        super().__init__(config)
        self._weights: dict | None = None

    def artifact_spec(self, data) -> dict | None:
        if self.config.embedding != "trained_convnet":
            return None
        return {"purpose": "embedding network", "dataset": data.fingerprint(), "model": self.config.embed_model,
                "epochs": self.config.embed_epochs, "seed": self.config.embed_seed}

    def build_artifacts(self, data, directory: Path, ctx: RunContext) -> None:
        net = self._network(data, ctx)
        train_on_real(net, data, self.config.embed_epochs, self.config.embed_seed, ctx.device)
        torch.save(net.state_dict(), directory / "embedding_net.pt")

    def load_artifacts(self, directory: Path, ctx: RunContext) -> None:
        self._weights = torch.load(directory / "embedding_net.pt", map_location="cpu", weights_only=True)

    def _network(self, data, ctx: RunContext) -> torch.nn.Module:
        # A fixed seed, independent of the cell's: every cell must see the same embedding.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.embed_seed)
            net = create_model(self.config.embed_model, data.channels, data.num_classes, tuple(data.image_size))
        return net.to(ctx.device)

    @torch.no_grad()
    def _embed(self, images: torch.Tensor, data, ctx: RunContext) -> torch.Tensor:
        if self.config.embedding == "pixels":
            return images.flatten(1)
        net = self._network(data, ctx)
        if self._weights is not None:
            net.load_state_dict(self._weights)
        net.eval()
        return torch.cat([net.embed(images[i : i + 512].to(ctx.device)).cpu() for i in range(0, len(images), 512)])

    def init(self, data, ipc: int, ctx: RunContext) -> SyntheticSet:
        chosen = []
        for c in range(data.num_classes):
            images = data.class_images(c)
            features = self._embed(images, data, ctx).double()
            chosen.append(images[self.select(features, ipc, ctx)])
        return _hard_set(chosen)

    def result(self, state: SyntheticSet) -> SyntheticSet:
        return state

    def select(self, features: torch.Tensor, k: int, ctx: RunContext) -> torch.Tensor:
        raise NotImplementedError


@register_method("herding")
class Herding(_EmbeddingSelector):
    """Herding (Welling 2009): greedily add the image that keeps the running mean of the
    selected embeddings closest to the class mean."""

    def select(self, features: torch.Tensor, k: int, ctx: RunContext) -> torch.Tensor:
        return herding_order(features, k)


@register_method("kcenter", "k_center")
class KCenter(_EmbeddingSelector):
    """Greedy k-center (Sener & Savarese 2018): start at the image nearest the class mean, then
    repeatedly add the image farthest from every chosen centre."""

    def select(self, features: torch.Tensor, k: int, ctx: RunContext) -> torch.Tensor:
        return kcenter_greedy(features, k)


def herding_order(features: torch.Tensor, k: int) -> torch.Tensor:
    mean = features.mean(dim=0)
    running = torch.zeros_like(mean)
    available = torch.ones(len(features), dtype=torch.bool)
    picked = []
    for step in range(1, k + 1):
        distances = ((mean - (running + features) / step) ** 2).sum(dim=1)
        distances[~available] = float("inf")
        index = int(distances.argmin())
        picked.append(index)
        available[index] = False
        running += features[index]
    return torch.tensor(picked, dtype=torch.long)


def kcenter_greedy(features: torch.Tensor, k: int) -> torch.Tensor:
    first = int(((features - features.mean(dim=0)) ** 2).sum(dim=1).argmin())
    picked = [first]
    nearest = torch.cdist(features, features[first : first + 1]).squeeze(1)
    for _ in range(k - 1):
        index = int(nearest.argmax())
        picked.append(index)
        nearest = torch.minimum(nearest, torch.cdist(features, features[index : index + 1]).squeeze(1))
    return torch.tensor(picked, dtype=torch.long)


def train_on_real(net: torch.nn.Module, data, epochs: int, seed: int, device: torch.device,
                  lr: float = 0.01, batch_size: int = 256) -> torch.nn.Module:
    """Plain supervised training on the full real training set (no augmentation)."""
    generator = make_generator(seed)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    net.train()
    count = len(data.train_labels)
    for epoch in range(epochs):
        order = torch.randperm(count, generator=generator)
        for start in range(0, count, batch_size):
            batch = order[start : start + batch_size]
            x, y = data.train_images[batch].to(device), data.train_labels[batch].to(device)
            loss = F.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        log.debug("embedding net epoch %d/%d: loss %.4f", epoch + 1, epochs, loss.item())
    return net
