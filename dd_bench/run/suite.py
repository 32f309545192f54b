"""Suites: a YAML file -> a validated ``Suite`` -> a grid of ``Cell``s, each with its evaluations.

Validation happens before any work: an unknown key, an unknown method, dataset, model or
protocol preset, a non-positive IPC, ``deploy_ipc`` for a method that cannot deploy, or a
malformed budget is one ``ConfigError`` naming the field and the value.

A suite names datasets, methods (with ``params``, their own ``ipc``, ``deploy_ipc`` for
generators and ``data`` overrides such as ZCA), IPCs, seeds, one budget for every method
(matched by construction), and how the sets are scored:

- ``protocol:`` (one) or ``protocols:`` (a mapping name -> preset name, or a mapping that may
  start from a preset: ``paper: {preset: auto, runs: 10}``); default: one protocol named
  ``main`` with the base fields (DC's loop; ``epochs`` and ``augment`` as each method's paper);
- ``models:`` evaluation architectures (names, or the official pools ``M``, ``B``, ``MTT``):
  every protocol is run on every model; without it each protocol uses its own ``model``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dd_bench.budget import Budget
from dd_bench.config import build_config
from dd_bench.data import DATASETS
from dd_bench.errors import ConfigError
from dd_bench.eval.pools import expand_models
from dd_bench.eval.protocol import ProtocolSpec
from dd_bench.method import METHODS, Method, create_method
from dd_bench.nets import MODELS
from dd_bench.run.cells import Cell, DataConfig, EvalRequest

SUITE_KEYS = {
    "name", "description", "executor", "device", "data", "datasets", "ipc", "seeds", "budget",
    "protocol", "protocols", "models", "methods", "ray", "report",
}
METHOD_KEYS = {"name", "label", "params", "ipc", "deploy_ipc", "data"}
METHOD_DATA_KEYS = {"zca", "zca_mode", "zca_reg"}
DEFAULT_PROTOCOL = "main"


@dataclass(frozen=True)
class RayConfig:
    """Ray Tune execution: resources per cell and how many cells run at once."""

    address: str | None = None
    cpus_per_cell: float = 1.0
    gpus_per_cell: float = 0.0
    max_concurrent: int | None = None

    def __post_init__(self) -> None:
        for name in ("cpus_per_cell", "gpus_per_cell"):
            value = getattr(self, name)
            if not value >= (0 if name == "gpus_per_cell" else 1e-9) or (value > 1 and value != int(value)):
                raise ConfigError(f"ray.{name}: invalid value {value!r} "
                                  "(expected a number > 0, or >= 0 for GPUs; Ray allows fractions only below 1, e.g. 0.25)")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError(f"ray.max_concurrent: invalid value {self.max_concurrent!r} (expected an integer >= 1)")


@dataclass(frozen=True)
class ReportConfig:
    speedup_vs: str | None = None


@dataclass(frozen=True)
class MethodEntry:
    name: str
    label: str
    params: dict[str, Any]
    ipc: tuple[int, ...] | None = None
    deploy_ipc: tuple[int, ...] = ()
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    executor: Literal["local", "ray"]
    device: str
    data: DataConfig
    datasets: tuple[str, ...]
    ipc: tuple[int, ...]
    seeds: tuple[int, ...]
    budget: Budget
    protocols: tuple[ProtocolSpec, ...]
    methods: tuple[MethodEntry, ...]
    models: tuple[str, ...] | None = None
    ray: RayConfig = field(default_factory=RayConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    path: str | None = None

    def cells(self) -> list[Cell]:
        """The grid method × dataset × ipc × seed, in a stable order, each with its evaluations."""
        cells = []
        for entry in self.methods:
            method = create_method(entry.name, entry.params)
            # The full config, less fields added since results were recorded that are at the
            # value reproducing the older behaviour (so those results keep their cell ids).
            params = type(method).identity_params(_jsonable(asdict(method.config)))
            data = DataConfig(**{**asdict(self.data), **entry.data})
            requests = self.requests_for(type(method))
            for dataset in self.datasets:
                for ipc in entry.ipc or self.ipc:
                    for seed in self.seeds:
                        cells.append(Cell(self.name, METHODS.canonical(entry.name), entry.label, params,
                                          type(method).version, dataset, ipc, seed, self.budget, data,
                                          entry.deploy_ipc, requests))
        return cells

    def requests_for(self, method: type[Method]) -> tuple[EvalRequest, ...]:
        """Every (protocol, model) evaluation of a method's sets, in suite order; the first is primary."""
        requests = []
        for spec in self.protocols:
            protocol = spec.protocol_for(method.paper_protocol, f"protocols.{spec.name}")
            for model in self.models or (protocol.model,):
                requests.append(EvalRequest(spec.name, protocol, model, primary=not requests))
        return tuple(requests)


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file; any problem is a one-line ``ConfigError``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"suite: file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"suite {path}: invalid YAML{where}: {problem}") from None
    return parse_suite(raw, default_name=path.stem, path=str(path))


