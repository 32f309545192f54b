"""MTT: dataset distillation by matching training trajectories (Cazenavette et al., CVPR 2022; PROTOCOL §6).

**Experts** (the method's artifact, built once per spec and shared by every cell): ``num_experts``
networks trained from scratch on the real training set with SGD (``lr_teacher``, momentum 0,
weight decay 0, constant lr), batch 256, per-image DSA augmentation on every batch (MTT's
``buffer.py``), through ``dd_bench.eval.training.train_network``. The parameters are snapshotted
at initialisation and after every epoch, so an expert is a ``(train_epochs + 1, P)`` fp32 matrix
of flat parameter vectors, one file per expert (``expert_0000.pt``, ...), written atomically as
soon as the expert finishes. While an expert trains, a checkpoint (``expert_0000.partial.pt``:
the snapshots so far and the network state) is rewritten after every epoch, so an interrupted build resumes mid-expert and the result is bit-identical to an
uninterrupted one. Each expert's randomness comes from ``derive_seed`` of the spec (all of it
but ``num_experts``) and the expert's index (its initialisation), and of that seed and the epoch
(each epoch's batch order and DSA draws): experts do not depend on the cell, on the harness's
seed or on which of them were built first, and a buffer of 5 experts of 10 epochs is the first 5
experts, first 11 snapshots, of a buffer of 100 experts of 50 epochs with the same settings. Bit-identical on the CPU; on
a GPU only as deterministic as cuDNN's kernels.

Measured size of one expert file (``torch.save`` of the fp32 matrix): **65.3 MB** for a CIFAR-10
ConvNet-3 (320,010 parameters x 51 snapshots), **64.8 MB** for MNIST/Fashion-MNIST (317,706 x 51),
**14.0 MB** for Fashion-MNIST with 10 epochs (317,706 x 11). Experts are opened with
``torch.load(mmap=True)``: a step reads two rows of one expert, never the whole buffer.

**One step** (one trajectory-matching iteration of ``distill.py``):

1. take the next expert of a shuffled cycle through the buffer and a start epoch
   ``t ~ U{0, ..., max_start_epoch - 1}``; θ₀ = θ*_t, target θ*_{t+M} with M = ``expert_epochs``;
2. unroll N = ``syn_steps`` SGD steps θ_{i+1} = θ_i − α ∇ℓ(θ_i; x_i) on mini-batches of ``batch_syn``
   synthetic images (a fresh permutation whenever the previous one is used up, chunks taken from
   its end, as the official code pops them), each batch with its own per-image DSA draw (not
   Siamese; ``align_corners=True`` as MTT's DiffAugment), differentiating through every step: the
   network is evaluated at a flat parameter vector with ``torch.func.functional_call``, the role
   ReparamModule plays in the official code;
3. loss = ‖θ_N − θ*_{t+M}‖² / ‖θ₀ − θ*_{t+M}‖² (the official code divides both norms by the
   parameter count, which cancels); the images take one SGD step (``lr_img``, momentum 0.5) and
   the learnable step size α one SGD step (``lr_lr``, momentum 0.5); α starts at
   ``syn_lr_init`` and is never clamped (as official). α travels as ``SyntheticSet.learned_lr``;
   the ``mtt`` evaluation protocol trains with it.

**Memory** (``tesla: true``, TESLA, Cui et al., ICML 2023, justincui03/tesla ``distill.py``): the
unrolled graph of the default mode grows with N (every step's activations and its
create_graph gradient are kept). TESLA keeps only the N parameter vectors θ_i: a first pass
takes the N steps without a graph (with α's current value) and sums the gradients G = Σ g_i,
so θ_N = θ₀ − αG; a second pass recomputes each step's gradient g_i = ∇ℓ(θ_i; x_i) with a graph,
one step at a time, and back-propagates ``w · g_i`` to the images, with
w = 2(α(θ* − θ₀) + α²G) / ‖θ₀ − θ*‖² = −2α(θ_N − θ*) / ‖θ₀ − θ*‖². **What TESLA drops:** θ_i is
treated as a constant in step i's recomputation, i.e. ∂θ_j/∂x_i = 0 for every j > i: the terms
through later iterates (products of the later steps' Hessians ∂²ℓ/∂θ² with the image
Jacobians, −α Σ_{j>i} (∂g_j/∂θ_j)(∂θ_j/∂x_i)) are missing from the image gradient, and the step
size gradient is −2(θ_N − θ*)·G / ‖θ₀ − θ*‖², without the dependence of g_i on α through θ_i. Both
are exact when N = 1 (tested), otherwise an approximation (the measured difference is in the
tests). The same DSA draws and batches are replayed in both passes.
``tesla_exact: true`` keeps TESLA's memory (the N vectors θ_i and one step's graph at a time)
but carries the dropped terms: the second pass runs backwards from step N−1 to 0 with the
adjoint λ_{i} = λ_{i+1} − α H_i λ_{i+1} (λ_N = ∂L/∂θ_N), adding −α λ_{i+1}·∂g_i/∂x_i to the images and
−λ_{i+1}·g_i to α. That is the unrolled gradient itself (equal to the default mode up to float
rounding, tested) at the cost of TESLA's second pass.

Measured at the ``cifar10_ipc1`` settings (N 50, 10 images of 3x32x32, ConvNet-3; random tensors
and a random-walk expert; 2 threads of the 2-core dev machine, one-at-a-time;
``tests/benchmarks/test_speed_mtt.py``), per step: unrolled 3.72 s, 3.0 GB held by autograd
(process RSS peak 2.96 GB); ``tesla`` 5.08 s, 60 MB (RSS 0.99 GB, of which ~0.9 GB is the
process itself); ``tesla_exact`` 5.17 s, 60 MB. The unrolled graph grows linearly with N and
with the batch: Fashion-MNIST IPC 10 with N 20 would hold ~12 GB, TESLA ~0.6 GB. Against the
official ``distill.py`` iteration, side by side in one process (temporary copy, never
committed), median of 5 alternating rounds: 3.64 s here, 3.80 s official (1.04x; 1.08x with
glibc's default allocator).

**Presets** (``preset: cifar10_ipc1`` etc., the §6 table; see :data:`PRESETS`) fill every
distillation field left unset; a field set in the suite wins. A preset names its dataset, IPC
and ZCA setting, and ``init`` refuses data that differ (ConfigError). Rows with ZCA need the
suite's data settings ``{zca: true, zca_mode: kornia}`` (Kornia's ZCAWhitening, eps 0.1, on
[0, 1] pixels, as MTT's ``get_dataset``); rows without need ZCA off. The CIFAR-10 IPC 10 row has two
sources that disagree (PROTOCOL §6): we take DC-Bench's (lr_img 100, lr_lr 1e-5, α₀ 1e-3, which
the DRUPI/DATM scripts also use), because the other set (lr_img 1e5, lr_lr 1e-4, α₀ 1e-2) is
the official README's table, whose CIFAR-10 IPC 10 row the MTT author confirmed to be a typo
(mtt-distillation issue #31: with it α diverges; lr_img 100-1000 is stable). MTT has no MNIST or
Fashion-MNIST results; the ``mnist_*``/``fashion_mnist_*`` presets are ours (no ZCA, as the DC
family treats grey digits), chosen as the CIFAR-10 rows' N, M, T⁺ with the non-ZCA pixel lr.
Without a preset the official CLI defaults apply (N 20, M 3, T⁺ 25, lr_img 1000, lr_lr 1e-5,
α₀ = lr_teacher 0.01).

Departures from the official code:

- **Never select on the test set.** ``distill.py`` evaluates every 100 iterations and keeps
  the images with the best test accuracy; we keep the final images (the harness evaluates them).
- **Randomness**: every draw (initial images, expert order, start epochs, batches, DSA) comes
  from one generator seeded from the harness-seeded global RNG in ``init``; experts from their
  spec. The official code reseeds nothing and uses the global RNG.
- **Expert order**: a shuffled cycle through the whole buffer (each expert once per cycle, a new
  shuffle per cycle). The official default walks files of 10 experts in shuffled order, each
  file shuffled: the same "each expert once per cycle" distribution, without the file grouping
  (a memory device we replace by memory-mapped files).
- **One network object** is built once in ``init`` (only its structure is used; the parameters
  are the flat vector); the official code builds a fresh random one every iteration and
  overwrites its parameters, which changes nothing but BatchNorm's unused running statistics.
- **Normalisation constants**: CIFAR-100 without ZCA is normalised with CIFAR-100's own mean and
  std (PROTOCOL §2.2); MTT's code uses CIFAR-10's there (a quirk; with ZCA nothing is normalised).
- **DSA strategy**: the dataset's (PROTOCOL §4: no flip for MNIST and SVHN) unless set; MTT's
  scripts pass ``color_crop_cutout_flip_scale_rotate`` for every dataset (the same string for
  CIFAR and Fashion-MNIST). Experts and distillation use the same strategy.
- The official ``--lr_teacher`` is both the experts' lr (``buffer.py``) and α's initial value
  (``distill.py``, two separate runs); here they are two fields, ``lr_teacher`` (experts) and
  ``syn_lr_init`` (α₀, default ``lr_teacher``), so the CIFAR-10 IPC 10/50 rows (α₀ 1e-3 on experts
  trained at 1e-2, as the authors did) are expressible with one buffer.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm import tqdm

from dd_bench.checkpoint import load_checkpoint, save_atomic
from dd_bench.data.dsa import DSA, AugmentDraw, DSAParams
from dd_bench.errors import ConfigError
from dd_bench.eval.training import TrainRecipe, train_network
from dd_bench.method import Method, RunContext, SyntheticSet, register_method, start_cell
from dd_bench.nets import create_model, standard_layout
from dd_bench.seeding import derive_seed, make_generator

log = logging.getLogger(__name__)

#: Bumped when the experts' content would change for the same spec (part of the artifact key).
EXPERT_FORMAT = 1
MANIFEST = "experts.json"


# -- presets (PROTOCOL §6) -------------------------------------------------------------------
@dataclass(frozen=True)
class MTTPreset:
    """One row of the §6 table: the distillation settings for one dataset and IPC."""

    dataset: str
    ipc: int
    zca: bool  # Kornia-style ZCA on [0, 1] pixels (suite data: {zca: true, zca_mode: kornia})
    syn_steps: int
    expert_epochs: int
    max_start_epoch: int
    lr_img: float
    lr_lr: float
    syn_lr_init: float
    batch_syn: int | None = None  # None: the whole synthetic set
    model: str = "ConvNet"
    source: str = "PROTOCOL §6 (DC-Bench's TM table, values from the MTT authors)"


_OURS = "ours: MTT reports no MNIST/Fashion-MNIST; CIFAR-10's N, M, T+ without ZCA"
PRESETS: dict[str, MTTPreset] = {
    "cifar10_ipc1": MTTPreset("cifar10", 1, True, 50, 2, 2, 100.0, 1e-7, 0.01),
    # Conflict in §6 resolved for DC-Bench's row: the README's (lr_img 1e5, lr_lr 1e-4, α₀ 1e-2)
    # is a typo by the author's own word (mtt-distillation issue #31).
    "cifar10_ipc10": MTTPreset("cifar10", 10, True, 30, 2, 20, 100.0, 1e-5, 0.001,
                               source="PROTOCOL §6, DC-Bench's row (the README row is a confirmed typo)"),
    "cifar10_ipc50": MTTPreset("cifar10", 50, False, 30, 2, 40, 1000.0, 1e-5, 0.001),
    "cifar100_ipc1": MTTPreset("cifar100", 1, True, 20, 3, 20, 1000.0, 1e-5, 0.01),
    "cifar100_ipc10": MTTPreset("cifar100", 10, False, 20, 2, 20, 1000.0, 1e-5, 0.01),
    "cifar100_ipc50": MTTPreset("cifar100", 50, True, 80, 2, 40, 1000.0, 1e-5, 0.01, batch_syn=125),
    "tiny_imagenet_ipc1": MTTPreset("tiny_imagenet", 1, False, 10, 2, 10, 10000.0, 1e-4, 0.01, model="ConvNetD4"),
    "tiny_imagenet_ipc10": MTTPreset("tiny_imagenet", 10, False, 20, 2, 40, 10000.0, 1e-4, 0.01, batch_syn=200,
                                     model="ConvNetD4"),
    "tiny_imagenet_ipc50": MTTPreset("tiny_imagenet", 50, False, 20, 2, 40, 10000.0, 1e-4, 0.01, batch_syn=300,
                                     model="ConvNetD4"),
    "mnist_ipc1": MTTPreset("mnist", 1, False, 50, 2, 2, 100.0, 1e-7, 0.01, source=_OURS),
    "mnist_ipc10": MTTPreset("mnist", 10, False, 30, 2, 20, 100.0, 1e-5, 0.01, source=_OURS),
    "mnist_ipc50": MTTPreset("mnist", 50, False, 30, 2, 40, 1000.0, 1e-5, 0.01, source=_OURS),
    "fashion_mnist_ipc1": MTTPreset("fashion_mnist", 1, False, 50, 2, 2, 100.0, 1e-7, 0.01, source=_OURS),
    "fashion_mnist_ipc10": MTTPreset("fashion_mnist", 10, False, 30, 2, 20, 100.0, 1e-5, 0.01, source=_OURS),
    "fashion_mnist_ipc50": MTTPreset("fashion_mnist", 50, False, 30, 2, 40, 1000.0, 1e-5, 0.01, source=_OURS),
}

#: The official ``distill.py`` CLI defaults, used for fields neither the suite nor a preset sets.
CLI_DEFAULTS: dict[str, Any] = {"model": "ConvNet", "syn_steps": 20, "expert_epochs": 3, "max_start_epoch": 25,
                                "lr_img": 1000.0, "lr_lr": 1e-5}
_PRESET_FIELDS = ("model", "syn_steps", "expert_epochs", "max_start_epoch", "lr_img", "lr_lr", "syn_lr_init",
                  "batch_syn")


@dataclass
class MTTConfig:
    """MTT hyperparameters. Fields left None come from ``preset`` (a §6 row), else from the
    official CLI defaults (:data:`CLI_DEFAULTS`); the resolved values are what a result records."""

    preset: str | None = None
    """A row of :data:`PRESETS` ("cifar10_ipc1", ..., "fashion_mnist_ipc10"); it fills the
    distillation fields below that are left unset and must match the cell's dataset, IPC and ZCA."""

    model: str | None = None
    """Expert and student network (any registered model); ConvNet, or the preset's (ConvNetD4 for
    Tiny ImageNet)."""

    # -- experts (the artifact) --
    num_experts: int = 100
    """Expert trajectories in the buffer (``buffer.py --num_experts``)."""

    train_epochs: int = 50
    """Epochs each expert trains; snapshots at init and after every epoch (train_epochs + 1)."""

    lr_teacher: float = 0.01
    """Experts' SGD learning rate (momentum 0, weight decay 0, constant)."""

    expert_batch: int = 256
    """Experts' mini-batch size (``--batch_train``)."""

    expert_dsa: bool = True
    """Per-image DSA augmentation while the experts train (``buffer.py``'s default)."""

    expert_seed: int = 0
    """Part of the experts' spec: another value gives another, equally valid buffer."""

    # -- distillation --
    syn_steps: int | None = None
    """N: differentiable SGD steps unrolled on synthetic batches per iteration."""

    expert_epochs: int | None = None
    """M: the target is the expert M epochs after the start."""

    max_start_epoch: int | None = None
    """T⁺: start epochs are drawn uniformly from 0 .. T⁺ − 1 (needs T⁺ − 1 + M <= train_epochs)."""

    lr_img: float | None = None
    """SGD learning rate of the synthetic images."""

    lr_lr: float | None = None
    """SGD learning rate of the learnable step size α."""

    syn_lr_init: float | None = None
    """α's initial value; the preset's, else ``lr_teacher`` (the official code uses --lr_teacher)."""

    batch_syn: int | None = None
    """Synthetic mini-batch of each unrolled step; None: the whole set (the official default)."""

    momentum_img: float = 0.5
    """SGD momentum of the images."""

    momentum_lr: float = 0.5
    """SGD momentum of α."""

    init: Literal["real", "noise"] = "real"
    """Initial images: random real images of each class (``pix_init real``) or N(0, 1) noise."""

    dsa: bool = True
    """Per-image DSA on every unrolled step's batch (``distill.py``'s default)."""

    dsa_strategy: str | None = None
    """DSA families joined by "_" for experts and unrolls; None: the dataset's (PROTOCOL §4)."""

    tesla: bool = False
    """TESLA's constant-memory gradient (recompute each step; drops the later-step terms)."""

    tesla_exact: bool = False
    """With ``tesla``: keep the terms TESLA drops (adjoint pass); the exact gradient, TESLA's memory."""

    def __post_init__(self) -> None:
        row = None
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ConfigError(f"preset: unknown value {self.preset!r}; known: {', '.join(PRESETS)}")
            row = PRESETS[self.preset]
        for name in _PRESET_FIELDS:
            if getattr(self, name) is None:
                if row is not None:
                    setattr(self, name, getattr(row, name))
                elif name in CLI_DEFAULTS:
                    setattr(self, name, CLI_DEFAULTS[name])
        if self.syn_lr_init is None:
            self.syn_lr_init = self.lr_teacher
        self._validate()

    def _validate(self) -> None:
        for name in ("num_experts", "train_epochs", "expert_batch", "syn_steps", "expert_epochs", "max_start_epoch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: invalid value {value!r} (expected an integer >= 1)")
        if self.batch_syn is not None and (isinstance(self.batch_syn, bool) or self.batch_syn < 1):
            raise ConfigError(f"batch_syn: invalid value {self.batch_syn!r} (expected >= 1 or null for all)")
        for name in ("lr_teacher", "lr_img", "lr_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: invalid value {getattr(self, name)!r} (expected > 0)")
        for name in ("momentum_img", "momentum_lr"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name}: invalid value {getattr(self, name)!r} (expected in [0, 1))")
        if self.init not in ("real", "noise"):
            raise ConfigError(f"init: invalid value {self.init!r} (expected 'real' or 'noise')")
        if self.max_start_epoch - 1 + self.expert_epochs > self.train_epochs:
            raise ConfigError(f"max_start_epoch: invalid value {self.max_start_epoch!r} (the last start epoch "
                              f"{self.max_start_epoch - 1} + expert_epochs {self.expert_epochs} exceeds "
                              f"train_epochs {self.train_epochs})")
        if self.tesla_exact and not self.tesla:
            raise ConfigError("tesla_exact: invalid value True without tesla: true")


