"""The method API: what every distillation method (and baseline) implements.

The harness owns the loop (DESIGN.md, "What a step is")::

    method.build_artifacts(data, dir, ctx)   # one-off, only if artifact_spec() is not None and not cached
    method.load_artifacts(dir, ctx)
    state = method.init(data, ipc, ctx)
    for _ in budget: metrics = method.step(state, ctx)
    syn = method.result(state)

Shared one-off preparation (MTT's expert trajectories, MGDD's meta-trained generator) is
described by ``artifact_spec``: the harness hashes it, builds the artifact once under a lock,
times that apart as ``prepare_seconds`` and lets every cell with the same spec reuse it.
Learned learning rates, soft labels and any-IPC generation live in ``SyntheticSet`` and in
the method's own state, so none of them needs an engine change.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from dd_bench.errors import ConfigError
from dd_bench.registry import Registry

log = logging.getLogger(__name__)

METHODS: Registry[type["Method"]] = Registry("method", ("methods",), entry_point_group="dd_bench.methods")


def register_method(name: str, *aliases: str):
    """Class decorator: ``@register_method("dm")`` makes a ``Method`` subclass available by name."""
    return METHODS.register(name, *aliases)


@dataclass
class SyntheticSet:
    """A distilled (or selected) training set, in the dataset's normalised (and ZCA) space.

    ``labels`` are hard class indices, shape (N,), or soft label vectors, shape (N, K).
    ``learned_lr`` is the evaluation learning rate learned with the set (MTT); evaluation
    uses it when the protocol says so.
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
        blob = torch.load(Path(path), map_location="cpu", weights_only=False)
        return cls(blob["images"], blob["labels"], blob.get("learned_lr"), blob.get("meta", {}))


@dataclass
class RunContext:
    """What the harness hands a method: where to compute and which seed it runs under.

    The harness seeds torch, numpy and random from ``seed`` before ``init``; ``generator``
    is a CPU generator seeded the same way for methods that want explicit draws.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    generator: torch.Generator = field(default_factory=torch.Generator)

    def __post_init__(self) -> None:
        self.generator.manual_seed(self.seed)


@dataclass
class NoConfig:
    """Config of a method without hyperparameters."""


class Method(ABC):
    """Base class of every method. Subclasses set ``Config`` to a dataclass of paper defaults.

    ``iterative = False`` marks selection baselines: the harness takes no steps for them.
    ``save_set = False`` skips writing the set to the results (e.g. the whole training set).
    ``paper_eval_augment`` is the evaluation augmentation the method's paper used
    ("dsa" or "none"); a protocol with ``augment: auto`` follows it.
    """

    Config: ClassVar[type] = NoConfig
    iterative: ClassVar[bool] = True
    save_set: ClassVar[bool] = True  # False for references such as the whole training set
    paper_eval_augment: ClassVar[str] = "none"
    registry_name: ClassVar[str] = ""

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()

    @classmethod
    def from_params(cls, params: dict[str, Any] | None, where: str = "params") -> "Method":
        """Build from a suite's ``params`` mapping; an unknown key or a wrong type is a ConfigError."""
        return cls(build_config(cls.Config, params or {}, where))

    # -- one-off preparation ------------------------------------------------------------
    def artifact_spec(self, data: Any) -> dict[str, Any] | None:
        """What the one-off artifact depends on (hashed into its cache key), or None for no artifact."""
        return None

    def build_artifacts(self, data: Any, directory: Path, ctx: RunContext) -> None:
        """Make the artifact inside ``directory`` (once per spec, under a lock, timed as prepare)."""

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
        """The synthetic set the state currently represents."""


def build_config(config_type: type, params: dict[str, Any], where: str = "params") -> Any:
    """Instantiate a config dataclass from a mapping, rejecting unknown keys and wrong types."""
    if not dataclasses.is_dataclass(config_type):
        raise TypeError(f"{config_type!r} is not a dataclass")
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: expected a mapping, got {params!r}")
    hints = typing.get_type_hints(config_type)
    known = {f.name for f in dataclasses.fields(config_type) if f.init}
    values = {}
    for key, value in params.items():
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown parameter (value {value!r}); known: {', '.join(sorted(known))}")
        values[key] = _coerce(hints.get(key, Any), value, f"{where}.{key}")
    try:
        return config_type(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Check ``value`` against a simple type hint; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        errors = []
        for arg in args:
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(arg, value, where)
            except ConfigError as error:
                errors.append(error)
        raise ConfigError(f"{where}: invalid value {value!r} (expected {_hint_name(hint)})")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: invalid value {value!r} (expected one of {', '.join(map(repr, args))})")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: invalid value {value!r} (expected a list)")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: invalid value {value!r} (expected a mapping)")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: invalid value {value!r} (expected a number)")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: invalid value {value!r} (expected an integer)")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: invalid value {value!r} (expected true or false)")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: invalid value {value!r} (expected a string)")
        return value
    return value


def _hint_name(hint: Any) -> str:
    return str(hint).replace("typing.", "")


def create_method(name: str, params: dict[str, Any] | None = None) -> Method:
    """Look up ``name`` in the registry and build it from ``params`` over the paper defaults."""
    cls = METHODS.get(name)
    method = cls.from_params(params, where=f"methods[{name}].params")
    method.registry_name = METHODS.canonical(name)
    return method