def parse_suite(raw: Any, default_name: str = "suite", path: str | None = None) -> Suite:
    if not isinstance(raw, dict):
        raise ConfigError(f"suite: expected a mapping at the top level, got {type(raw).__name__}")
    _reject_unknown(raw, SUITE_KEYS, "suite")
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"name: invalid value {name!r} (expected a non-empty string without '/')")
    executor = raw.get("executor", "local")
    if executor not in ("local", "ray"):
        raise ConfigError(f"executor: invalid value {executor!r} (expected 'local' or 'ray')")
    device = raw.get("device", "auto")
    if not isinstance(device, str) or not (device in ("auto", "cpu") or device.startswith("cuda")):
        raise ConfigError(f"device: invalid value {device!r} (expected auto, cpu or cuda[:N])")

    datasets = tuple(_names(raw.get("datasets"), "datasets"))
    for i, dataset in enumerate(datasets):
        if dataset not in DATASETS:
            raise ConfigError(f"datasets[{i}]: unknown dataset {dataset!r}. Available: {', '.join(DATASETS.names())}")
    datasets = tuple(DATASETS.canonical(d) for d in datasets)

    ipcs = _positive_ints(raw.get("ipc"), "ipc")
    seeds = _ints(raw.get("seeds", [0]), "seeds")
    budget = _section(Budget, raw.get("budget"), "budget", required=True)
    protocols = _protocols(raw)
    models = _models(raw.get("models"))
    data = _section(DataConfig, raw.get("data", {}), "data")
    if data.train_per_class is not None and (isinstance(data.train_per_class, bool)
                                             or not isinstance(data.train_per_class, int) or data.train_per_class < 1):
        raise ConfigError(f"data.train_per_class: expected a positive integer, got {data.train_per_class!r}")
    ray = _section(RayConfig, raw.get("ray", {}), "ray")
    report = _section(ReportConfig, raw.get("report", {}), "report")
    methods = _methods(raw.get("methods"), ipcs)
    if report.speedup_vs is not None and report.speedup_vs not in {m.label for m in methods}:
        raise ConfigError(f"report.speedup_vs: {report.speedup_vs!r} is not a method label of this suite")

    suite = Suite(name, str(raw.get("description", "")), executor, device, data, datasets, ipcs, seeds, budget,
                  protocols, methods, models, ray, report, path)
    for cell in suite.cells():  # builds every method config once, so a bad parameter fails here, before any work
        for request in cell.requests:
            if request.model not in MODELS:
                raise ConfigError(f"protocols.{request.name}.model: unknown model {request.model!r}. "
                                  f"Available: {', '.join(MODELS.names())}")
    return suite


