"""Gradient matching: DC (Zhao et al., ICLR 2021) and DSA (Zhao & Bilen, ICML 2021).

One ``step`` is one outer iteration of PROTOCOL §3: a fresh random network; for each of
``outer_loop`` rounds, the synthetic images of every class are moved (one SGD step, summed
over classes) so that the network's gradient on them matches its gradient on a real batch of
that class; between rounds the network trains ``inner_loop`` epochs on the synthetic set.
DSA is the same algorithm with one Siamese augmentation per class shared by the real and the
synthetic batch, and per-image DSA while the inner loop trains the network (PROTOCOL §4).

Departures from the official code (VICO-UoE/DatasetCondensation), none changing the algorithm:

- **IPCs outside the paper's table** (``get_loops``): the official code exits; we use the
  loops of the nearest tabulated IPC not above it (IPC 5 -> IPC 1's (1, 1), IPC 15 -> IPC 10's
  (10, 50), IPC 100 -> IPC 50's (50, 10)). Every IPC thus runs a setting the authors tuned, we
  never extrapolate, and above 50 it is what later DC-family code does (IPC 100/150/200 ->
  (50, 10)). ``outer_loop``/``inner_loop`` in the config override it.
- **Randomness**: all draws (initialisation, networks, real batches, DSA parameters, inner-loop
  shuffles) come from one generator seeded from the global torch RNG in ``init``, which the
  harness seeds. The official code reseeds from the clock. Owning the stream keeps a run
  reproducible even when the harness evaluates snapshots (evaluation reseeds the global RNG).
- **Only the tensors the distance uses are differentiated**: with ``dis_metric="ours"`` the
  1-D parameters (biases, norm scales and shifts) contribute 0, so their gradients are not
  computed at all; the loss and the image update are unchanged.
- **Each class's distance is back-propagated as soon as it is computed** (gradients add up in
  the images' ``.grad``) instead of summing the loss over classes first: the same gradient,
  one class's graph alive at a time; ``backward(inputs=images)`` skips the network's ``.grad``.
- **Speed** (``compile=True``): the first-order passes -- each class's real-batch gradient
  and the inner-loop training -- run through ``torch.compile`` of a functional forward, which
  fuses the norm/activation/pooling element-wise work around the convolutions (about 1.5x
  faster per real batch on CPU). Compilation happens in ``init`` (a warm-up on zeros), so its
  one-off cost is timed with initialisation, not with the first step. The synthetic pass needs
  double backward, which compiled graphs do not support, so it stays eager. Compiled and eager
  gradients agree to float rounding (~1e-4 relative on conv weights: ReLU masks flip on
  pre-activations within rounding of 0). If compilation fails, the method logs a warning and
  continues eagerly.
- The ``loss`` metric is the official ``loss_avg``: the matching distance averaged over outer
  rounds and classes.
"""

from __future__ import annotations

import bisect
import logging
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dd_bench.data.dsa import DSA as SiameseAugment
from dd_bench.errors import ConfigError
from dd_bench.eval.training import TrainRecipe, train_network
from dd_bench.method import Method, RunContext, SyntheticSet, register_method, start_cell
from dd_bench.nets import ConvNet, create_model, has_batchnorm, standard_layout
from dd_bench.seeding import make_generator

log = logging.getLogger(__name__)

#: PROTOCOL §3, the official ``get_loops``: IPC -> (outer_loop, inner_loop).
PAPER_LOOPS: dict[int, tuple[int, int]] = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
#: Real images per class that set BatchNorm's running statistics before matching (§1.1).
BN_PRIME_PER_CLASS = 16
DistanceMetric = Literal["ours", "mse", "cos"]


def get_loops(ipc: int) -> tuple[int, int]:
    """(outer_loop, inner_loop) for ``ipc``: the paper's table, else the nearest tabulated IPC
    not above ``ipc`` (see the module docstring for why)."""
    if ipc < 1:
        raise ConfigError(f"ipc must be at least 1, got {ipc}")
    tabulated = sorted(PAPER_LOOPS)
    return PAPER_LOOPS[tabulated[bisect.bisect_right(tabulated, ipc) - 1]]


