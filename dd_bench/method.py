"""The method API: what every distillation method (and baseline) implements.

The harness owns the loop (DESIGN.md, "What a step is")::

    method.build_artifacts(data, dir, ctx)   # one-off, only if artifact_spec() is not None and not built
    method.load_artifacts(dir, ctx)
    state = method.init(data, ipc, ctx)
    for _ in budget: metrics = method.step(state, ctx)
    syn = method.result(state)                          # the set at the adaptation IPC
    sets = {k: method.deploy(state, k, ctx) for k in deploy_ipc}   # generators only

Shared one-off preparation (MTT's expert trajectories, MGDD's meta-trained generator) is
described by ``artifact_spec``: the harness hashes it, builds the artifact once (seeded from
the spec, resumable from the method's own checkpoints), records its build time with every
cell that uses it, and lets every cell with the same spec reuse it. Learned learning rates and
soft labels travel in ``SyntheticSet``; any-IPC generation is ``deploy``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from dd_bench.budget import Budget
from dd_bench.config import build_config
from dd_bench.errors import ConfigError
from dd_bench.registry import Registry

log = logging.getLogger(__name__)


@dataclass
class SyntheticSet:
    """A distilled (or selected) training set, in the dataset's normalised (and ZCA) space.

    ``labels`` are hard class indices, shape (N,), or soft label vectors, shape (N, K).
    ``learned_lr`` is the evaluation learning rate learned with the set (MTT); evaluation
    uses it when the protocol says so. ``meta`` holds what is needed to read the set later
    (dataset, normalisation, ZCA settings), written by the harness.
    """

    images: torch.Tensor
    labels: torch.Tensor
    learned_lr: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"SyntheticSet.images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {self.labels.shape[0]} labels")

    @property
    def soft_labels(self) -> bool:
        return self.labels.ndim == 2

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def hard_labels(self) -> torch.Tensor:
        return self.labels.argmax(dim=1) if self.soft_labels else self.labels

    def detached(self) -> "SyntheticSet":
        """A copy cut from any autograd graph and moved to the CPU (for snapshots and saving)."""
        return SyntheticSet(
            self.images.detach().cpu().clone(), self.labels.detach().cpu().clone(), self.learned_lr, dict(self.meta)
        )

    def save(self, path: Path) -> None:
        """Write atomically: a crash never leaves a half-written set under ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        s = self.detached()
        torch.save({"images": s.images, "labels": s.labels, "learned_lr": s.learned_lr, "meta": s.meta}, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "SyntheticSet":
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        return cls(blob["images"], blob["labels"], blob.get("learned_lr"), blob.get("meta", {}))


def _no_dataset(name: str) -> Any:
    raise RuntimeError(f"this RunContext has no dataset loader (asked for {name!r})")


@dataclass
class RunContext:
    """What the harness hands a method.

    - ``device``: where to compute; ``seed``: the cell's seed (or, while an artifact is built,
      a seed derived from the artifact's spec, so the artifact is a function of its key);
    - ``generator`` (CPU) and ``device_generator`` (on ``device``): seeded from ``seed``, for
      methods that want explicit draws; the harness also seeds torch's global RNG;
    - ``budget``: the cell's distillation budget (for schedules over the run), None while an
      artifact is built;
    - ``load_dataset(name)``: another registered dataset with the cell's data settings (root,
      download permission, ZCA), e.g. MGDD's meta-training source;
    - ``artifact_dir``: the folder of the method's artifact (None without one);
    - ``progress``: whether long loops may show a progress bar.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    generator: torch.Generator = field(default_factory=torch.Generator)
    budget: Budget | None = None
    load_dataset: Callable[[str], Any] = _no_dataset
    artifact_dir: Path | None = None
    progress: bool = False
    device_generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.generator.manual_seed(self.seed)
        if self.device_generator is None:
            self.device_generator = torch.Generator(device=self.device)
        self.device_generator.manual_seed(self.seed)


@dataclass(frozen=True)
class CellStart:
    """What a distilling method's ``init`` starts from (``start_cell``)."""

    data: Any
    device: torch.device
    seed: int


def start_cell(data: Any, ipc: int, ctx: RunContext, move_data: bool = True) -> CellStart:
    """The preamble every distilling method's ``init`` shares.

    Refuses an IPC below 1 with a ``ConfigError`` naming the field; moves the train set to the
    cell's device when ``move_data`` (methods that draw a real batch every step want it there;
    on CPU the move is free); and makes ONE draw from the global RNG the harness seeded, which
    the method then uses to seed everything it draws, so a cell is a function of its seed and
    draws made elsewhere (an evaluation, another method) cannot shift its stream.
    """
    if ipc < 1:
        raise ConfigError(f"ipc: invalid value {ipc!r} (expected >= 1)")
    device = torch.device(ctx.device)
    if move_data and device.type != "cpu":
        data = data.to(device)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    return CellStart(data, device, seed)


@dataclass
class NoConfig:
    """Config of a method without hyperparameters."""


class Method(ABC):
    """Base class of every method. Subclasses set ``Config`` to a dataclass of paper defaults.

    Class attributes (the method's traits; each result records them, and the report reads
    them instead of method names):

    - ``version``: bumped whenever the method's numbers would change; part of the cell id,
      so a result of an older version is never taken for a new one;
    - ``iterative = False``: a selection baseline, the harness takes no steps;
    - ``save_set = False``: the set is not written to the results (the whole training set);
    - ``paper_protocol``: the evaluation preset of the method's paper (``dd_bench.eval``
      presets: "dc", "dsa", "dm", "mtt", "frepo"), or a mapping that starts from one and
      overrides fields (``{"preset": "dm", "soft_label_loss": "mse"}``); a suite protocol
      ``auto`` (and ``epochs: auto``, ``augment: auto``) follows it;
    - ``reference``: "lower" for the baseline every method's gain is measured against (random
      real images), "upper" for the whole-data reference, None otherwise; reference columns
      are shown but never bolded;
    - ``ipc_free``: the set does not depend on the IPC (the whole training set);
    - ``added_fields``: config fields added after results were recorded, each with the value
      that reproduces the behaviour from before it existed. A config at that value leaves the
      field out of its cell id (``identity_params``), so earlier results stay valid and are
      not distilled again; any other value is a new cell.
    """

    Config: ClassVar[type] = NoConfig
    version: ClassVar[str] = "1"
    iterative: ClassVar[bool] = True
    save_set: ClassVar[bool] = True
    paper_protocol: ClassVar[str | dict[str, Any]] = "dc"
    reference: ClassVar[str | None] = None
    ipc_free: ClassVar[bool] = False
    added_fields: ClassVar[dict[str, Any]] = {}
    registry_name: ClassVar[str] = ""

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()

    @classmethod
    def from_params(cls, params: dict[str, Any] | None, where: str = "params") -> "Method":
        """Build from a suite's ``params`` mapping; an unknown key or a wrong type is a ConfigError."""
        return cls(build_config(cls.Config, params or {}, where))

    @classmethod
    def identity_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` (the full config) as a cell id hashes it: ``added_fields`` at their
        neutral value left out."""
        return {k: v for k, v in params.items() if not (k in cls.added_fields and v == cls.added_fields[k])}

    @classmethod
    def supports_deploy(cls) -> bool:
        """True if the method produces sets at other IPCs from one adaptation (``deploy``)."""
        return cls.deploy is not Method.deploy

    @classmethod
    def traits(cls) -> dict[str, Any]:
        """What the report needs to know about the method, recorded with every result."""
        return {"iterative": cls.iterative, "reference": cls.reference, "ipc_free": cls.ipc_free,
                "deploys": cls.supports_deploy(), "paper_protocol": cls.paper_protocol}

    # -- one-off preparation ------------------------------------------------------------
    def artifact_spec(self, data: Any) -> dict[str, Any] | None:
        """What the one-off artifact depends on (hashed into its key), or None for no artifact.

        Everything that changes the artifact's content belongs here (including the dataset's
        ``fingerprint()``), and nothing else: two cells with equal specs share one build.
        """
        return None

    def build_artifacts(self, data: Any, directory: Path, ctx: RunContext) -> None:
        """Make the artifact inside ``directory`` (once per spec; the harness times it).

        ``directory`` survives an interrupted build: a long build should save checkpoints
        there (``dd_bench.checkpoint.save_atomic``) and resume from them when called again.
        The harness seeds torch's global RNG and ``ctx`` from the spec before calling this.
        """

    def load_artifacts(self, directory: Path, ctx: RunContext) -> None:
        """Load what ``build_artifacts`` wrote; called in every cell that needs it."""

    # -- distillation -------------------------------------------------------------------
    @abstractmethod
    def init(self, data: Any, ipc: int, ctx: RunContext) -> Any:
        """Create the distillation state for ``ipc`` images per class."""

    def step(self, state: Any, ctx: RunContext) -> dict[str, float]:
        """One update of the synthetic data; returns metrics such as ``{"loss": ...}``."""
        raise NotImplementedError(f"{type(self).__name__} is not iterative")

    @abstractmethod
    def result(self, state: Any) -> SyntheticSet:
        """The synthetic set the state currently represents (at the adaptation IPC)."""

    def deploy(self, state: Any, ipc: int, ctx: RunContext) -> SyntheticSet:
        """A synthetic set of ``ipc`` images per class from the adapted state, without further
        adaptation (generators). Methods that implement it accept ``deploy_ipc`` in a suite."""
        raise NotImplementedError(f"{type(self).__name__} cannot deploy at other IPCs")


METHODS: Registry[type[Method]] = Registry("method", ("dd_bench.methods",), entry_point_group="dd_bench.methods",
                                           base=Method)


def register_method(name: str, *aliases: str):
    """Class decorator: ``@register_method("dm")`` makes a ``Method`` subclass available by name."""
    return METHODS.register(name, *aliases)


def create_method(name: str, params: dict[str, Any] | None = None) -> Method:
    """Look up ``name`` in the registry and build it from ``params`` over the paper defaults."""
    cls = METHODS.get(name)
    method = cls.from_params(params, where=f"methods[{name}].params")
    method.registry_name = METHODS.canonical(name)
    return method


__all__ = ["METHODS", "Method", "NoConfig", "RunContext", "SyntheticSet", "create_method",
           "register_method"]
