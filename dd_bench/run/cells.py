"""Cells: the unit of work of a suite, and what makes two cells the same.

A cell is one (method entry, dataset, ipc, seed) point with everything that changes its
*distillation* resolved: the method's full config (paper defaults filled in), the method's
``version``, the data settings (ZCA), the budget, and the IPCs a generator deploys to. Its id
is a hash of exactly that, so a re-run knows what is already distilled and a changed
parameter (or a new method version) is a new cell.

Evaluation is not part of the id: a cell carries the list of evaluations the suite asks for
(:class:`EvalRequest`: a protocol and an evaluation architecture), and a finished cell that
lacks some of them has its saved sets evaluated again, without distilling anything.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from dd_bench.budget import Budget
from dd_bench.eval.protocol import EvalProtocol


@dataclass(frozen=True)
class DataConfig:
    """Where the data lives and how it is transformed (ZCA enters the cell id; root and
    permission to download do not)."""

    root: str = "data"
    download: bool = False
    zca: bool = False
    zca_mode: str = "trace"
    zca_reg: float = 0.1

    def identity(self) -> dict[str, Any]:
        return {"zca": self.zca, "zca_mode": self.zca_mode, "zca_reg": self.zca_reg} if self.zca else {"zca": False}


@dataclass(frozen=True)
class EvalRequest:
    """One evaluation the suite wants of every set a cell produces.

    ``protocol`` is the suite's protocol filled in for the cell's method (``auto`` fields may
    remain: they are resolved per set); ``model`` the evaluation architecture. ``key`` names
    the request independently of the protocol's name in the suite.
    """

    name: str
    protocol: EvalProtocol
    model: str
    primary: bool = False  # the first protocol with the first model: snapshots are evaluated under every
    # protocol but only with the first model

    @property
    def key(self) -> str:
        blob = json.dumps({"protocol": self.protocol.to_dict(), "model": self.model}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def group(self) -> str:
        """How reports name the table this evaluation lands in."""
        return f"{self.name} · {self.model}"


def cell_identity(method: str, version: str, params: dict[str, Any], dataset: str, ipc: int, seed: int,
                  budget: dict[str, Any], data: dict[str, Any], deploy_ipc: tuple[int, ...] = ()) -> str:
    """The cell id: a hash of everything that changes a cell's distillation."""
    resolved = {"method": method, "version": version, "params": params, "dataset": dataset, "ipc": ipc,
                "seed": seed, "budget": budget, "data": data}
    if deploy_ipc:
        resolved["deploy_ipc"] = list(deploy_ipc)
    blob = json.dumps(resolved, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Cell:
    """One unit of work. Everything that can change its distillation enters ``cell_id``."""

    suite: str
    method: str
    label: str
    params: dict[str, Any]
    version: str
    dataset: str
    ipc: int
    seed: int
    budget: Budget
    data: DataConfig
    deploy_ipc: tuple[int, ...] = ()
    requests: tuple[EvalRequest, ...] = field(default_factory=tuple)

    @property
    def cell_id(self) -> str:
        return cell_identity(self.method, self.version, self.params, self.dataset, self.ipc, self.seed,
                             asdict(self.budget), self.data.identity(), self.deploy_ipc)

    @property
    def produced_ipcs(self) -> tuple[int, ...]:
        """Every IPC this cell yields a set for: the adaptation IPC, then the deployed ones."""
        return tuple(dict.fromkeys((self.ipc, *self.deploy_ipc)))

    def describe(self) -> str:
        deployed = f" (deploys {','.join(map(str, self.deploy_ipc))})" if self.deploy_ipc else ""
        return f"{self.label} {self.dataset} ipc={self.ipc}{deployed} seed={self.seed}"
