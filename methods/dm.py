"""DM: dataset condensation with distribution matching (Zhao & Bilen, WACV 2023; PROTOCOL §5).

One step is one DM iteration:

1. build a fresh, randomly initialised embedding net (``create_model`` from the global torch
   RNG, which the harness seeds), freeze every parameter, put it in train mode;
2. for every class ``c``: sample ``batch_real`` real images of ``c``, take the synthetic
   images of ``c``, and apply ONE Siamese DSA draw to both (PROTOCOL §4);
3. loss = Σ_c ‖mean(embed(real_c)) − mean(embed(syn_c))‖², real embeddings detached;
4. one SGD step (momentum 0.5, the optimiser lives across steps) on the synthetic images.

For nets with BatchNorm (``has_batchnorm`` or "BN" in the model name) the real images of all
classes go through the net in one forward pass, and the synthetic ones in another, before the
per-class means are taken, as the official code does: batch statistics then span all classes.

How this differs from the official ``main_DM.py`` (none changes the objective or its gradient):

- Randomness: the official ``get_network`` reseeds torch from the clock, and DSA seeds come from
  the clock too. Here nets come from the harness-seeded global RNG and real batches, DSA draws
  and the initial images from a generator seeded from it, so a seed reproduces a run exactly.
- Real embeddings are computed under ``torch.no_grad`` (the official code gets no graph only
  because the parameters have ``requires_grad=False``). For nets without batch statistics
  (every norm but BatchNorm computes per image) all classes' real images form one batch
  (on the GPU) or are cut into chunks of :data:`CPU_REAL_CHUNK` images (on the CPU, where
  small chunks stay in cache), and the synthetic images of all classes go through one forward
  pass instead of one per class. For per-image nets this is the same function of the same
  inputs; only floating-point rounding can differ.
- On the CPU, ``ConvNet.embed`` itself (dd_bench.nets) replaces two slow kernels by
  equivalent ones (first conv on im2col + GEMM, 2x2 average pooling as strided adds); every
  method and the evaluation protocol share that path.
  Batches are given row-major strides first (:func:`standard_layout`): after DSA's crop they
  would otherwise run the whole net channels-last, which is slower.
- The reported loss is the sum over classes (the official log divides it by the class count).
- ``dsa_strategy`` defaults to the dataset's strategy (PROTOCOL §4: no flip for MNIST and
  SVHN); ``main_DM.py``'s own default string includes flip for every dataset.
- ``lr_img`` defaults to 1; PROTOCOL §5 uses 10 for CIFAR-10 at IPC ≥ 100: set it in the suite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from dd_bench.data.dsa import DSA
from dd_bench.errors import ConfigError
from dd_bench.method import Method, RunContext, SyntheticSet, register_method, start_cell
from dd_bench.nets import create_model, has_batchnorm, standard_layout
from dd_bench.seeding import make_generator


#: Real images per forward pass on the CPU. Measured on a 2-core AMD EPYC (32 MB L3): 8-32 are
#: fastest; per-class batches of 256 make a DM step about 1.8x slower, as the 0.5 MB per image
#: first feature map falls out of cache.
CPU_REAL_CHUNK = 32


@dataclass
class DMConfig:
    """DM hyperparameters; defaults are the paper's (PROTOCOL §5, official ``main_DM.py``)."""

    model: str = "ConvNet"
    """Embedding network, any registered model name; a fresh random one every step."""

    lr_img: float = 1.0
    """SGD learning rate of the synthetic images. The paper uses 1, except 10 for CIFAR-10
    at IPC >= 100 (PROTOCOL §5): set that per suite; the default stays 1."""

    momentum_img: float = 0.5
    """SGD momentum of the synthetic images."""

    batch_real: int = 256
    """Real images sampled per class per step (with replacement only if a class is smaller)."""

    init: Literal["real", "noise"] = "real"
    """Initial synthetic images: random real images of each class, or N(0, 1) noise in the
    normalised space."""

    dsa: bool = True
    """Apply Differentiable Siamese Augmentation: one draw per class, shared by the real and
    the synthetic batch of that class."""

    dsa_strategy: str | None = None
    """DSA families joined by "_"; None uses the dataset's strategy (PROTOCOL §4)."""

    def __post_init__(self) -> None:
        if not self.lr_img > 0:
            raise ConfigError(f"lr_img: invalid value {self.lr_img!r} (expected > 0)")
        if not 0 <= self.momentum_img < 1:
            raise ConfigError(f"momentum_img: invalid value {self.momentum_img!r} (expected in [0, 1))")
        if self.batch_real < 1:
            raise ConfigError(f"batch_real: invalid value {self.batch_real!r} (expected >= 1)")
        if self.init not in ("real", "noise"):
            raise ConfigError(f"init: invalid value {self.init!r} (expected 'real' or 'noise')")


