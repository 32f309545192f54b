"""Many networks trained at once: the evaluation's runs stacked with ``torch.func`` and ``vmap``.

The papers' protocol trains up to 100 small networks per set; one after another they leave a
GPU mostly idle. Here the runs of one set train together: their parameters are stacked
(``torch.func.stack_module_state``), one ``vmap``-ed functional forward and loss serve every
network, and one optimiser steps the stacked tensors -- SGD and Adam are elementwise, so that
is exactly one optimiser per network. Each network keeps what sequential training gives it:
its own initialisation, its own batch order and its own augmentation draws, taken from its
own generator in the same order as :func:`dd_bench.eval.training.train_network` takes them, so
from the same initial weights and the same generators both end with the same weights up to
floating-point rounding (``tests/eval/test_batched.py``).

Not batched (sequential instead, never silently different): networks with BatchNorm, whose
running statistics ``vmap`` cannot update in place. On the CPU sequential training is faster
for these small nets (measured 0.79-0.99x for 3-10 ConvNets), so ``auto`` batches on CUDA only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from dd_bench.eval.training import Augment, LossFn, Schedule, TrainRecipe, autocast_context, batches
from dd_bench.nets import has_batchnorm


def can_batch(nets: list[nn.Module]) -> bool:
    """True if the nets can train stacked: same architecture, no batch statistics."""
    if len(nets) < 2 or any(has_batchnorm(net) for net in nets):
        return False
    shapes = [tuple((name, tuple(p.shape)) for name, p in net.named_parameters()) for net in nets]
    return all(shape == shapes[0] for shape in shapes)


def train_networks_batched(nets: list[nn.Module], images: Tensor, targets: Tensor, recipe: TrainRecipe, *,
                           loss_fn: LossFn, generators: list[torch.Generator], augment: Augment | None = None,
                           precision: str = "fp32") -> list[nn.Module]:
    """Train every net of ``nets`` on ``(images, targets)`` at once; each net ``r`` draws its batches
    and augmentation from ``generators[r]``. The nets are updated in place and returned."""
    if not can_batch(nets):
        raise ValueError("these nets cannot be trained stacked (BatchNorm, or different architectures)")
    if len(generators) != len(nets):
        raise ValueError(f"{len(nets)} nets but {len(generators)} generators")
    for net in nets:
        net.train()
    params, buffers = stack_module_state(nets)
    template = copy.deepcopy(nets[0]).to("meta")

    def one_loss(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(functional_call(template, (p, b), (x,)), y)

    stacked_loss: Callable = vmap(one_loss)
    count = images.shape[0]
    schedule = Schedule(list(params.values()), recipe, count)
    streams = [batches(count, recipe, g, images.device) for g in generators]
    autocast = autocast_context(precision, images.device)
    current_pass = 0
    for step, per_net in enumerate(zip(*streams)):
        pass_index = per_net[0][0]
        if pass_index != current_pass:
            schedule.pass_ended(current_pass)
            current_pass = pass_index
        optimizer = schedule.optimizer_for(step)
        xs, ys = [], []
        for (_, batch), generator in zip(per_net, generators):
            x = images[batch]
            xs.append(augment(x, generator) if augment is not None else x)
            ys.append(targets[batch])
        with autocast:
            losses = stacked_loss(params, buffers, torch.stack(xs), torch.stack(ys))
        optimizer.zero_grad(set_to_none=True)
        losses.float().sum().backward()  # the nets are independent: d(sum)/d(net r) = d(loss r)/d(net r)
        optimizer.step()
    with torch.no_grad():
        for r, net in enumerate(nets):
            for name, parameter in net.named_parameters():
                parameter.copy_(params[name][r])
    return nets
