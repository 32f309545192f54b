"""The one loop that trains a network on a fixed set of images.

Used by the evaluation protocols (train from scratch on a synthetic set), the baselines'
embedding net (train on the real set), DC/DSA's inner loop and MTT's expert trajectories,
so that all of them share batching, schedules, augmentation hooks and precision handling.

A :class:`TrainRecipe` says what the papers say: optimiser (SGD or Adam), learning-rate
schedule, length in passes over the data (``epochs``) or in optimiser steps (``steps``),
batch size and batch order. Two schedules reproduce the papers' code exactly:

- ``step`` is DC/DSA/DM/MTT's ``evaluate_synset``: after pass ``drop_after_pass`` (0-based)
  has been trained, the lr is multiplied by ``drop_factor`` and the optimiser is re-created
  (which also resets momentum). With ``epochs = E + 1`` passes and ``drop_after_pass =
  E // 2 + 1`` this is their loop, ``for ep in range(E + 1): train; if ep == E//2+1: drop``.
- ``cosine`` is FRePo's: a linear warm-up from 0 over ``warmup_steps`` optimiser steps,
  then a cosine decay to ``final_lr_fraction · lr`` over the remaining steps (optax's
  ``join_schedules(linear_schedule, cosine_decay_schedule(alpha=final_lr_fraction))``).

Batch order ``shuffle`` draws a fresh permutation per pass (PyTorch's ``DataLoader(shuffle=
True)``, the papers' loader); ``cycle`` walks the set in its stored order and wraps around
across pass boundaries (FRePo's ``tf.data ... .repeat().batch(B)``, no shuffle).

Every draw (batch order, augmentation) comes from the ``generator`` passed in; the network's
initialisation is the caller's business.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

Augment = Callable[[Tensor, torch.Generator], Tensor]
Forward = Callable[[Tensor], Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class TrainRecipe:
    """How to train: optimiser, schedule, length, batches (see the module docstring)."""

    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: Literal["constant", "step", "cosine"] = "constant"
    drop_after_pass: int | None = None
    drop_factor: float = 0.1
    warmup_steps: int = 0
    final_lr_fraction: float = 0.0
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 256
    batch_order: Literal["shuffle", "cycle"] = "shuffle"

    def __post_init__(self) -> None:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("TrainRecipe needs exactly one of epochs and steps")
        if self.schedule == "step" and self.drop_after_pass is None:
            raise ValueError("schedule 'step' needs drop_after_pass")
        if self.schedule == "step" and self.steps is not None:
            raise ValueError("schedule 'step' counts passes: give epochs, not steps")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def total_steps(self, count: int) -> int:
        """Optimiser steps this recipe takes on ``count`` images."""
        if self.steps is not None:
            return self.steps
        return self.epochs * math.ceil(count / self.batch_size)

    def lr_at(self, step: int, total: int) -> float:
        """The learning rate of optimiser step ``step`` (0-based) for the cosine schedule."""
        if self.schedule != "cosine":
            return self.lr
        if step < self.warmup_steps:
            return self.lr * step / self.warmup_steps
        decay_steps = max(total - self.warmup_steps, 1)
        progress = min(step - self.warmup_steps, decay_steps) / decay_steps
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr * ((1.0 - self.final_lr_fraction) * cosine + self.final_lr_fraction)


def make_optimizer(parameters: list[nn.Parameter], recipe: TrainRecipe, lr: float) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        # FRePo's evaluation passes a weight decay to optax.adam, which has none: Adam here has none either.
        return torch.optim.Adam(parameters, lr=lr)
    return torch.optim.SGD(parameters, lr=lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def batches(count: int, recipe: TrainRecipe, generator: torch.Generator, device: torch.device) -> Iterator[tuple[int, Tensor]]:
    """(pass index, indices) of every mini-batch, in training order."""
    if recipe.batch_order == "cycle":
        total = recipe.total_steps(count)
        position = 0
        for _ in range(total):
            indices = (torch.arange(recipe.batch_size) + position) % count if count > recipe.batch_size \
                else torch.arange(count)
            yield position // count, indices.to(device)
            position += min(recipe.batch_size, count)
        return
    passes = recipe.epochs if recipe.epochs is not None else math.inf
    taken, limit = 0, recipe.steps
    pass_index = 0
    while pass_index < passes:
        # Drawn on the generator's device (the CPU generator matches the papers' DataLoader).
        order = torch.randperm(count, generator=generator, device=generator.device).to(device)
        for start in range(0, count, recipe.batch_size):
            if limit is not None and taken >= limit:
                return
            yield pass_index, order[start : start + recipe.batch_size]
            taken += 1
        pass_index += 1


def autocast_context(precision: str, device: torch.device):
    """bfloat16 autocast for ``precision="bf16"`` (weights and optimiser state stay float32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_network(
    net: nn.Module,
    images: Tensor,
    targets: Tensor,
    recipe: TrainRecipe,
    *,
    loss_fn: LossFn,
    generator: torch.Generator,
    augment: Augment | None = None,
    forward: Forward | None = None,
    parameters: list[nn.Parameter] | None = None,
    on_pass_end: Callable[[int], None] | None = None,
    precision: Literal["fp32", "bf16"] = "fp32",
) -> nn.Module:
    """Train ``net`` in place on ``(images, targets)`` by ``recipe``; returns ``net``.

    ``augment(x, generator)`` transforms each mini-batch (per-image draws); ``forward(x)``
    replaces ``net(x)`` (DC's compiled pass); ``parameters`` are the trained parameters
    (default all of ``net``'s); ``on_pass_end(p)`` is called after pass ``p`` (MTT snapshots
    its experts there). ``precision="bf16"`` runs forward and loss under bfloat16 autocast
    (weights and optimiser stay float32).
    """
    net.train()
    forward = forward or net
    parameters = list(net.parameters()) if parameters is None else parameters
    count = images.shape[0]
    schedule = Schedule(parameters, recipe, count)
    autocast = autocast_context(precision, images.device)
    current_pass = 0
    for step, (pass_index, batch) in enumerate(batches(count, recipe, generator, images.device)):
        if pass_index != current_pass:
            _end_of_pass(current_pass, recipe, on_pass_end)
            schedule.pass_ended(current_pass)
            current_pass = pass_index
        optimizer = schedule.optimizer_for(step)
        x = images[batch]
        if augment is not None:
            x = augment(x, generator)
        with autocast:
            loss = loss_fn(forward(x), targets[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.float().backward()
        optimizer.step()
    if schedule.total > 0:
        _end_of_pass(current_pass, recipe, on_pass_end)
    return net


class Schedule:
    """The recipe's learning rate over one training run, shared by the sequential and the
    batched loop: the step schedule multiplies the lr by ``drop_factor`` after pass
    ``drop_after_pass`` and re-creates the optimiser (momentum reset, as the official loop);
    the cosine schedule sets the lr before every step."""

    def __init__(self, parameters: list[Tensor], recipe: TrainRecipe, count: int) -> None:
        self.parameters, self.recipe, self.lr = parameters, recipe, recipe.lr
        self.total = recipe.total_steps(count)
        self.optimizer = make_optimizer(parameters, recipe, self.lr)

    def pass_ended(self, finished_pass: int) -> None:
        if self.recipe.schedule == "step" and finished_pass == self.recipe.drop_after_pass:
            self.lr *= self.recipe.drop_factor
            self.optimizer = make_optimizer(self.parameters, self.recipe, self.lr)

    def optimizer_for(self, step: int) -> torch.optim.Optimizer:
        if self.recipe.schedule == "cosine":
            for group in self.optimizer.param_groups:
                group["lr"] = self.recipe.lr_at(step, self.total)
        return self.optimizer


def _end_of_pass(pass_index: int, recipe: TrainRecipe, on_pass_end: Callable[[int], None] | None) -> None:
    if on_pass_end is not None and recipe.batch_order == "shuffle":
        on_pass_end(pass_index)