@dataclass
class DMState:
    """What persists across steps: the synthetic images, their optimiser and the random stream."""

    images: torch.Tensor  # (num_classes * ipc, C, H, W), class-sorted, requires grad
    labels: torch.Tensor  # (num_classes * ipc,) hard labels 0,..,0,1,..,1,...
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # real batches, DSA draws (CPU)
    data: Any  # the Dataset, on the compute device
    ipc: int
    augment: DSA | None
    device: torch.device


@register_method("dm", "distribution_matching")
class DM(Method):
    """Distribution matching (PROTOCOL §5); see the module docstring for the departures."""

    Config = DMConfig
    paper_protocol = "dm"

    def init(self, data, ipc: int, ctx: RunContext) -> DMState:
        cfg: DMConfig = self.config
        start = start_cell(data, ipc, ctx)  # real batches are drawn every step: the train set moves
        data, device = start.data, start.device
        generator = make_generator(start.seed)
        k, shape = data.num_classes, (data.channels, *data.image_size)
        if cfg.init == "real":
            images = torch.cat([data.sample_real(c, ipc, generator=generator).to(device) for c in range(k)])
        else:
            images = torch.randn((k * ipc, *shape), generator=generator).to(device)
        images = images.detach().clone().float().requires_grad_(True)
        labels = torch.arange(k).repeat_interleave(ipc)
        optimizer = torch.optim.SGD([images], lr=cfg.lr_img, momentum=cfg.momentum_img)
        strategy = cfg.dsa_strategy if cfg.dsa_strategy is not None else data.dsa_strategy
        augment = DSA(strategy) if cfg.dsa else None
        if augment is not None and not augment.tokens:
            augment = None  # "none": identity, as the official code turns DSA off
        return DMState(images, labels, optimizer, generator, data, ipc, augment, device)

    def step(self, state: DMState, ctx: RunContext) -> dict[str, float]:
        cfg: DMConfig = self.config
        data, k, ipc = state.data, state.data.num_classes, state.ipc
        net = create_model(cfg.model, data.channels, k, tuple(data.image_size)).to(state.device)
        net.requires_grad_(False)
        net.train()

        real_batches, syn_batches = [], []
        for c in range(k):
            real = data.sample_real(c, cfg.batch_real, generator=state.generator)
            syn = state.images[c * ipc : (c + 1) * ipc]
            if state.augment is not None:
                draw = state.augment.draw(1, tuple(data.image_size), state.generator, siamese=True)
                with torch.no_grad():
                    real = state.augment.apply(real, draw)
                syn = state.augment.apply(syn, draw)
            real_batches.append(real)
            syn_batches.append(syn)

        real, syn = standard_layout(torch.cat(real_batches)), standard_layout(torch.cat(syn_batches))
        loss = matching_loss(net, real, syn, k, cfg.model)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        return {"loss": float(loss.item())}

    def result(self, state: DMState) -> SyntheticSet:
        return SyntheticSet(state.images.detach().clone(), state.labels.clone())


# -- the objective -------------------------------------------------------------------------
def matching_loss(net: nn.Module, real: torch.Tensor, syn: torch.Tensor, num_classes: int,
                  model_name: str = "") -> torch.Tensor:
    """Σ_c ‖mean(embed(real_c)) − mean(embed(syn_c))‖² for class-sorted batches with equal
    counts per class; differentiable w.r.t. ``syn`` only (PROTOCOL §5)."""
    batch_stats = uses_batch_statistics(net, model_name)
    real_means = real_class_means(net, real, num_classes, whole_batch=batch_stats)
    syn_means = net.embed(syn).view(num_classes, syn.shape[0] // num_classes, -1).mean(dim=1)
    return ((real_means - syn_means) ** 2).sum()


# -- embeddings ------------------------------------------------------------------------------
def uses_batch_statistics(net: nn.Module, model_name: str = "") -> bool:
    """True if a train-mode forward mixes images of a batch (BatchNorm, or dropout's RNG), so the
    batch must be the official one; "BN" in the name is the official code's own test."""
    if "BN" in model_name or has_batchnorm(net):
        return True
    return any(isinstance(m, nn.modules.dropout._DropoutNd) for m in net.modules())


@torch.no_grad()
def real_class_means(net: nn.Module, images: torch.Tensor, num_classes: int, whole_batch: bool = False,
                     chunk: int | None = None) -> torch.Tensor:
    """Per-class mean embedding of class-sorted ``images`` (equal counts per class), no graph.

    ``whole_batch`` (BatchNorm nets) forwards all images at once, as the official BN branch
    does. Otherwise the images are forwarded ``chunk`` at a time (default: all at once on a
    GPU, :data:`CPU_REAL_CHUNK` on the CPU), which per-image nets do not notice.
    """
    count = images.shape[0]
    if whole_batch:
        chunk = count
    elif chunk is None:
        chunk = count if images.device.type != "cpu" else CPU_REAL_CHUNK
    if chunk >= count:
        features = net.embed(images)
    else:
        features = torch.cat([net.embed(images[i : i + chunk]) for i in range(0, count, chunk)])
    return features.view(num_classes, count // num_classes, -1).mean(dim=1)
