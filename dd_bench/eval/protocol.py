"""Evaluation protocols: how a synthetic set is scored, as data, with each paper's as a named preset.

A protocol fixes everything that changes the number: the evaluation architecture, optimiser,
learning-rate schedule, length (passes over the set, or optimiser steps), batch rule,
augmentation, loss for hard and soft labels, the number of networks trained, precision.

Presets (PROTOCOL §2.1, §6, §7), checked against the official code:

- ``dc``: SGD lr 0.01, momentum 0.9, wd 5e-4, batch 256 shuffled, ×0.1 after pass E//2+1;
  DC's own augmentation where ``get_daparam`` turns it on (MNIST: crop_scale_rotate;
  ConvNetBN evaluation: crop_noise); E = 300, or 1000 with that augmentation (DC ``main.py``);
  20 networks per set.
- ``dsa`` and ``dm``: the same optimiser and schedule, 1000 epochs, per-image DSA augmentation
  with the method's DSA strategy (the dataset's when the method has none); 20 networks.
- ``mtt``: as ``dsa`` but with the learned step size as the learning rate, MTT's
  ``align_corners=True`` warps, test batch 128; 5 networks.
- ``frepo``: Adam lr 3e-4, 500 warm-up steps then cosine to 1 %, length in steps by set size
  (10→1000, 100→2000, 200→20000, 400→5000, 500→5000, 1000→10000, 2000→40000, 5000→40000;
  between tabulated sizes the nearest one below), batch min(N, 500) cycling through the set in
  order, FRePo's augmentation (one family per batch, no flip for grey digits), MSE on the
  labels (centred one-hot for hard labels), FRePo's ConvNet without normalisation; 5 networks.
- ``auto``: each method's own paper preset (``Method.paper_protocol``).

A suite protocol is a preset name or a mapping that may start from one
(``{preset: auto, runs: 10}``); fields left ``auto`` (``epochs``, ``steps``, ``augment``) are
resolved per evaluated set by :func:`resolve`, and the resolved protocol (with :meth:`describe`)
travels with every number.

The step schedule trains pass ``ep`` and *then* drops the lr when ``ep == E//2 + 1``, for
``E + 1`` passes in all (``for ep in range(Epoch+1)`` in ``evaluate_synset``): E = 1000 gives
502 passes at the lr and 499 at a tenth of it; E = 300 gives 152 and 149.
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from dd_bench.config import build_config
from dd_bench.errors import ConfigError

#: Bumped when the same protocol fields would give different numbers (2: the lr drop moved one
#: pass later, to match the official loop). Results record it; old ones report as version 1.
EVAL_VERSION = 2

AUTO = "auto"
AugmentChoice = Literal["auto", "none", "dsa", "dc", "frepo"]

#: FRePo's ``script/eval.py``: optimiser steps by number of synthetic images.
FREPO_STEPS_BY_SET_SIZE: dict[int, int] = {10: 1000, 100: 2000, 200: 20000, 400: 5000, 500: 5000, 1000: 10000,
                                           2000: 40000, 5000: 40000}


@dataclass(frozen=True)
class EvalProtocol:
    """One evaluation protocol (see the module docstring). Defaults are DC's loop with 5 runs."""

    preset: str | None = None
    model: str = "ConvNet"
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.01
    use_learned_lr: bool = True
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["step", "cosine", "constant"] = "step"
    warmup_steps: int = 0
    final_lr_fraction: float = 0.01
    epochs: int | Literal["auto"] | None = AUTO
    steps: int | Literal["auto"] | None = None
    batch_size: int = 256
    batch_order: Literal["shuffle", "cycle"] = "shuffle"
    augment: AugmentChoice = AUTO
    dsa_strategy: str | None = None
    dc_strategy: str | None = None
    frepo_strategy: str | None = None
    dsa_align_corners: bool = False
    hard_label_loss: Literal["ce", "mse"] = "ce"
    soft_label_loss: Literal["soft_ce", "mse"] = "soft_ce"
    runs: int = 5
    test_batch_size: int = 256
    precision: Literal["fp32", "bf16"] = "fp32"
    version: int = EVAL_VERSION
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name in ("runs", "batch_size", "test_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"protocol.{name}: invalid value {value!r} (expected a positive integer)")
        for name in ("epochs", "steps"):
            value = getattr(self, name)
            if value not in (None, AUTO) and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ConfigError(f"protocol.{name}: invalid value {value!r} (expected an integer >= 0 or 'auto')")
        if self.steps is not None and self.epochs not in (None, AUTO):
            raise ConfigError(f"protocol: give epochs or steps, not both (epochs={self.epochs!r}, steps={self.steps!r})")
        if self.schedule == "step" and self.steps not in (None, AUTO):
            raise ConfigError(f"protocol.schedule: 'step' drops the lr after a pass; use epochs, not steps={self.steps!r}")
        if not self.lr > 0:
            raise ConfigError(f"protocol.lr: invalid value {self.lr!r} (expected > 0)")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ConfigError(f"protocol.final_lr_fraction: invalid value {self.final_lr_fraction!r} (expected 0..1)")

    # -- what a resolved protocol is -------------------------------------------------------
    @property
    def is_resolved(self) -> bool:
        return self.augment != AUTO and self.epochs != AUTO and self.steps != AUTO

    def lr_drop_epoch(self) -> int:
        """The pass (0-based) after which the step schedule drops the lr: E//2 + 1."""
        if not isinstance(self.epochs, int):
            raise ValueError("lr_drop_epoch needs a protocol with epochs")
        return self.epochs // 2 + 1

    def passes(self) -> int | None:
        """Passes over the set: E + 1 for the step schedule (the official loop), E otherwise."""
        if not isinstance(self.epochs, int):
            return None
        return self.epochs + 1 if self.schedule == "step" else self.epochs

    def describe(self) -> str:
        """One line that travels with every number this protocol produced."""
        if self.optimizer == "sgd":
            optimiser = f"SGD lr {self.lr:g}{' (or learned)' if self.use_learned_lr else ''}, mom {self.momentum:g}, " \
                        f"wd {self.weight_decay:g}"
        else:
            optimiser = f"Adam lr {self.lr:g}{' (or learned)' if self.use_learned_lr else ''}"
        if self.steps not in (None, AUTO):
            length = f"{self.steps} steps"
        elif isinstance(self.epochs, int):
            length = f"{self.epochs} epochs"
        else:
            length = f"epochs {self.epochs or AUTO}"
        if self.schedule == "step" and isinstance(self.epochs, int):
            schedule = f"×0.1 after pass {self.lr_drop_epoch()} of {self.passes()}"
        elif self.schedule == "cosine":
            schedule = f"warm-up {self.warmup_steps} then cosine to {self.final_lr_fraction:g}×"
        else:
            schedule = self.schedule
        aug = {"dsa": f"DSA({self.dsa_strategy})", "dc": f"DC({self.dc_strategy})",
               "frepo": f"FRePo({self.frepo_strategy})"}.get(self.augment, self.augment)
        batch = f"batch {self.batch_size}{' cycled' if self.batch_order == 'cycle' else ''}"
        labels = f"hard {self.hard_label_loss.upper()}, soft {self.soft_label_loss}"
        text = (f"{self.model}, {optimiser}, {length}, {schedule}, {batch}, aug {aug}, {labels}, {self.runs} runs, "
                f"{self.precision}")
        return f"[{self.preset}] {text}" if self.preset else text

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


# -- presets ---------------------------------------------------------------------------------
_SGD_STEP = dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="step", batch_size=256,
                 batch_order="shuffle", hard_label_loss="ce", test_batch_size=256)