def _protocols(raw: dict[str, Any]) -> tuple[ProtocolSpec, ...]:
    if "protocol" in raw and "protocols" in raw:
        raise ConfigError("protocols: give `protocol` (one) or `protocols` (several), not both")
    if "protocols" not in raw:
        return (ProtocolSpec.parse(DEFAULT_PROTOCOL, raw.get("protocol") or {}, "protocol"),)
    specs = raw["protocols"]
    if not isinstance(specs, dict) or not specs:
        raise ConfigError(f"protocols: expected a non-empty mapping name -> preset or fields, got {specs!r}")
    for name in specs:
        if not isinstance(name, str) or not name or "·" in name:
            raise ConfigError(f"protocols: invalid protocol name {name!r}")
    return tuple(ProtocolSpec.parse(name, spec, f"protocols.{name}") for name, spec in specs.items())


def _models(raw: Any) -> tuple[str, ...] | None:
    if raw is None:
        return None
    names = _names(raw, "models")
    models = expand_models(names)
    for i, model in enumerate(models):
        if model not in MODELS:
            raise ConfigError(f"models[{i}]: unknown model {model!r}. Available: {', '.join(MODELS.names())} "
                              "(or the pools M, B, MTT)")
    return tuple(MODELS.canonical(m) for m in models)


def _methods(raw: Any, suite_ipcs: tuple[int, ...]) -> tuple[MethodEntry, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"methods: expected a non-empty list, got {raw!r}")
    entries, labels = [], set()
    for i, item in enumerate(raw):
        where = f"methods[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigError(f"{where}: expected a method name or a mapping with 'name', got {item!r}")
        _reject_unknown(item, METHOD_KEYS, where)
        name = item["name"]
        if not isinstance(name, str) or name not in METHODS:
            raise ConfigError(f"{where}.name: unknown method {name!r}. Available: {', '.join(METHODS.names())}")
        label = item.get("label", METHODS.canonical(name))
        if label in labels:
            raise ConfigError(f"{where}.label: duplicate label {label!r}; give each entry its own label")
        labels.add(label)
        params = item.get("params") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{where}.params: expected a mapping, got {params!r}")
        method = METHODS.get(name)
        build_config(method.Config, params, f"{where}.params")
        ipc = _positive_ints(item["ipc"], f"{where}.ipc") if "ipc" in item else None
        deploy_ipc = _positive_ints(item["deploy_ipc"], f"{where}.deploy_ipc") if "deploy_ipc" in item else ()
        if deploy_ipc and not method.supports_deploy():
            raise ConfigError(f"{where}.deploy_ipc: method {name!r} cannot deploy at other IPCs (it has no deploy()); "
                              f"give it `ipc: {list(deploy_ipc)}` instead")
        data = item.get("data") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{where}.data: expected a mapping, got {data!r}")
        _reject_unknown(data, METHOD_DATA_KEYS, f"{where}.data")
        build_config(DataConfig, data, f"{where}.data")
        entries.append(MethodEntry(name, label, params, ipc, tuple(dict.fromkeys(deploy_ipc)), data))
    return tuple(entries)


def _section(config_type: type, raw: Any, where: str, required: bool = False) -> Any:
    if raw is None:
        if required:
            raise ConfigError(f"{where}: missing (required)")
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    return build_config(config_type, raw, where)


def _reject_unknown(mapping: dict, known: set[str], where: str) -> None:
    for key in mapping:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r} (value {mapping[key]!r}); known keys: {', '.join(sorted(known))}")


def _names(raw: Any, where: str) -> list[str]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw or not all(isinstance(v, str) for v in raw):
        raise ConfigError(f"{where}: expected a non-empty list of names, got {raw!r}")
    return raw


def _ints(raw: Any, where: str) -> tuple[int, ...]:
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: expected a non-empty list of integers, got {raw!r}")
    for i, value in enumerate(raw):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}[{i}]: invalid value {value!r} (expected an integer)")
    return tuple(raw)


def _positive_ints(raw: Any, where: str) -> tuple[int, ...]:
    values = _ints(raw, where)
    for i, value in enumerate(values):
        if value <= 0:
            raise ConfigError(f"{where}[{i}]: invalid value {value!r} (expected an integer >= 1)")
    return values


def _jsonable(value: Any) -> Any:
    """Configs as plain JSON values (tuples become lists) so the cell hash is stable."""
    return json.loads(json.dumps(value, default=str))

