"""MGDD's meta-training (PROTOCOL §8, the poster's first-order MAML), as a resumable build.

One meta step::

    ω' ← copy(ω)
    C ← random subset of `classes_per_task` source classes; T ← `task_per_class` images of each
    f_θ ← a random feature net for this task; W ← Eq. 3 on f_θ(T ∪ L)  (labels of any X_s ⊂ T)
          (L: `label_per_class` further images of each class, used by the label solve only)
    repeat inner_steps times:  ω' ← ω' − α ∇ω' L(T, ω')                   (meta-train)
    g ← ∇ω' L(T, ω');  ω ← Adam_β(ω, g)                                   (meta-test, first order)

    L(T, ω'): ipc ← one of `ipc_choices`; per class, X_s ← ipc images of T and a disjoint real
              batch of `real_per_class` images; Y_s* ← f_θ(X_s) W; θ* ← a fresh random net;
              Eq. 1 on (g_ω'(X_s), Y_s*) against the real batch's one-hot labels.

The support images X_s and the real batch are disjoint inside a task: a real image that is also
a support point would be predicted almost exactly by the kernel regression and teach nothing.
The label solve uses all of T, and L when ``label_per_class`` > 0. Why L: a task of 100 images
per class has fewer images (1,000) than the feature net has features (1,152 for 28×28), so the
ridge solve interpolates and the support's labels come out one-hot, whereas adaptation solves on
the whole target train set (60,000 ≫ 1,152) and gets soft labels; L makes the task's solve
overdetermined like adaptation's (CHOICE; 0 keeps the solve on T alone). The outer optimiser is
Adam (CHOICE; the poster only says "update ω at rate β"); the inner one is the adaptation's
optimiser at rate α, fresh per task, so meta-training rehearses exactly the adaptation it
prepares for.

Every draw comes from one CPU generator seeded from the build's seed; a checkpoint (every
``checkpoint_every`` steps, through ``dd_bench.checkpoint.save_atomic``) holds ω, the outer
Adam state, that generator's state and the step count, so an interrupted build resumes and ends
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from dd_bench.checkpoint import load_checkpoint, save_atomic
from dd_bench.method import RunContext
from dd_bench.seeding import make_generator
from dd_bench.methods.mgdd_parts import (embed_in_chunks, krr_loss, label_weights, make_generator_net, one_hot,
                                         random_feature_net)

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "meta_progress.pt"
ARTIFACT_FILE = "meta_generator.pt"

#: Test-only hook: called with the number of finished meta steps after each one (and after its
#: checkpoint, if one was due). Tests raise from it to interrupt a build midway.
after_meta_step: Callable[[int], None] | None = None


@dataclass(frozen=True)
class MetaSettings:
    """What meta-training does (MGDDConfig's ``meta_*`` fields and the shared ones)."""

    steps: int
    inner_steps: int
    inner_lr: float
    inner_optimizer: str
    outer_lr: float
    classes_per_task: int
    task_per_class: int
    label_per_class: int
    ipc_choices: tuple[int, ...]
    real_per_class: int
    feature_model: str
    label_reg: float
    loss_reg: float
    generator_width: int
    generator_levels: int
    generator_condition_dim: int
    checkpoint_every: int


def make_optimizer(parameters, name: str, lr: float) -> torch.optim.Optimizer:
    """The optimiser of ω' (adaptation and meta-training's inner loop)."""
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr)
    return torch.optim.SGD(parameters, lr=lr)


def _seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


class _Task:
    """One meta-training task: images of a random class subset, with Eq. 3's weights."""

    def __init__(self, source_images: Tensor, source_labels: Tensor, num_classes: int, settings: MetaSettings,
                 generator: torch.Generator, device: torch.device):
        k = min(settings.classes_per_task, num_classes)
        classes = torch.randperm(num_classes, generator=generator)[:k]
        per_class, label_only = [], []
        for c in classes.tolist():
            indices = torch.nonzero(source_labels == c, as_tuple=True)[0]
            picks = torch.randperm(indices.numel(), generator=generator)
            per_class.append(source_images[indices[picks[: settings.task_per_class]]])
            label_only.append(source_images[indices[picks[settings.task_per_class :
                                                          settings.task_per_class + settings.label_per_class]]])
        self.images = [x.to(device) for x in per_class]  # one tensor per task class
        self.k, self.settings = k, settings
        shape = self.images[0].shape[1:]
        self.channels, self.image_size = shape[0], tuple(shape[1:])
        label_net = random_feature_net(settings.feature_model, self.channels, self.image_size, _seed(generator), device)
        self.features = [embed_in_chunks(label_net, x) for x in self.images]
        solve_features = self.features + [embed_in_chunks(label_net, x.to(device)) for x in label_only if x.numel()]
        solve_classes = list(range(k)) + [c for c, x in enumerate(label_only) if x.numel()]
        targets = torch.cat([one_hot(torch.full((f.shape[0],), c), k) for c, f in zip(solve_classes, solve_features)])
        self.weights = label_weights(torch.cat(solve_features), targets.to(device), settings.label_reg)

    def loss(self, generator_net: nn.Module, generator: torch.Generator) -> Tensor:
        """L(T, ω'): Eq. 1 for a fresh support set, real batch and θ* (see the module docstring)."""
        s = self.settings
        choice = int(torch.randint(len(s.ipc_choices), (1,), generator=generator).item())
        ipc = s.ipc_choices[choice]
        support, support_features, real, real_labels = [], [], [], []
        for c, images in enumerate(self.images):
            order = torch.randperm(images.shape[0], generator=generator).to(images.device)
            support.append(images[order[:ipc]])
            support_features.append(self.features[c][order[:ipc]])
            real.append(images[order[ipc : ipc + s.real_per_class]])
            real_labels.append(torch.full((real[-1].shape[0],), c))
        support_labels = torch.cat(support_features) @ self.weights
        targets = one_hot(torch.cat(real_labels), self.k).to(support_labels.device)
        net = random_feature_net(s.feature_model, self.channels, self.image_size, _seed(generator),
                                 support_labels.device)
        # A conditioned generator takes target-length labels: a task of fewer classes pads with zeros.
        condition = F.pad(support_labels, (0, max(s.generator_condition_dim - self.k, 0)))
        generated = generator_net(torch.cat(support), condition)
        return krr_loss(net, torch.cat(real), targets, generated, support_labels, s.loss_reg)