PRESETS: dict[str, dict[str, Any]] = {
    "dc": dict(_SGD_STEP, model="ConvNet", use_learned_lr=False, epochs=AUTO, augment="dc", runs=20),
    "dsa": dict(_SGD_STEP, model="ConvNet", use_learned_lr=False, epochs=1000, augment="dsa", runs=20),
    "dm": dict(_SGD_STEP, model="ConvNet", use_learned_lr=False, epochs=1000, augment="dsa", runs=20),
    "mtt": dict(_SGD_STEP, model="ConvNet", use_learned_lr=True, epochs=1000, augment="dsa", dsa_align_corners=True,
                test_batch_size=128, runs=5),
    "frepo": dict(model="FRePoConvNet", optimizer="adam", lr=3e-4, use_learned_lr=False, momentum=0.0,
                  weight_decay=0.0, schedule="cosine", warmup_steps=500, final_lr_fraction=0.01, epochs=None,
                  steps=AUTO, batch_size=500, batch_order="cycle", augment="frepo", hard_label_loss="mse",
                  soft_label_loss="mse", test_batch_size=1000, runs=5),
}
PRESET_NAMES = (*PRESETS, AUTO)


def preset(name: str, **overrides: Any) -> EvalProtocol:
    """The protocol of a named preset (not ``auto``), with field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"protocol preset {name!r} is unknown. Available: {', '.join(PRESET_NAMES)}")
    return build_config(EvalProtocol, {**PRESETS[name], "preset": name, **overrides}, f"protocol[{name}]")


@dataclass(frozen=True)
class ProtocolSpec:
    """A protocol as a suite names it: a preset (or ``auto``, or none) plus field overrides."""

    name: str
    preset: str | None = None
    overrides: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, name: str, raw: Any, where: str) -> "ProtocolSpec":
        """``"dc"`` or ``{preset: auto, runs: 10}`` or ``{model: ConvNet, epochs: 300}``."""
        if isinstance(raw, str):
            raw = {"preset": raw}
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a preset name or a mapping, got {raw!r}")
        raw = dict(raw)
        chosen = raw.pop("preset", None)
        if chosen is not None and chosen not in PRESET_NAMES:
            raise ConfigError(f"{where}.preset: unknown preset {chosen!r}. Available: {', '.join(PRESET_NAMES)}")
        for key in ("version", "notes"):
            if key in raw:
                raise ConfigError(f"{where}.{key}: set by the harness, not by a suite")
        spec = cls(name, chosen, tuple(sorted(raw.items())))
        # Validate the overrides now, on any base, so a bad field fails before any work.
        spec.protocol_for({"preset": "dc"}, where)
        return spec

    def protocol_for(self, paper: str | dict[str, Any], where: str = "protocol") -> EvalProtocol:
        """This spec filled in for a method whose paper protocol is ``paper`` (``auto`` follows it)."""
        base: dict[str, Any] = {}
        chosen = self.preset
        if chosen == AUTO:
            paper_spec = paper if isinstance(paper, dict) else {"preset": paper}
            chosen = paper_spec.get("preset")
            base = {k: v for k, v in paper_spec.items() if k != "preset"}
        fields = {**PRESETS[chosen], "preset": chosen} if chosen else {}
        return build_config(EvalProtocol, {**fields, **base, **dict(self.overrides)}, where)

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, **dict(self.overrides)}


# -- resolution for one evaluated set -----------------------------------------------------------
def frepo_steps(set_size: int) -> int:
    """FRePo's evaluation length for ``set_size`` images (nearest tabulated size not above it)."""
    sizes = sorted(FREPO_STEPS_BY_SET_SIZE)
    return FREPO_STEPS_BY_SET_SIZE[sizes[max(0, bisect.bisect_right(sizes, set_size) - 1)]]