# -- gradient distances (PROTOCOL §3) ----------------------------------------------------------
def distance_wb(gw_real: Tensor, gw_syn: Tensor) -> Tensor:
    """DC's layer-wise distance: sum over output rows of 1 - cos(real row, synthetic row).

    Conv weights (out, in, h, w) become (out, in*h*w), LayerNorm weights (C, h, w) become
    (C, h*w), Linear weights stay (out, in); 1-D tensors (biases, norm affines) give 0.
    """
    shape = gw_real.shape
    if gw_real.dim() <= 1:
        return gw_real.new_zeros(())
    rows = shape[0]
    gw_real, gw_syn = gw_real.reshape(rows, -1), gw_syn.reshape(rows, -1)
    dot = (gw_real * gw_syn).sum(dim=-1)
    norms = gw_real.norm(dim=-1) * gw_syn.norm(dim=-1)
    return (1.0 - dot / (norms + 1e-6)).sum()


def match_loss(gw_syn: Sequence[Tensor], gw_real: Sequence[Tensor], metric: DistanceMetric = "ours") -> Tensor:
    """Distance between two lists of parameter gradients (PROTOCOL §3).

    ``ours``: sum of :func:`distance_wb` over tensors. ``mse``: squared L2 distance of the
    concatenated gradients. ``cos``: 1 - cosine of the concatenated gradients (+1e-6 as well).
    """
    if len(gw_syn) != len(gw_real):
        raise ValueError(f"{len(gw_syn)} synthetic gradients but {len(gw_real)} real ones")
    if metric == "ours":
        return torch.stack([distance_wb(r, s) for r, s in zip(gw_real, gw_syn)]).sum()
    real = torch.cat([g.reshape(-1) for g in gw_real])
    syn = torch.cat([g.reshape(-1) for g in gw_syn])
    if metric == "mse":
        return ((syn - real) ** 2).sum()
    if metric == "cos":
        return 1.0 - (real * syn).sum() / (real.norm() * syn.norm() + 1e-6)
    raise ConfigError(f"unknown dis_metric {metric!r}; known: ours, mse, cos")


def matched_parameters(net: nn.Module, metric: DistanceMetric) -> list[nn.Parameter]:
    """The parameters whose gradients the distance reads: with 'ours', only those with 2+ dims."""
    return [p for p in net.parameters() if metric != "ours" or p.dim() > 1]