# -- a network at a flat parameter vector (the ReparamModule role) ---------------------------
class FlatNet:
    """Evaluate ``net`` at parameters given as one flat vector, through ``functional_call``."""

    def __init__(self, net: nn.Module):
        self.net = net
        named = list(net.named_parameters())
        self.names = [name for name, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.count = sum(self.numels)

    def flatten(self) -> Tensor:
        """The module's own parameters as one detached flat vector."""
        return torch.cat([p.detach().reshape(-1) for p in self.net.parameters()])

    def __call__(self, flat: Tensor, x: Tensor) -> Tensor:
        views = {name: chunk.view(shape) for name, chunk, shape in zip(self.names, flat.split(self.numels), self.shapes)}
        return functional_call(self.net, views, (x,))


# -- experts -----------------------------------------------------------------------------------
def expert_seed(spec: dict[str, Any], index: int) -> int:
    """The seed of expert ``index``: a function of the index and of the spec without ``num_experts``
    and ``train_epochs``, so a smaller buffer is a prefix of a larger one (fewer experts, and each
    expert the first epochs of a longer one)."""
    stable = {key: value for key, value in spec.items() if key not in ("num_experts", "train_epochs")}
    return derive_seed("mtt-expert", json.dumps(stable, sort_keys=True, default=str), index)


def expert_path(directory: Path, index: int, partial: bool = False) -> Path:
    return Path(directory) / f"expert_{index:04d}{'.partial' if partial else ''}.pt"


def train_expert(data: Any, cfg: MTTConfig, strategy: str, seed: int, directory: Path, index: int,
                 device: torch.device) -> Tensor:
    """Train expert ``index`` (resuming from its partial checkpoint), save it, return its trajectory.

    Epoch ``e`` draws its batch order and DSA parameters from a generator seeded from (``seed``,
    ``e``), so a resumed expert needs only its snapshots and network state to continue exactly.
    SGD without momentum keeps no optimiser state, so one ``train_network`` call per epoch is the
    same training as one call for all epochs.
    """
    with torch.random.fork_rng(devices=[]):  # the net's init draws from its own seed, not the caller's RNG
        torch.manual_seed(seed)
        net = create_model(cfg.model, data.channels, data.num_classes, tuple(data.image_size)).to(device)
    flat = FlatNet(net)
    snapshots = [flat.flatten().cpu()]
    partial = expert_path(directory, index, partial=True)
    saved = load_checkpoint(partial)
    if saved is not None:
        net.load_state_dict(saved["net"])
        snapshots = list(saved["snapshots"].unbind(0))
        log.info("mtt: expert %d resumes after epoch %d", index, len(snapshots) - 1)
    dsa = DSA(strategy, DSAParams(align_corners=True)) if cfg.expert_dsa else None
    augment = None if dsa is None or not dsa.tokens else (lambda x, g: dsa(x, generator=g, siamese=False))
    recipe = TrainRecipe(optimizer="sgd", lr=cfg.lr_teacher, momentum=0.0, weight_decay=0.0, schedule="constant",
                         epochs=1, batch_size=cfg.expert_batch, batch_order="shuffle")

    def snapshot(_pass_index: int) -> None:
        snapshots.append(flat.flatten().cpu())

    for epoch in range(len(snapshots) - 1, cfg.train_epochs):
        train_network(net, data.train_images, data.train_labels, recipe, loss_fn=F.cross_entropy,
                      generator=make_generator(derive_seed(seed, "epoch", epoch)), augment=augment,
                      on_pass_end=snapshot)
        if epoch + 1 < cfg.train_epochs:  # the finished expert is saved below instead
            save_atomic({"snapshots": torch.stack(snapshots), "net": net.state_dict()}, partial)
    trajectory = torch.stack(snapshots).float().contiguous()
    save_atomic({"trajectory": trajectory, "index": index, "seed": seed}, expert_path(directory, index))
    partial.unlink(missing_ok=True)
    return trajectory


# -- distillation state ------------------------------------------------------------------------
@dataclass
class MTTState:
    """What persists across steps."""

    images: Tensor  # (num_classes * ipc, C, H, W), class-sorted, requires grad
    labels: Tensor  # (num_classes * ipc,) hard labels
    syn_lr: Tensor  # scalar α, requires grad
    optimizer_img: torch.optim.Optimizer
    optimizer_lr: torch.optim.Optimizer
    generator: torch.Generator  # every draw of the distillation (CPU)
    net: FlatNet
    augment: DSA | None
    expert_order: list[int]
    batch_chunks: list[Tensor]  # what is left of the current permutation of the synthetic set
    ipc: int
    device: torch.device


@register_method("mtt", "trajectory_matching")
class MTT(Method):
    """Matching training trajectories (PROTOCOL §6); see the module docstring for the departures."""

    Config = MTTConfig
    paper_protocol = "mtt"

    def __init__(self, config: MTTConfig | None = None):
        super().__init__(config)
        self._experts: list[Tensor] | None = None

    # -- the artifact ----------------------------------------------------------------------
    def _strategy(self, data: Any) -> str:
        return self.config.dsa_strategy if self.config.dsa_strategy is not None else data.dsa_strategy

    def artifact_spec(self, data: Any) -> dict[str, Any]:
        cfg: MTTConfig = self.config
        return {"purpose": "mtt expert trajectories", "format": EXPERT_FORMAT, "dataset": data.fingerprint(),
                "model": cfg.model, "num_experts": cfg.num_experts, "train_epochs": cfg.train_epochs,
                "lr_teacher": cfg.lr_teacher, "batch": cfg.expert_batch,
                "dsa": self._strategy(data) if cfg.expert_dsa else "none", "dsa_align_corners": True,
                "seed": cfg.expert_seed}

    def build_artifacts(self, data: Any, directory: Path, ctx: RunContext) -> None:
        self.build_experts(data, Path(directory), torch.device(ctx.device), progress=ctx.progress)

    def build_experts(self, data: Any, directory: Path, device: torch.device, progress: bool = False,
                      stop_after: int | None = None) -> None:
        """Train every expert not yet saved in ``directory`` (resuming a partial one); ``stop_after``
        ends the build once that many experts exist (a deliberate interruption, for tests)."""
        cfg: MTTConfig = self.config
        spec = self.artifact_spec(data)
        if device.type != "cpu":
            data = data.to(device)
        indices = range(cfg.num_experts)
        if progress:
            indices = tqdm(indices, desc="mtt experts")
        seconds: dict[int, float] = {}
        for index in indices:
            if stop_after is not None and index >= stop_after:
                return
            if expert_path(directory, index).exists():
                continue
            started = time.perf_counter()
            train_expert(data, cfg, self._strategy(data), expert_seed(spec, index), directory, index, device)
            seconds[index] = time.perf_counter() - started
            log.info("mtt: expert %d/%d trained in %.1fs", index + 1, cfg.num_experts, seconds[index])
        sizes = [expert_path(directory, i).stat().st_size for i in range(cfg.num_experts)]
        manifest = {"num_experts": cfg.num_experts, "snapshots": cfg.train_epochs + 1,
                    "mb_per_expert": round(sum(sizes) / len(sizes) / 1e6, 2), "seconds_this_build": seconds}
        (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")

    def load_artifacts(self, directory: Path, ctx: RunContext) -> None:
        cfg: MTTConfig = self.config
        experts = []
        for index in range(cfg.num_experts):
            path = expert_path(Path(directory), index)
            if not path.exists():
                raise RuntimeError(f"mtt: expert {index} is missing from {directory} (an unfinished build?)")
            trajectory = torch.load(path, map_location="cpu", mmap=True, weights_only=True)["trajectory"]
            if trajectory.shape[0] != cfg.train_epochs + 1:
                raise RuntimeError(f"mtt: {path} holds {trajectory.shape[0]} snapshots, expected {cfg.train_epochs + 1}")
            experts.append(trajectory)
        self._experts = experts

    # -- distillation ----------------------------------------------------------------------
    def init(self, data: Any, ipc: int, ctx: RunContext) -> MTTState:
        cfg: MTTConfig = self.config
        # Only the initialisation reads real images: the train set stays where it is.
        start = start_cell(data, ipc, ctx, move_data=False)
        if self._experts is None:
            raise RuntimeError("mtt: no experts loaded (build_artifacts/load_artifacts run before init)")
        self._check_preset(data, ipc)
        device = start.device
        generator = make_generator(start.seed)
        k = data.num_classes
        if cfg.init == "real":
            images = torch.cat([data.sample_real(c, ipc, generator=generator).cpu() for c in range(k)])
        else:
            images = torch.randn((k * ipc, data.channels, *data.image_size), generator=generator)
        images = images.float().to(device).requires_grad_(True)
        labels = torch.arange(k, device=device).repeat_interleave(ipc)
        syn_lr = torch.tensor(float(cfg.syn_lr_init), device=device, requires_grad=True)
        with torch.random.fork_rng(devices=[]):  # only the structure is used: leave the caller's RNG alone
            net = create_model(cfg.model, data.channels, k, tuple(data.image_size)).to(device)
        net.train()
        flat = FlatNet(net)
        if flat.count != self._experts[0].shape[1]:
            raise ConfigError(f"model: {cfg.model!r} has {flat.count} parameters but the experts have "
                              f"{self._experts[0].shape[1]}")
        strategy = self._strategy(data)
        augment = DSA(strategy, DSAParams(align_corners=True)) if cfg.dsa else None
        if augment is not None and not augment.tokens:
            augment = None
        return MTTState(images, labels, syn_lr,
                        torch.optim.SGD([images], lr=cfg.lr_img, momentum=cfg.momentum_img),
                        torch.optim.SGD([syn_lr], lr=cfg.lr_lr, momentum=cfg.momentum_lr),
                        generator, flat, augment, [], [], ipc, device)

    def _check_preset(self, data: Any, ipc: int) -> None:
        cfg: MTTConfig = self.config
        if cfg.preset is None:
            return
        row = PRESETS[cfg.preset]
        if data.name != row.dataset or ipc != row.ipc:
            raise ConfigError(f"preset: {cfg.preset!r} is for {row.dataset} at IPC {row.ipc}, not {data.name} at "
                              f"IPC {ipc}")
        kornia = data.zca is not None and data.zca.mode == "kornia" and abs(data.zca.reg - 0.1) < 1e-12
        if row.zca and not kornia:
            raise ConfigError(f"preset: {cfg.preset!r} needs MTT's ZCA: set the suite's data to "
                              "{zca: true, zca_mode: kornia, zca_reg: 0.1}")
        if not row.zca and data.zca is not None:
            raise ConfigError(f"preset: {cfg.preset!r} runs without ZCA: set the suite's data to {{zca: false}}")

    def step(self, state: MTTState, ctx: RunContext) -> dict[str, float]:
        cfg: MTTConfig = self.config
        expert = self._next_expert(state)
        start_epoch = int(torch.randint(0, cfg.max_start_epoch, (1,), generator=state.generator).item())
        trajectory = self._experts[expert]
        # Copies: the buffer is memory-mapped and shared by every step.
        start = trajectory[start_epoch].to(state.device, torch.float32, copy=True)
        target = trajectory[start_epoch + cfg.expert_epochs].to(state.device, torch.float32, copy=True)
        if cfg.tesla:
            loss = self._tesla_step(state, start, target, exact=cfg.tesla_exact)
        else:
            loss = self._unrolled_step(state, start, target)
        state.optimizer_img.step()
        state.optimizer_lr.step()
        return {"loss": loss, "syn_lr": float(state.syn_lr.detach()), "start_epoch": float(start_epoch),
                "expert": float(expert)}

    def result(self, state: MTTState) -> SyntheticSet:
        return SyntheticSet(state.images.detach().clone(), state.labels.clone(),
                            learned_lr=float(state.syn_lr.detach()))

    # -- the draws ---------------------------------------------------------------------------
    def _next_expert(self, state: MTTState) -> int:
        if not state.expert_order:
            state.expert_order = torch.randperm(len(self._experts), generator=state.generator).tolist()
        return state.expert_order.pop()

    def _next_batch(self, state: MTTState) -> Tensor:
        if not state.batch_chunks:
            count = state.images.shape[0]
            order = torch.randperm(count, generator=state.generator)
            state.batch_chunks = list(torch.split(order, self.config.batch_syn or count))
        return state.batch_chunks.pop().to(state.device)

    def _draw(self, state: MTTState, size: int) -> AugmentDraw | None:
        if state.augment is None:
            return None
        image_size = tuple(state.images.shape[-2:])
        return state.augment.draw(size, image_size, state.generator, siamese=False)

    def _inputs(self, state: MTTState, images: Tensor, batch: Tensor, draw: AugmentDraw | None) -> Tensor:
        x = images[batch]
        if draw is not None:
            x = state.augment.apply(x, draw)
        return standard_layout(x)

    # -- the gradient, three ways --------------------------------------------------------------
    def _unrolled_step(self, state: MTTState, start: Tensor, target: Tensor) -> float:
        """The official computation: one graph through all N steps, one backward."""
        cfg: MTTConfig = self.config
        theta = start.clone().requires_grad_(True)
        params = theta
        for _ in range(cfg.syn_steps):
            batch = self._next_batch(state)
            x = self._inputs(state, state.images, batch, self._draw(state, batch.numel()))
            ce = F.cross_entropy(state.net(params, x), state.labels[batch])
            grad = torch.autograd.grad(ce, params, create_graph=True)[0]
            params = params - state.syn_lr * grad
        loss = ((params - target) ** 2).sum() / ((start - target) ** 2).sum()
        image_grad, lr_grad = torch.autograd.grad(loss, [state.images, state.syn_lr])
        state.images.grad, state.syn_lr.grad = image_grad, lr_grad
        return float(loss.detach())

    def _tesla_step(self, state: MTTState, start: Tensor, target: Tensor, exact: bool) -> float:
        """TESLA: N graph-free steps keeping θ_i, then one recomputed step at a time (module docstring)."""
        cfg: MTTConfig = self.config
        alpha = float(state.syn_lr.detach())
        images = state.images.detach()
        thetas, batches, draws = [], [], []
        theta, grad_sum = start, torch.zeros_like(start)
        for _ in range(cfg.syn_steps):
            batch = self._next_batch(state)
            draw = self._draw(state, batch.numel())
            thetas.append(theta)
            batches.append(batch)
            draws.append(draw)
            params = theta.detach().requires_grad_(True)
            ce = F.cross_entropy(state.net(params, self._inputs(state, images, batch, draw)), state.labels[batch])
            grad = torch.autograd.grad(ce, params)[0]
            grad_sum += grad
            theta = theta - alpha * grad
        distance = ((start - target) ** 2).sum()
        residual = theta - target  # θ_N − θ*, with θ_N = θ₀ − α G
        loss = (residual ** 2).sum() / distance
        image_grad = torch.zeros_like(state.images)
        adjoint = 2.0 * residual / distance  # ∂L/∂θ_N
        if exact:
            lr_grad = torch.zeros((), device=start.device)
            for i in reversed(range(cfg.syn_steps)):
                params = thetas[i].detach().requires_grad_(True)
                x = self._inputs(state, state.images, batches[i], draws[i])
                ce = F.cross_entropy(state.net(params, x), state.labels[batches[i]])
                grad = torch.autograd.grad(ce, params, create_graph=True)[0]
                lr_grad -= (adjoint * grad.detach()).sum()
                # θ_{i+1} = θ_i − α g_i: back-propagate λ_{i+1} through g_i to the images and to θ_i.
                d_images, d_params = torch.autograd.grad(-alpha * (adjoint * grad).sum(), [state.images, params])
                image_grad += d_images
                adjoint = adjoint + d_params
        else:
            weight = -alpha * adjoint  # w = 2(α(θ* − θ₀) + α² G) / ‖θ₀ − θ*‖²
            for i in range(cfg.syn_steps):
                params = thetas[i].detach().requires_grad_(True)
                x = self._inputs(state, state.images, batches[i], draws[i])
                ce = F.cross_entropy(state.net(params, x), state.labels[batches[i]])
                grad = torch.autograd.grad(ce, params, create_graph=True)[0]
                image_grad += torch.autograd.grad((weight * grad).sum(), state.images)[0]
            lr_grad = -(adjoint * grad_sum).sum()  # G held constant
        state.images.grad = image_grad
        state.syn_lr.grad = lr_grad.reshape(state.syn_lr.shape)
        return float(loss)


__all__ = ["CLI_DEFAULTS", "MTT", "MTTConfig", "MTTPreset", "MTTState", "PRESETS", "FlatNet", "expert_seed",
           "train_expert"]