def resolve(protocol: EvalProtocol, *, paper: EvalProtocol, model: str, dataset: Any, set_size: int,
            method_dsa_strategy: str | None = None) -> EvalProtocol:
    """The concrete protocol that scores one set: every ``auto`` decided, strategies filled in.

    ``paper`` is the method's paper protocol (for ``augment: auto`` and, when the protocol has
    no preset of its own, ``epochs/steps: auto``); ``dataset`` supplies its DSA and DC
    strategies, channels and name; ``method_dsa_strategy`` is the strategy the method distilled
    with, which DSA evaluation follows unless the suite forces another (the record then says so).
    """
    notes = list(protocol.notes)
    augment = paper.augment if protocol.augment == AUTO else protocol.augment
    source = paper if protocol.augment == AUTO else protocol
    dsa_strategy, dc_strategy, frepo_strategy, align = None, None, None, source.dsa_align_corners
    if augment == "dsa":
        own = method_dsa_strategy or dataset.dsa_strategy
        dsa_strategy = source.dsa_strategy or own
        if source.dsa_strategy and source.dsa_strategy != own:
            notes.append(f"DSA strategy {source.dsa_strategy} forced by the protocol (the method distilled with {own})")
    elif augment == "dc":
        default = "crop_noise" if model == "ConvNetBN" else dataset.dc_strategy
        dc_strategy = source.dc_strategy or default
        if dc_strategy.lower() == "none":
            augment, dc_strategy = "none", None
    elif augment == "frepo":
        from_grey = dataset.channels == 1  # FRePo evaluates MNIST and Fashion-MNIST without flip
        frepo_strategy = source.frepo_strategy or ("color_crop_rotate_translate_cutout" if from_grey
                                                    else "flip_color_crop_rotate_translate_cutout")
    epochs, steps = protocol.epochs, protocol.steps
    if AUTO in (epochs, steps):
        epochs, steps = _paper_length(protocol.preset or paper.preset, augment, set_size)
        if steps is not None and protocol.schedule == "step":
            # A step-schedule (SGD) protocol counts passes; the method's paper counts optimiser steps.
            epochs, steps = 1000, None
            notes.append("epochs auto: the method's paper counts steps; 1000 epochs, the SGD papers' length")
    return replace(protocol, model=model, augment=augment, dsa_strategy=dsa_strategy, dc_strategy=dc_strategy,
                   frepo_strategy=frepo_strategy, dsa_align_corners=align, epochs=epochs, steps=steps,
                   notes=tuple(notes))


def _paper_length(rule: str | None, augment: str, set_size: int) -> tuple[int | None, int | None]:
    """(epochs, steps) by a paper's rule; DC: 300, or 1000 with augmentation (DC ``main.py``)."""
    if rule == "frepo":
        return None, frepo_steps(set_size)
    if rule in ("dsa", "dm", "mtt"):
        return 1000, None
    return (1000 if augment != "none" else 300), None


def protocol_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(EvalProtocol)]
