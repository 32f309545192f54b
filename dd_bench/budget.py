"""How much distillation a cell gets: a number of steps and/or seconds, whichever ends first."""

from __future__ import annotations

from dataclasses import dataclass

from dd_bench.errors import ConfigError


@dataclass(frozen=True)
class Budget:
    """``steps`` and/or ``seconds`` of distillation (whichever ends first).

    One step is one update of the synthetic data (DESIGN.md, "What a step is"); a method that
    schedules something over its run (a cosine learning rate) reads ``steps`` from its
    ``RunContext``. ``snapshot_every`` takes a copy of the synthetic set every so many steps,
    evaluated after distillation for accuracy-vs-steps curves and time-to-accuracy; its cost
    is excluded from the distillation time.
    """

    steps: int | None = None
    seconds: float | None = None
    snapshot_every: int | None = None

    def __post_init__(self) -> None:
        if self.steps is None and self.seconds is None:
            raise ConfigError("budget: give steps or seconds (or both)")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0):
            raise ConfigError(f"budget.steps: invalid value {self.steps!r} (expected an integer >= 0)")
        if self.seconds is not None and not self.seconds > 0:
            raise ConfigError(f"budget.seconds: invalid value {self.seconds!r} (expected > 0)")
        if self.snapshot_every is not None and (not isinstance(self.snapshot_every, int) or self.snapshot_every < 1):
            raise ConfigError(f"budget.snapshot_every: invalid value {self.snapshot_every!r} (expected an integer >= 1)")

    def describe(self) -> str:
        parts = []
        if self.steps is not None:
            parts.append(f"{self.steps} steps")
        if self.seconds is not None:
            parts.append(f"{self.seconds:g} s")
        return " or ".join(parts)
