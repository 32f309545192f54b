"""MGDD: a meta-learned generator for fast dataset distillation (Liu & Wang, NeurIPS 2023; PROTOCOL §8).

MGDD has no public code; this is the reference implementation of dd-bench, written from the
poster and abstract. Every choice the paper leaves open is a config field (``MGDDConfig``)
with a documented default.

**Analytical labels (Eq. 3).** A random but fixed feature net f_θ (``feature_model``, its
``embed``) is applied to the real training set; ridge least squares to the one-hot labels gives
W (primal d×d solve when there are more images than features, so all 60,000 images of
Fashion-MNIST are used by default; trace-scaled ridge ``label_reg``); a synthetic
initialisation X_s gets the soft labels Y_s* = f_θ(X_s) W.

**Training loss (Eq. 1).** In the features of a freshly drawn random net θ* (same
architecture), kernel ridge regression (linear kernel, trace-scaled ridge ``loss_reg``) from the
generated set g_ω(X_s) with labels Y_s* predicts a real batch's one-hot labels; the loss is the
squared error (summed over classes, averaged over real images).

**Generator.** A residual encoder-decoder that is the identity until adapted (its last conv is
zero-initialised), fully convolutional, for any size and channel count
(``mgdd_parts.ResidualGenerator``).

**Meta-training** (first-order MAML over random class subsets of the ``source`` dataset,
``mgdd_meta``) is this method's artifact: built once per spec (source identity, target image
space, generator shape, meta hyperparameters and steps; not the cell seed), resumable from its
checkpoints, timed apart by the harness. The source reaches the target's image space through
``mgdd_parts.adapt_images``: back to pixels, grey↔colour (repeat / BT.601 luma), bilinear
resize, the target's normalisation and ZCA. The paper meta-trains on ImageNet-scale data;
here any registered dataset works, and the default is the embedded MNIST sample (4,000 train images; for a
Fashion-MNIST target this is a different dataset, as the paper's setting asks; for an MNIST
target, choose another source).

**Adaptation** (one harness ``step``): a class-balanced real batch, one initialisation from
the pool 𝓘 (``pool_size`` random real sets of the cell's IPC, labelled by Eq. 3), a fresh
θ*, Eq. 1, one update of the generator's weights ω' (``adapt_optimizer`` at ``adapt_lr``).

**Deployment** (``deploy``): a new random real initialisation of any IPC, its analytical labels,
one generator forward; no further adaptation. ``result`` is the generator's output on the
pool's first initialisation, at the adaptation IPC.

**Ablations** (config): ``mode: labels_only`` (analytical labels on the initial images, no
generator; steps change nothing), ``mode: pixels`` (Eq. 1 optimises the pixels of one
initialisation directly, same steps: what the loss alone can reach), ``meta_train: false``
(an untrained generator, adapted from the identity), ``adapt: false`` (the meta-trained
generator without adaptation: 0 steps), ``labels: one_hot``, ``generator_condition: labels``
(the generator also sees each image's soft label), ``meta_label_per_class`` (meta-training
tasks label their support from held-out images, as adaptation's 60,000-image solve does).
``labels_only`` and ``adapt: false`` take no harness steps (the method is not iterative then).
What each is worth at Fashion-MNIST IPC 10 is in README ("MGDD at Fashion-MNIST IPC 10").

Departures and choices (beyond the open CHOICEs of §8, each a field below):

- the source is not ImageNet (see above); the meta-training length is far shorter than the
  paper's (unstated) one, to fit CPU budgets;
- randomness: every draw (initialisations, real batches, θ*, f_θ) comes from one generator
  seeded from the harness-seeded global RNG in ``init``; deployment at IPC k draws from a
  stream derived from that seed and k, so the order of deployments does not matter;
- the generator maps each image on its own; the real batch of a step may contain images of
  the initialisation (the paper says nothing; inside meta-training tasks they are disjoint).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dd_bench.checkpoint import load_checkpoint
from dd_bench.data import DATASETS
from dd_bench.errors import ConfigError
from dd_bench.method import Method, RunContext, SyntheticSet, register_method, start_cell
from dd_bench.seeding import derive_seed, make_generator
from dd_bench.methods.mgdd_meta import ARTIFACT_FILE, MetaSettings, make_optimizer, meta_train
from dd_bench.methods.mgdd_parts import (adapt_images, analytical_labels, embed_in_chunks, generate, krr_loss,
                                         label_weights, make_generator_net, one_hot, random_feature_net,
                                         target_space)

log = logging.getLogger(__name__)

#: Bumped when the meta-trained artifact of the same spec would differ.
META_VERSION = "1"
#: Meta settings added after artifacts were built, at the value that builds what older specs
#: built: left out of the artifact spec then, so those artifacts are still found.
META_ADDED_SETTINGS = {"label_per_class": 0, "generator_condition_dim": 0}


@dataclass
class MGDDConfig:
    """MGDD's choices (PROTOCOL §8 leaves them open); every default is documented."""

    # -- what runs (ablation switches) ---------------------------------------------------
    mode: Literal["generator", "labels_only", "pixels"] = "generator"
    """``generator``: MGDD. ``labels_only``: analytical labels on the initial images, no
    generator (steps only report the loss). ``pixels``: Eq. 1 optimises the pixels of one
    initialisation directly, the same steps (the reference for what the loss alone reaches)."""

    meta_train: bool = True
    """Start adaptation from the meta-trained generator (the artifact); False: from the identity
    (the "untrained generator" ablation, no artifact is built)."""

    adapt: bool = True
    """Adapt the generator (MGDD). False: the generator is used as it starts (the meta-trained
    one, or the identity with ``meta_train: false``) and the harness takes no steps: the 0-step
    point of the accuracy-vs-adaptation-steps curve (with ``mode: generator``)."""

    labels: Literal["analytical", "one_hot"] = "analytical"
    """Labels of the synthetic set: Eq. 3's soft labels, or the one-hot class (ablation)."""

    # -- feature nets (f_θ for the labels, θ* for the loss) ---------------------------------
    feature_model: str = "ConvNet"
    """Registered net whose ``embed`` gives the features of f_θ and θ*, randomly initialised
    and never trained (ConvNet-3 without its classifier, the natural choice of §8)."""

    # -- analytical labels (Eq. 3) ------------------------------------------------------
    label_real_per_class: int | None = None
    """Real images per class in the label solve; None: the whole train set (primal solve)."""

    label_reg: float = 1e-6
    """Trace-scaled ridge of the label solve (λ·tr(K)/n)."""

    # -- training loss (Eq. 1) ----------------------------------------------------------
    loss_reg: float = 1e-6
    """Trace-scaled ridge of Eq. 1's kernel regression (FRePo's 1e-6)."""

    real_per_class: int = 32
    """Real images per class in each step's real batch (and in meta-training's query batch)."""

    # -- generator and adaptation -------------------------------------------------------
    generator_width: int = 32
    """Channels of the generator's first level (doubling at each of ``generator_levels``)."""

    generator_levels: int = 2
    """Stride-2 down/up-sampling levels of the encoder-decoder."""

    generator_condition: Literal["none", "labels"] = "none"
    """What the generator sees besides each initial image: ``none``; ``labels``: also the
    image's analytical soft label Y_s* (a function of the initial image; a learned bias per
    level, ``mgdd_parts.ResidualGenerator``), so one map can move each class differently."""

    pool_size: int = 4
    """Initialisations in the pool 𝓘 (each a random real set at the cell's IPC)."""

    adapt_optimizer: Literal["adam", "sgd"] = "adam"
    """Optimiser of ω' in adaptation and in meta-training's inner loop (α's)."""

    adapt_lr: float = 1e-3
    """α: the learning rate of ω' (adaptation and meta-training's inner loop)."""

    pixel_lr: float = 0.01
    """Adam learning rate of the pixels in ``mode: pixels``."""

    # -- meta-training (the artifact) ---------------------------------------------------
    source: str = "mnist_sample"
    """Registered dataset to meta-train on (the paper: ImageNet-scale data)."""

    meta_steps: int = 200
    """Meta (outer) steps."""

    meta_inner_steps: int = 1
    """T_inner: adaptation steps rehearsed per task before the meta-test loss."""

    meta_lr: float = 1e-4
    """β: Adam learning rate of the meta (outer) update."""

    meta_classes_per_task: int = 10
    """Source classes per task (all of them when the source has fewer)."""

    meta_task_per_class: int = 100
    """Source images per class in a task (support sets and real batches; the label solve uses
    all of them)."""

    meta_label_per_class: int = 0
    """Further source images per class in a task that only the task's label solve uses. 0: the
    solve uses the task's images alone; with 100 per class that is fewer images than features,
    so the support's labels come out one-hot where adaptation's are soft (see ``mgdd_meta``).
    The mismatch is measured: a generator meta-trained 2,000 steps with 0 lowers Eq. 1 on
    one-hot-labelled Fashion-MNIST sets and raises it on soft-labelled ones; with 200 it harms
    the soft-labelled ones less, but its accuracy after adaptation is still level with the
    untrained generator's, and it doubles the build's time per meta step (3.4 s against 1.8 s
    on 2 cores), so the default stays 0 (README)."""

    meta_ipc: tuple[int, ...] = (1, 10)
    """IPCs a task's initialisation is drawn with (one chosen per loss evaluation)."""

    meta_checkpoint_every: int = 25
    """Meta steps between resumable checkpoints (does not change the artifact)."""

    def __post_init__(self) -> None:
        self.meta_ipc = tuple(self.meta_ipc)
        positive = ("real_per_class", "generator_width", "pool_size", "meta_classes_per_task", "meta_task_per_class",
                    "meta_checkpoint_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: invalid value {getattr(self, name)!r} (expected >= 1)")
        for name in ("generator_levels", "meta_steps", "meta_inner_steps", "meta_label_per_class"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: invalid value {getattr(self, name)!r} (expected >= 0)")
        for name in ("adapt_lr", "pixel_lr", "meta_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: invalid value {getattr(self, name)!r} (expected > 0)")
        for name in ("label_reg", "loss_reg"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name}: invalid value {getattr(self, name)!r} (expected >= 0)")
        if self.label_real_per_class is not None and self.label_real_per_class < 1:
            raise ConfigError(f"label_real_per_class: invalid value {self.label_real_per_class!r} (expected >= 1 or null)")
        if self.mode == "pixels" and not self.adapt:
            raise ConfigError("adapt: invalid value False with mode 'pixels' (use mode: labels_only)")
        if not self.meta_ipc or min(self.meta_ipc) < 1:
            raise ConfigError(f"meta_ipc: invalid value {list(self.meta_ipc)!r} (expected IPCs >= 1)")
        if max(self.meta_ipc) + self.real_per_class > self.meta_task_per_class:
            raise ConfigError(f"meta_task_per_class: invalid value {self.meta_task_per_class!r} (a task needs "
                              f"max(meta_ipc) + real_per_class = {max(self.meta_ipc) + self.real_per_class} per class)")

    def condition_dim(self, num_classes: int) -> int:
        """Length of the generator's condition for a target of ``num_classes`` classes (0: none)."""
        return num_classes if self.generator_condition == "labels" else 0

    def meta_settings(self, num_classes: int) -> MetaSettings:
        """The meta-training settings for a target of ``num_classes`` classes (the length of a
        conditioned generator's label input)."""
        return MetaSettings(
            steps=self.meta_steps, inner_steps=self.meta_inner_steps, inner_lr=self.adapt_lr,
            inner_optimizer=self.adapt_optimizer, outer_lr=self.meta_lr, classes_per_task=self.meta_classes_per_task,
            task_per_class=self.meta_task_per_class,
            label_per_class=self.meta_label_per_class, ipc_choices=self.meta_ipc, real_per_class=self.real_per_class,
            feature_model=self.feature_model, label_reg=self.label_reg, loss_reg=self.loss_reg,
            generator_width=self.generator_width, generator_levels=self.generator_levels,
            generator_condition_dim=self.condition_dim(num_classes),
            checkpoint_every=self.meta_checkpoint_every)


@dataclass
class MGDDState:
    """What persists across adaptation steps."""

    data: Any  # the target Dataset, on the compute device
    ipc: int
    seed: int  # the method's own seed (deployment streams derive from it)
    stream: torch.Generator  # real batches, pool picks, θ* seeds (CPU)
    label_net: nn.Module  # f_θ, fixed
    weights: Tensor  # W_t^θ (d, K)
    pool_images: list[Tensor]  # 𝓘: initial sets, class-sorted
    pool_labels: list[Tensor]  # their labels (soft (N, K) or one-hot)
    generator: nn.Module | None  # g_ω' (None in the labels_only and pixels modes)
    pixels: Tensor | None  # the optimised images in mode "pixels"
    optimizer: torch.optim.Optimizer | None
    device: torch.device


@register_method("mgdd")
class MGDD(Method):
    """Meta-learned generator with analytical labels and fast adaptation (PROTOCOL §8)."""

    Config = MGDDConfig
    version = "1"
    # The poster does not give its evaluation. Soft labels, evaluated as DM's protocol (DSA
    # augmentation, 1000 epochs) with soft cross-entropy on the label vectors: on Fashion-MNIST
    # IPC 10 (300 epochs, 3 nets) the analytical labels scored 77.7 with soft cross-entropy and
    # 76.7 with MSE under DSA (76.3 / 75.1 without augmentation).
    paper_protocol = {"preset": "dm", "soft_label_loss": "soft_ce"}

    #: Fields added after the first recorded results, at their old behaviour (cell ids keep).
    added_fields = {"meta_label_per_class": 0, "generator_condition": "none"}

    def __init__(self, config: MGDDConfig | None = None):
        super().__init__(config)
        self._meta_generator: dict | None = None
        # Modes that never change the set take no harness steps (their steps would only
        # report the loss and cost time): labels_only, and adapt: false.
        self.iterative = self.config.mode != "labels_only" and self.config.adapt

    # -- the artifact: the meta-trained generator --------------------------------------------
    def _uses_artifact(self) -> bool:
        return self.config.mode == "generator" and self.config.meta_train

    def artifact_spec(self, data) -> dict[str, Any] | None:
        if not self._uses_artifact():
            return None
        cfg: MGDDConfig = self.config
        described = data.describe()
        # The source is loaded with the cell's data settings (ctx.load_dataset), so its name and
        # those settings are what its fingerprint hashes (a full registered set's sizes follow
        # from its name).
        # A reduced training set (the suite's data.train_per_class) reduces the source as well:
        # the target's variant names it.
        source = {"name": DATASETS.canonical(cfg.source),
                  "variant": "full" if data.variant == "full" else f"as target {data.variant}",
                  **{k: described[k] for k in ("zca", "zca_mode", "zca_reg")}}
        settings = asdict(cfg.meta_settings(data.num_classes))
        settings.pop("checkpoint_every")
        for name, neutral in META_ADDED_SETTINGS.items():
            if settings[name] == neutral:
                settings.pop(name)
        return {"artifact": "mgdd-meta-generator", "version": META_VERSION, "source": source,
                "target_space": target_space(data), "meta": settings}

    def build_artifacts(self, data, directory: Path, ctx: RunContext) -> None:
        cfg: MGDDConfig = self.config
        source = ctx.load_dataset(cfg.source)
        if DATASETS.canonical(cfg.source) == data.name:
            log.warning("mgdd: meta-training on the target dataset itself (%s); the paper's source differs", data.name)
        task_classes = min(cfg.meta_classes_per_task, source.num_classes)
        if cfg.generator_condition == "labels" and task_classes > data.num_classes:
            raise ConfigError(f"meta_classes_per_task: invalid value {cfg.meta_classes_per_task!r} (a generator "
                              f"conditioned on labels takes {data.num_classes}-class labels of {data.name}; a task "
                              f"of {task_classes} classes has longer ones)")
        images = adapt_images(source.train_images, source, data)
        log.info("mgdd: meta-training on %s (%d images, adapted to %s %dx%d) for %d steps", source.name,
                 images.shape[0], data.name, *data.image_size, cfg.meta_steps)
        meta_train(images, source.train_labels, source.num_classes, cfg.meta_settings(data.num_classes), directory,
                   ctx)

    def load_artifacts(self, directory: Path, ctx: RunContext) -> None:
        self._meta_generator = load_checkpoint(Path(directory) / ARTIFACT_FILE)
        if self._meta_generator is None:
            raise FileNotFoundError(f"mgdd: no {ARTIFACT_FILE} in {directory}")

    # -- adaptation --------------------------------------------------------------------------
    def init(self, data, ipc: int, ctx: RunContext) -> MGDDState:
        cfg: MGDDConfig = self.config
        start = start_cell(data, ipc, ctx)
        data, device, seed = start.data, start.device, start.seed
        stream = make_generator(seed)
        label_net = random_feature_net(cfg.feature_model, data.channels, data.image_size,
                                       derive_seed(seed, "label-net"), device)
        weights = self._label_weights(data, label_net, stream)
        pool_size = 1 if cfg.mode == "pixels" else cfg.pool_size
        pool = [self._initialisation(data, ipc, stream, device) for _ in range(pool_size)]
        pool_labels = [self._labels(data, label_net, weights, x) for x in pool]
        generator = pixels = optimizer = None
        if cfg.mode == "generator":
            generator = self._start_generator(data, seed).to(device)
            optimizer = make_optimizer(generator.parameters(), cfg.adapt_optimizer, cfg.adapt_lr)
        elif cfg.mode == "pixels":
            pixels = pool[0].clone().requires_grad_(True)
            optimizer = torch.optim.Adam([pixels], lr=cfg.pixel_lr)
        return MGDDState(data, ipc, seed, stream, label_net, weights, pool, pool_labels, generator, pixels, optimizer,
                         device)

    def _label_weights(self, data, label_net: nn.Module, stream: torch.Generator) -> Tensor:
        cfg: MGDDConfig = self.config
        if cfg.label_real_per_class is None:
            images, labels = data.train_images, data.train_labels
        else:
            per_class = [data.sample_real(c, min(cfg.label_real_per_class, data.class_count(c)), generator=stream)
                         for c in range(data.num_classes)]
            images = torch.cat(per_class)
            labels = torch.cat([torch.full((x.shape[0],), c) for c, x in enumerate(per_class)])
        features = embed_in_chunks(label_net, images)
        return label_weights(features, one_hot(labels, data.num_classes).to(features.device), cfg.label_reg)

    @staticmethod
    def _initialisation(data, ipc: int, stream: torch.Generator, device: torch.device) -> Tensor:
        """A random real set, class-sorted."""
        return torch.cat([data.sample_real(c, ipc, generator=stream).to(device) for c in range(data.num_classes)])

    def _labels(self, data, label_net: nn.Module, weights: Tensor, images: Tensor) -> Tensor:
        if self.config.labels == "one_hot":
            ipc = images.shape[0] // data.num_classes
            return one_hot(torch.arange(data.num_classes).repeat_interleave(ipc), data.num_classes).to(images.device)
        return analytical_labels(label_net, images, weights)

    def _start_generator(self, data, seed: int) -> nn.Module:
        cfg: MGDDConfig = self.config
        generator = make_generator_net(data.channels, cfg.generator_width, cfg.generator_levels,
                                       derive_seed(seed, "generator"), cfg.condition_dim(data.num_classes))
        if cfg.meta_train:
            if self._meta_generator is None:
                raise ConfigError("meta_train: true needs the meta-trained generator: build and load the artifact "
                                  "(the harness does), or set meta_train: false")
            generator.load_state_dict(self._meta_generator["generator"])
        return generator

    def step(self, state: MGDDState, ctx: RunContext) -> dict[str, float]:
        cfg: MGDDConfig = self.config
        data, k = state.data, state.data.num_classes
        real = torch.cat([data.sample_real(c, cfg.real_per_class, generator=state.stream) for c in range(k)])
        targets = one_hot(torch.arange(k).repeat_interleave(cfg.real_per_class), k).to(real.device)
        pick = int(torch.randint(len(state.pool_images), (1,), generator=state.stream).item())
        net = random_feature_net(cfg.feature_model, data.channels, data.image_size,
                                 int(torch.randint(0, 2**62, (1,), generator=state.stream).item()), state.device)
        if cfg.mode == "labels_only" or not cfg.adapt:  # the set never changes: report the loss only
            with torch.no_grad():
                synthetic = self._produce(state, state.pool_images[pick], state.pool_labels[pick])
                loss = krr_loss(net, real, targets, synthetic, state.pool_labels[pick], cfg.loss_reg)
            return {"loss": float(loss.item())}
        if cfg.mode == "pixels":
            synthetic = state.pixels
        else:
            synthetic = state.generator(state.pool_images[pick], state.pool_labels[pick])
        loss = krr_loss(net, real, targets, synthetic, state.pool_labels[pick], cfg.loss_reg)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        return {"loss": float(loss.item())}

    # -- the sets ----------------------------------------------------------------------------
    def result(self, state: MGDDState) -> SyntheticSet:
        images = self._produce(state, state.pool_images[0], state.pool_labels[0])
        return SyntheticSet(images, state.pool_labels[0].detach().clone(), meta={"mgdd_ipc": state.ipc})

    def deploy(self, state: MGDDState, ipc: int, ctx: RunContext) -> SyntheticSet:
        if self.config.mode == "pixels":
            if ipc == state.ipc:
                return self.result(state)
            raise ConfigError(f"deploy_ipc: mode 'pixels' optimises one set of IPC {state.ipc}; it cannot deploy "
                              f"at IPC {ipc}")
        return self.produce(state, self.deploy_initialisation(state, ipc))

    def produce(self, state: MGDDState, initial: SyntheticSet) -> SyntheticSet:
        """The generator (as adapted so far) applied to ``initial``, labels kept: one forward
        pass, no adaptation (``labels_only``: ``initial`` unchanged)."""
        if self.config.mode == "pixels":
            raise ConfigError("mode: 'pixels' optimises one set's pixels; it has no generator to apply")
        return SyntheticSet(self._produce(state, initial.images, initial.labels), initial.labels,
                            meta={"mgdd_ipc": state.ipc})

    def deploy_initialisation(self, state: MGDDState, ipc: int) -> SyntheticSet:
        """What ``deploy`` at ``ipc`` starts from: a random real set with its analytical labels,
        drawn from a stream derived from the method's seed and ``ipc`` (so the order of
        deployments does not matter); the generator not applied (the "labels only" point)."""
        return self.initialisation(state, ipc, make_generator(derive_seed(state.seed, "deploy", ipc)))

    def initialisation(self, state: MGDDState, ipc: int, stream: torch.Generator) -> SyntheticSet:
        """A random real set of ``ipc`` images per class drawn from ``stream`` (class-sorted),
        with the cell's labels for it (Eq. 3 through the cell's f_θ, or one-hot): a set the
        generator may never have seen, e.g. to ask whether adaptation generalises."""
        initial = self._initialisation(state.data, ipc, stream, state.device)
        return SyntheticSet(initial, self._labels(state.data, state.label_net, state.weights, initial))

    def _produce(self, state: MGDDState, initial: Tensor, labels: Tensor) -> Tensor:
        if self.config.mode == "pixels":
            return state.pixels.detach().clone()
        if state.generator is None:
            return initial.detach().clone()
        return generate(state.generator, initial, labels)