# -- configuration -----------------------------------------------------------------------------
@dataclass
class DCConfig:
    """DC hyperparameters; defaults are the paper's (PROTOCOL §3, official ``main.py``)."""

    model: str = "ConvNet"
    """Network that is matched (any registered model); a fresh random one every step."""
    lr_img: float = 0.1
    """SGD learning rate of the synthetic images."""
    momentum_img: float = 0.5
    """SGD momentum of the synthetic images (the optimiser persists across steps)."""
    lr_net: float = 0.01
    """SGD learning rate of the inner-loop network training (no momentum, no weight decay)."""
    batch_real: int = 256
    """Real images per class in each matching round."""
    batch_train: int = 256
    """Mini-batch size when the inner loop trains the network on the synthetic set."""
    init: Literal["noise", "real"] = "noise"
    """Synthetic initialisation: N(0, 1) in normalised space (DC's code default) or random real images."""
    dis_metric: DistanceMetric = "ours"
    """Gradient distance: 'ours' (layer-wise, per output row), 'mse' or 'cos'."""
    outer_loop: int | None = None
    """Matching rounds per step; None = ``get_loops(ipc)`` (paper table, nearest IPC below otherwise)."""
    inner_loop: int | None = None
    """Network-training epochs between rounds; None = ``get_loops(ipc)``."""
    compile: bool = True
    """Run the first-order passes through torch.compile (speed only; same algorithm)."""

    def __post_init__(self) -> None:
        for name in ("lr_img", "lr_net"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.momentum_img < 1:
            raise ConfigError(f"momentum_img must be in [0, 1), got {self.momentum_img!r}")
        for name in ("batch_real", "batch_train", "outer_loop"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value!r}")
        if self.inner_loop is not None and self.inner_loop < 0:
            raise ConfigError(f"inner_loop must be >= 0, got {self.inner_loop!r}")
        if self.init not in ("noise", "real"):
            raise ConfigError(f"init must be 'noise' or 'real', got {self.init!r}")
        if self.dis_metric not in ("ours", "mse", "cos"):
            raise ConfigError(f"dis_metric must be one of ours, mse, cos; got {self.dis_metric!r}")


@dataclass
class DSAConfig(DCConfig):
    """DSA hyperparameters: DC's, with real initialisation (the DSA readme's ``--init real``)."""

    init: Literal["noise", "real"] = "real"
    """Synthetic initialisation; DSA's readme commands use random real images."""
    dsa_strategy: str | None = None
    """DSA families, e.g. 'color_crop_cutout_flip_scale_rotate'; None = the dataset's (PROTOCOL §4)."""


# -- compiled first-order passes -----------------------------------------------------------------
def _functional_forward(template: nn.Module, tensors: dict[str, Tensor], x: Tensor) -> Tensor:
    return torch.func.functional_call(template, tensors, (x,))


class _LayersInOrder(nn.Module):
    """Runs ``net``'s layers as its architecture defines them, for tracing.

    For a ConvNet that is ``classifier(features(x).flatten(1))``, exactly its ``forward``
    minus any device-specific eager shortcut in it: a shortcut that flips backend flags
    (the CPU one in ``dd_bench.nets`` does) splits the compiled graph at every flip, and
    inductor picks its own kernels anyway. Other models run their own ``forward``.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.net, ConvNet):
            return self.net.classifier(self.net.features(x).flatten(1))
        return self.net(x)


class _FastForward:
    """``forward(net, x)`` == ``net(x)``, through a compiled functional call of a template.

    Every step draws a new network; compiling each would recompile every step. Instead one
    template of the architecture is compiled once, and each net's parameters and buffers are
    passed in as tensors, so the compiled graph is reused (guards: shapes, dtypes, modes).
    Each instance compiles its own copy of the function's code object, because dynamo keeps
    its cache (and its recompilation limit) per code object.
    """

    def __init__(self, template: nn.Module):
        self.template = _LayersInOrder(template)
        name = f"dc_forward_{id(self)}"
        code = _functional_forward.__code__.replace(co_name=name, co_qualname=name)
        function = types.FunctionType(code, _functional_forward.__globals__, name)
        self.compiled: Callable | None = torch.compile(function, dynamic=False)

    def __call__(self, net: nn.Module, x: Tensor, tensors: dict[str, Tensor]) -> Tensor:
        if self.compiled is not None:
            for mine, theirs in zip(self.template.net.modules(), net.modules()):
                mine.training = theirs.training  # BN train/eval enters the guards
            try:
                return self.compiled(self.template, {f"net.{k}": v for k, v in tensors.items()}, x)
            except Exception as error:  # a missing compiler or backend must not stop a run
                log.warning("torch.compile failed (%s: %s); DC/DSA continue without it", type(error).__name__, error)
                self.compiled = None
        return net(x)


_FAST: dict[tuple, _FastForward] = {}


def _fast_forward(model: str, data, device: torch.device) -> _FastForward:
    """One compiled forward per architecture, input shape and device, shared by every run."""
    key = (model.lower(), data.channels, data.num_classes, tuple(data.image_size), str(device))
    if key not in _FAST:
        with torch.random.fork_rng(devices=[]):  # the template's weights are never used
            template = create_model(model, data.channels, data.num_classes, tuple(data.image_size))
        _FAST[key] = _FastForward(template.to(device))
    return _FAST[key]


# -- the method ----------------------------------------------------------------------------------
@dataclass
class GradientMatchingState:
    """Distillation state: the learnable images, their optimiser and the run's random stream."""

    images: Tensor
    labels: Tensor
    optimizer: torch.optim.Optimizer
    ipc: int
    outer_loop: int
    inner_loop: int
    data: Any
    generator: torch.Generator
    augment: SiameseAugment | None = None
    fast: _FastForward | None = None
    steps: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


@register_method("dc", "gradient_matching")
class DC(Method):
    """Dataset Condensation with gradient matching (PROTOCOL §3); evaluated without augmentation."""

    Config = DCConfig
    paper_protocol = "dc"

    # -- setup -------------------------------------------------------------------------------
    def init(self, data, ipc: int, ctx: RunContext) -> GradientMatchingState:
        config = self.config
        start = start_cell(data, ipc, ctx)
        data, device = start.data, start.device
        outer, inner = get_loops(ipc)
        outer = config.outer_loop if config.outer_loop is not None else outer
        inner = config.inner_loop if config.inner_loop is not None else inner
        generator = make_generator(start.seed)  # one stream for the whole run
        shape = (data.num_classes * ipc, data.channels, *data.image_size)
        if config.init == "real":
            images = torch.cat([data.sample_real(c, ipc, generator=generator) for c in range(data.num_classes)])
        else:
            images = torch.randn(shape, generator=generator)
        images = images.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)
        labels = torch.arange(data.num_classes, device=device).repeat_interleave(ipc)
        optimizer = torch.optim.SGD([images], lr=config.lr_img, momentum=config.momentum_img)
        fast = _fast_forward(config.model, data, device) if config.compile else None
        state = GradientMatchingState(images, labels, optimizer, ipc, outer, inner, data, generator,
                                      self._augmenter(data), fast,
                                      meta={"outer_loop": outer, "inner_loop": inner, "init": config.init})
        if fast is not None:
            self._warm_up(state)
        return state

    def _warm_up(self, state: GradientMatchingState) -> None:
        """Compile now, so that the one-off cost is timed with ``init``, not the first step.

        Runs each compiled pass once, with the shapes and modes the steps will use, on a
        throwaway net and zero images; no draw touches the run's random stream.
        """
        data, config = state.data, self.config
        with torch.random.fork_rng(devices=[]):
            net = create_model(config.model, data.channels, data.num_classes, tuple(data.image_size))
        net = net.to(state.images.device).train()
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()  # matching sees frozen BN statistics
        zeros = state.images.new_zeros((config.batch_real, *state.images.shape[1:]))
        self._real_gradients(net, matched_parameters(net, config.dis_metric), state, zeros, 0)
        if state.outer_loop > 1 and state.inner_loop > 0:
            net.train()
            count, batch = state.images.shape[0], config.batch_train
            parameters = list(net.parameters())
            for size in {min(batch, count), count % batch} - {0}:
                x = state.images.new_zeros((size, *state.images.shape[1:]))
                F.cross_entropy(self._forward(net, parameters, state, x), state.labels[:size]).backward()

    def _augmenter(self, data) -> SiameseAugment | None:
        return None

    def _fresh_net(self, state: GradientMatchingState) -> nn.Module:
        data = state.data
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=state.generator)))
            net = create_model(self.config.model, data.channels, data.num_classes, tuple(data.image_size))
        return net.to(state.images.device).train()

    # -- one outer iteration -------------------------------------------------------------------
    def step(self, state: GradientMatchingState, ctx: RunContext) -> dict[str, float]:
        config, data = self.config, state.data
        net = self._fresh_net(state)
        matched = matched_parameters(net, config.dis_metric)
        uses_bn = has_batchnorm(net)
        total = torch.zeros((), device=state.images.device)
        for round_index in range(state.outer_loop):
            if uses_bn:
                self._freeze_batchnorm(net, state)
            state.optimizer.zero_grad(set_to_none=True)
            for c in range(data.num_classes):
                total += self._match_class(net, matched, state, c)
            state.optimizer.step()
            if round_index == state.outer_loop - 1:
                break
            self._train_net(net, state)
        state.steps += 1
        return {"loss": float(total) / (state.outer_loop * data.num_classes)}

    def _match_class(self, net: nn.Module, matched: list[nn.Parameter], state: GradientMatchingState, c: int) -> Tensor:
        """Back-propagate class ``c``'s gradient distance into the images; return it (detached)."""
        real = state.data.sample_real(c, self.config.batch_real, generator=state.generator)
        syn = state.images[c * state.ipc : (c + 1) * state.ipc]
        real, syn = self._matching_views(state, real, syn)
        gw_real = self._real_gradients(net, matched, state, real, c)
        syn_loss = F.cross_entropy(net(syn), torch.full((syn.shape[0],), c, device=syn.device))
        gw_syn = torch.autograd.grad(syn_loss, matched, create_graph=True)
        distance = match_loss(gw_syn, gw_real, self.config.dis_metric)
        distance.backward(inputs=[state.images])
        return distance.detach()

    def _matching_views(self, state: GradientMatchingState, real: Tensor, syn: Tensor) -> tuple[Tensor, Tensor]:
        """What the network sees of the real and synthetic batch (DSA: one shared transform)."""
        return real, syn

    def _real_gradients(self, net: nn.Module, matched: list[nn.Parameter], state: GradientMatchingState,
                        real: Tensor, c: int) -> list[Tensor]:
        labels = torch.full((real.shape[0],), c, device=real.device)
        loss = F.cross_entropy(self._forward(net, matched, state, real), labels)
        return list(torch.autograd.grad(loss, matched))

    def _forward(self, net: nn.Module, trainable: list[nn.Parameter], state: GradientMatchingState, x: Tensor) -> Tensor:
        """``net(x)``, compiled when configured; only ``trainable`` parameters carry gradients."""
        x = standard_layout(x)
        if state.fast is None:
            return net(x)
        keep = {id(p) for p in trainable}
        tensors = {name: (p if id(p) in keep else p.detach()) for name, p in net.named_parameters()}
        tensors.update(dict(net.named_buffers()))
        return state.fast(net, x, tensors)

    def _freeze_batchnorm(self, net: nn.Module, state: GradientMatchingState) -> None:
        """PROTOCOL §1.1: set BN running statistics from 16 real images per class, then freeze them."""
        data = state.data
        real = torch.cat([data.sample_real(c, BN_PRIME_PER_CLASS, generator=state.generator)
                          for c in range(data.num_classes)])
        net.train()
        with torch.no_grad():
            net(real)
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()

    def _train_net(self, net: nn.Module, state: GradientMatchingState) -> None:
        """``inner_loop`` epochs of plain SGD on the current synthetic set (detached, shuffled),
        through the project's one training loop."""
        parameters = list(net.parameters())
        recipe = TrainRecipe(optimizer="sgd", lr=self.config.lr_net, momentum=0.0, weight_decay=0.0,
                             epochs=state.inner_loop, batch_size=self.config.batch_train)
        train_network(net, state.images.detach().clone(), state.labels, recipe, loss_fn=F.cross_entropy,
                      generator=state.generator, augment=self._train_augment(state),
                      forward=lambda x: self._forward(net, parameters, state, x), parameters=parameters)

    def _train_augment(self, state: GradientMatchingState):
        """Inner-loop augmentation: none for DC."""
        return None

    # -- output --------------------------------------------------------------------------------
    def result(self, state: GradientMatchingState) -> SyntheticSet:
        meta = dict(state.meta, steps=state.steps)
        return SyntheticSet(state.images.detach().clone(), state.labels.clone(), meta=meta)


@register_method("dsa")
class DSA(DC):
    """DC with Differentiable Siamese Augmentation (PROTOCOL §4); evaluated with DSA.

    Matching: each class gets one draw (family and parameters) applied to both its real and its
    synthetic batch. Inner loop: per-image draws, one family per mini-batch.
    """

    Config = DSAConfig
    paper_protocol = "dsa"

    def _augmenter(self, data) -> SiameseAugment:
        return SiameseAugment(self.config.dsa_strategy or data.dsa_strategy)

    def _matching_views(self, state: GradientMatchingState, real: Tensor, syn: Tensor) -> tuple[Tensor, Tensor]:
        return state.augment.siamese(real, syn, generator=state.generator)

    def _train_augment(self, state: GradientMatchingState):
        """Inner-loop augmentation: per-image DSA draws, one family per mini-batch."""
        return lambda x, generator: state.augment(x, generator=generator, siamese=False)
