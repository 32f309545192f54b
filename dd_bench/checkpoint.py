"""Crash-safe files for long one-off builds (expert trajectories, meta-trained generators).

A build that is interrupted -- Ctrl-C, a crash, SIGKILL -- must resume from its last
checkpoint instead of starting again, and must never read a half-written file. Everything a
method writes into its artifact folder should therefore go through :func:`save_atomic`, and a
resumable build reads its progress back with :func:`load_checkpoint`::

    state = load_checkpoint(directory / "progress.pt") or {"done": 0, "rng": gen.get_state()}
    gen.set_state(state["rng"])
    for i in range(state["done"], total):
        ...
        save_atomic({"done": i + 1, "rng": gen.get_state(), ...}, directory / "progress.pt")

Saving the random generator's state with the progress is what makes the resumed build
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary name, flushed to disk, then renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Any | None:
    """What :func:`save_atomic` wrote at ``path``, or None when nothing was saved yet.

    Loaded with ``weights_only=True``: tensors, numbers, strings and containers of them only.
    """
    path = Path(path)
    if not path.is_file():
        return None
    return torch.load(path, map_location=map_location, weights_only=True)