def meta_train(source_images: Tensor, source_labels: Tensor, num_classes: int, settings: MetaSettings,
               directory: Path, ctx: RunContext) -> dict:
    """Run (or resume) meta-training in ``directory``; returns the final artifact's contents.

    ``source_images`` are already in the target's space (``adapt_images``). The final
    generator goes to :data:`ARTIFACT_FILE`; :data:`CHECKPOINT_FILE` holds the progress.
    """
    device = torch.device(ctx.device)
    directory = Path(directory)
    source_labels = source_labels.cpu()
    channels = source_images.shape[1]
    checkpoint = load_checkpoint(directory / CHECKPOINT_FILE)
    if checkpoint is None:
        # One draw from the build's seed starts everything (the harness seeds ctx from the spec).
        stream = make_generator(ctx.seed)
        meta_net = make_generator_net(channels, settings.generator_width, settings.generator_levels, _seed(stream),
                                      settings.generator_condition_dim)
        meta_net.to(device)
        outer = torch.optim.Adam(meta_net.parameters(), lr=settings.outer_lr)
        done, losses = 0, []
    else:
        stream = torch.Generator()
        stream.set_state(checkpoint["rng"])
        meta_net = make_generator_net(channels, settings.generator_width, settings.generator_levels, 0,
                                      settings.generator_condition_dim).to(device)
        meta_net.load_state_dict(checkpoint["generator"])
        outer = torch.optim.Adam(meta_net.parameters(), lr=settings.outer_lr)
        outer.load_state_dict(checkpoint["optimizer"])
        done, losses = int(checkpoint["done"]), list(checkpoint["losses"])
        log.info("mgdd: resuming meta-training at step %d of %d", done, settings.steps)
    bar = tqdm(total=settings.steps, initial=done, desc="mgdd meta-training", unit="step", disable=not ctx.progress)
    while done < settings.steps:
        losses.append(_meta_step(meta_net, outer, source_images, source_labels, num_classes, settings, stream, device))
        done += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if done % settings.checkpoint_every == 0 and done < settings.steps:
            save_atomic({"done": done, "generator": meta_net.state_dict(), "optimizer": outer.state_dict(),
                         "rng": stream.get_state(), "losses": losses}, directory / CHECKPOINT_FILE)
        if after_meta_step is not None:
            after_meta_step(done)
    bar.close()
    artifact = {"generator": {k: v.cpu() for k, v in meta_net.state_dict().items()},
                "generator_shape": meta_net.describe(), "steps": done, "losses": losses}
    save_atomic(artifact, directory / ARTIFACT_FILE)
    (directory / CHECKPOINT_FILE).unlink(missing_ok=True)
    return artifact


def _meta_step(meta_net: nn.Module, outer: torch.optim.Optimizer, source_images: Tensor, source_labels: Tensor,
               num_classes: int, settings: MetaSettings, stream: torch.Generator, device: torch.device) -> float:
    task = _Task(source_images, source_labels, num_classes, settings, stream, device)
    fast = copy.deepcopy(meta_net)
    inner = make_optimizer(fast.parameters(), settings.inner_optimizer, settings.inner_lr)
    for _ in range(settings.inner_steps):
        loss = task.loss(fast, stream)
        inner.zero_grad(set_to_none=True)
        loss.backward()
        inner.step()
    loss = task.loss(fast, stream)
    # First-order MAML: the gradient at the adapted ω' is applied to ω.
    grads = torch.autograd.grad(loss, list(fast.parameters()))
    for parameter, grad in zip(meta_net.parameters(), grads):
        parameter.grad = grad.detach().clone()
    outer.step()
    outer.zero_grad(set_to_none=True)
    return float(loss.item())
