"""Aggregating the result store into frames: accuracy cells, cost and speedup, accuracy curves.

Reads records; never recomputes a result, only aggregates what the records hold:
- an accuracy cell is mean ± std (population std, as the papers report) over every evaluation
  run of every seed of a (eval protocol, dataset, ipc, method) group, as the papers pool their
  5 sets × 20 nets;
- records are grouped by evaluation protocol (the protocol minus the augmentation, which each
  method resolves to its paper's); several eval architectures give one table each;
- "random" and "full" are reference columns: shown, never bolded; "full" ignores ipc, so its
  cells pool every record of the dataset.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from dd_bench.errors import ConfigError
from dd_bench.run.store import ResultStore

log = logging.getLogger(__name__)

SETTINGS_FILE = "report.json"

REFERENCE_METHODS = ("random", "full")
IPC_FREE_METHODS = ("full",)
PER_METHOD_PROTOCOL = ("augment", "dsa_strategy")  # resolved per method; not part of the table key
FAILED, MISSING, PARTIAL, OK = "failed", "missing", "partial", "ok"
NOT_REACHED = "not reached"
EPS = 1e-9


# -- reading --------------------------------------------------------------------------------
def records_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per cell record, with the columns tables and plots need."""
    rows = []
    for r in records:
        protocol, peaks = r.get("protocol") or {}, r.get("peak_memory_mb") or {}
        rows.append({
            "cell_id": r["cell_id"], "status": r["status"], "method": r["method"], "label": r["label"],
            "finished_at": r.get("finished_at") or "",
            "dataset": r["dataset"], "ipc": int(r["ipc"]), "seed": int(r["seed"]),
            "accuracies": _finite(r.get("accuracies")), "steps": int(r.get("steps") or 0),
            "prepare_seconds": _num(r.get("prepare_seconds")),
            "distill_seconds": _num(r.get("distill_seconds")), "evaluate_seconds": _num(r.get("evaluate_seconds")),
            "seconds_per_step": _num(r.get("seconds_per_step")), "peak_prepare_mb": _num(peaks.get("prepare")),
            "peak_distill_mb": _num(peaks.get("distill")), "peak_evaluate_mb": _num(peaks.get("evaluate")),
            "memory_kind": r.get("memory_kind", ""), "device": r.get("device", ""), "protocol": protocol,
            "label_type": r.get("label_type"),
            "eval_key": json.dumps({k: v for k, v in protocol.items() if k not in PER_METHOD_PROTOCOL}, sort_keys=True),
            "budget": r.get("budget") or {}, "snapshots": r.get("snapshots") or [],
            "synthetic_set": r.get("synthetic_set"), "dataset_info": r.get("dataset_info") or {},
            "error": r.get("error"),
        })
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["group"] = _group_names(frame)
    # A changed method config is a new cell; its older records would otherwise be pooled with it.
    newest = frame.sort_values("finished_at", kind="stable").duplicated(
        ["group", "dataset", "ipc", "label", "seed"], keep="last").sort_index()
    if newest.any():
        log.warning("report: %d superseded record(s) left out (same method, dataset, ipc, seed and eval "
                    "protocol as a newer record): %s", int(newest.sum()), ", ".join(frame["cell_id"][newest]))
    return frame[~newest].reset_index(drop=True)


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _finite(values: Any) -> list[float]:
    """Accuracies as stored; a non-finite one was stored as null and is left out."""
    return [float(v) for v in values or [] if v is not None]


def _group_names(frame: pd.DataFrame) -> pd.Series:
    keys = list(dict.fromkeys(frame["eval_key"]))
    models = [json.loads(k).get("model", "?") for k in keys]
    unique = len(set(models)) == len(models)
    names = {k: m if unique else f"{m} (protocol {i + 1})" for i, (k, m) in enumerate(zip(keys, models))}
    return frame["eval_key"].map(names)


def store_frame(directory: str | Path) -> pd.DataFrame:
    return records_frame(ResultStore(directory).latest().values())


def method_order(frame: pd.DataFrame) -> list[str]:
    """Labels in suite order, with the random-real column first and the full-data column last."""
    methods = dict(zip(frame["label"], frame["method"]))
    labels = list(dict.fromkeys(frame["label"]))
    rank = {"random": 0, "full": 2}
    return sorted(labels, key=lambda lab: (rank.get(methods[lab], 1), labels.index(lab)))


def pooled(accuracy_lists: Iterable[list[float]]) -> tuple[float, float, int]:
    values = [a for accs in accuracy_lists for a in accs]
    if not values:
        return float("nan"), float("nan"), 0
    return float(np.mean(values)), float(np.std(values)), len(values)


# -- accuracy -------------------------------------------------------------------------------
def accuracy_cells(frame: pd.DataFrame, digits: int = 1) -> pd.DataFrame:
    """Long form: one row per (group, dataset, ipc, method) with status, mean, std, n, best."""
    out = []
    labels = method_order(frame)
    methods = dict(zip(frame["label"], frame["method"]))
    for (group, dataset), data in frame.groupby(["group", "dataset"], sort=False):
        expected = data["seed"].nunique()
        present = [lab for lab in labels if lab in set(data["label"])]
        for ipc in sorted(data["ipc"].unique()):
            for label in present:
                ipc_free = methods[label] in IPC_FREE_METHODS
                cells = data[(data["label"] == label) & (ipc_free | (data["ipc"] == ipc))]
                ok = cells[cells["status"] == OK]
                mean, std, n = pooled(ok["accuracies"])
                seeds = ok["seed"].nunique()
                status = (MISSING if cells.empty else FAILED if ok.empty
                          else PARTIAL if seeds < expected and not ipc_free else OK)
                out.append({"group": group, "dataset": dataset, "ipc": int(ipc), "method": label,
                            "method_name": methods[label], "reference": methods[label] in REFERENCE_METHODS,
                            "status": status, "mean": mean, "std": std, "n_runs": n, "n_seeds": seeds,
                            "seeds_expected": expected})
    cells = pd.DataFrame(out)
    cells["best"] = False
    for _, row in cells.groupby(["group", "dataset", "ipc"], sort=False):
        scored = row[~row["reference"] & row["status"].isin([OK, PARTIAL])]
        if not scored.empty:
            top = scored["mean"].round(digits).max()
            cells.loc[scored.index[scored["mean"].round(digits) == top], "best"] = True
    return cells


def cell_text(cell: Any, digits: int = 1) -> str:
    """``mean ± std``, or why there is no number."""
    if cell.status in (MISSING, FAILED):
        return cell.status
    text = f"{cell.mean:.{digits}f} ± {cell.std:.{digits}f}"
    return text + (f" ({cell.n_seeds}/{cell.seeds_expected} seeds)" if cell.status == PARTIAL else "")


def accuracy_wide(cells: pd.DataFrame, group: str, render: Any) -> pd.DataFrame:
    """Rows (dataset, ipc), columns methods; ``render(cell) -> str`` makes each entry."""
    part = cells[cells["group"] == group]
    texts = part.assign(text=[render(c) for c in part.itertuples()])
    wide = texts.pivot(index=["dataset", "ipc"], columns="method", values="text")
    wide = wide.reindex(index=pd.MultiIndex.from_frame(part[["dataset", "ipc"]].drop_duplicates()),
                        columns=list(dict.fromkeys(part["method"])))
    return wide.rename_axis(index=["dataset", "IPC"], columns=None)


# -- cost, speedup, time to accuracy --------------------------------------------------------
def curve_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Accuracy over distillation: snapshots and final sets, pooled over seeds at each step."""
    points = []
    for r in frame[frame["status"] == OK].itertuples():
        for snap in r.snapshots:
            points.append((r.group, r.dataset, r.ipc, r.label, snap["step"], _num(snap.get("distill_seconds")),
                           _finite(snap.get("accuracies")), False))
        points.append((r.group, r.dataset, r.ipc, r.label, r.steps, r.distill_seconds, r.accuracies, True))
    raw = pd.DataFrame(points, columns=["group", "dataset", "ipc", "method", "step", "distill_seconds",
                                        "accuracies", "final"])
    rows = []
    for key, g in raw.groupby(["group", "dataset", "ipc", "method", "step"], sort=False):
        mean, std, n = pooled(g["accuracies"])
        rows.append((*key, float(g["distill_seconds"].mean()), mean, std, n, bool(g["final"].all())))
    columns = ["group", "dataset", "ipc", "method", "step", "distill_seconds", "mean", "std", "n_runs", "final"]
    return pd.DataFrame(rows, columns=columns).sort_values(columns[:5])


def time_to_accuracy(points: pd.DataFrame, target: float, interpolate: bool = False) -> tuple[float, int] | None:
    """Distillation seconds (and step) at which the mean accuracy first reaches ``target``.

    Without ``interpolate`` it is the first evaluated point (snapshot or final set) reaching it;
    with it, linear interpolation between that point and the one before. None when never reached.
    """
    previous = None
    for point in points.sort_values("step").itertuples():
        if point.mean >= target - EPS:
            if interpolate and previous is not None and point.mean > previous.mean:
                share = (target - previous.mean) / (point.mean - previous.mean)
                return previous.distill_seconds + share * (point.distill_seconds - previous.distill_seconds), point.step
            return float(point.distill_seconds), int(point.step)
        previous = point
    return None


def cost_frame(frame: pd.DataFrame, cells: pd.DataFrame, speedup_vs: str | None = None,
               interpolate: bool = False) -> pd.DataFrame:
    """One row per (group, dataset, ipc, method): phase times, memory, device, speedup, time to accuracy."""
    order = {label: i for i, label in enumerate(method_order(frame))}
    curves = curve_frame(frame)
    rows = []
    for (group, dataset, ipc, label), g in frame.groupby(["group", "dataset", "ipc", "label"], sort=False):
        ok = g[g["status"] == OK]
        rows.append({
            "group": group, "dataset": dataset, "ipc": ipc, "method": label,
            "status": OK if len(ok) == len(g) else FAILED if ok.empty else PARTIAL, "seeds": len(ok),
            "steps": ok["steps"].mean(), "prepare_seconds": ok["prepare_seconds"].max(),
            "distill_seconds": ok["distill_seconds"].mean(), "seconds_per_step": ok["seconds_per_step"].mean(),
            "evaluate_seconds": ok["evaluate_seconds"].mean(), "peak_prepare_mb": ok["peak_prepare_mb"].max(),
            "peak_distill_mb": ok["peak_distill_mb"].max(), "peak_evaluate_mb": ok["peak_evaluate_mb"].max(),
            "memory_kind": ", ".join(dict.fromkeys(ok["memory_kind"])),
            "device": ", ".join(dict.fromkeys(ok["device"])),
        })
    cost = pd.DataFrame(rows)
    cost = cost.assign(_o=cost["method"].map(order)).sort_values(["group", "dataset", "ipc", "_o"], kind="stable")
    cost = cost.drop(columns="_o").reset_index(drop=True)
    if speedup_vs is None:
        return cost
    keys = ["group", "dataset", "ipc"]
    ref = cost[cost["method"] == speedup_vs][keys + ["distill_seconds", "prepare_seconds"]]
    target = cells[(cells["method"] == speedup_vs) & cells["status"].isin([OK, PARTIAL])][keys + ["mean"]]
    ref = ref.rename(columns={"distill_seconds": "_ref_d", "prepare_seconds": "_ref_p"})
    cost = cost.merge(ref, on=keys, how="left")
    cost = cost.merge(target.rename(columns={"mean": "tta_target"}), on=keys, how="left")
    # No speedup from a zero or unknown time, nor for selection baselines (no distillation steps):
    # their microseconds of selection would show as a meaningless 1e5x.
    distills = cost["steps"] > 0
    positive = lambda x: x.where((x > 0) & distills)  # noqa: E731
    cost["speedup"] = cost["_ref_d"] / positive(cost["distill_seconds"])
    cost["speedup_incl_prepare"] = ((cost["_ref_d"] + cost["_ref_p"])
                                    / positive(cost["distill_seconds"] + cost["prepare_seconds"]))
    points = {key: g for key, g in curves.groupby(keys + ["method"])}
    reached = [time_to_accuracy(points[key], t, interpolate) if t == t and key in points else None
               for key, t in zip(zip(cost["group"], cost["dataset"], cost["ipc"], cost["method"]), cost["tta_target"])]
    cost["tta_seconds"] = [r[0] if r else np.nan for r in reached]
    cost["tta_step"] = [r[1] if r else np.nan for r in reached]
    cost["tta_reached"] = [np.nan if t != t else r is not None for r, t in zip(reached, cost["tta_target"])]
    return cost.drop(columns=["_ref_d", "_ref_p"])


# -- protocol and notes ---------------------------------------------------------------------
def protocol_line(frame: pd.DataFrame) -> str:
    """Eval arch, epochs, optimiser, augmentation, label type, runs, seeds, budget and device in one line;
    a field that differs between methods lists each value with its methods."""
    ok = frame[frame["status"] == OK]
    values: dict[str, dict[str, list[str]]] = {}
    for r in (ok if not ok.empty else frame).itertuples():
        for name, value in _protocol_fields(r).items():
            labels = values.setdefault(name, {}).setdefault(value, [])
            labels += [] if r.label in labels else [r.label]
    parts = [f"{name}: " + (next(iter(by)) if len(by) == 1 else
                            "; ".join(f"{v} [{', '.join(ls)}]" for v, ls in by.items()))
             for name, by in values.items()]
    seeds = sorted(frame["seed"].unique())
    parts.insert(6, f"seeds: {len(seeds)} ({', '.join(map(str, seeds))}), runs and seeds pooled")
    return "Protocol: " + " | ".join(parts)


def _protocol_fields(r: Any) -> dict[str, str]:
    p = r.protocol
    return {"eval": str(p.get("model", "?")), "epochs": str(p.get("epochs", "?")),
            "optimiser": f"SGD lr {p.get('lr', '?')}{' (or learned)' if p.get('use_learned_lr') else ''}, "
                         f"mom {p.get('momentum', '?')}, wd {p.get('weight_decay', '?')}, "
                         f"batch {p.get('batch_size', '?')}",
            "aug": f"DSA({p.get('dsa_strategy')})" if p.get("augment") == "dsa" else str(p.get("augment", "?")),
            "labels": r.label_type or "?", "runs per set": str(p.get("runs", "?")), "budget": budget_text(r.budget),
            "device": r.device or "?"}


def budget_text(budget: dict[str, Any]) -> str:
    parts = [f"{budget['steps']} steps"] if budget.get("steps") is not None else []
    parts += [f"{budget['seconds']:g} s"] if budget.get("seconds") is not None else []
    return " or ".join(parts) or "?"


def failure_lines(frame: pd.DataFrame) -> list[str]:
    failed = frame[frame["status"] == FAILED]
    return [f"FAILED {r.label} {r.dataset} ipc={r.ipc} seed={r.seed} [{r.group}]: {r.error}"
            for r in failed.itertuples()]


# -- the report -----------------------------------------------------------------------------
@dataclass
class Report:
    """Everything the renderers and plots need, aggregated once from the store."""

    directory: Path
    frame: pd.DataFrame
    cells: pd.DataFrame
    cost: pd.DataFrame
    curves: pd.DataFrame
    speedup_vs: str | None
    interpolate: bool

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(self.frame["group"]))


def build_report(directory: str | Path, speedup_vs: str | None = None, interpolate: bool = False) -> Report | None:
    """Aggregate the store (None when it holds no records); ``speedup_vs`` must be a method label."""
    directory = Path(directory)
    frame = store_frame(directory)
    if frame.empty:
        return None
    if speedup_vs is not None and speedup_vs not in set(frame["label"]):
        by_name = frame[frame["method"] == speedup_vs]["label"].unique()
        if len(by_name) != 1:
            raise ConfigError(f"speedup_vs: {speedup_vs!r} is not a method in {directory} "
                              f"(available: {', '.join(method_order(frame))})")
        speedup_vs = str(by_name[0])
    cells = accuracy_cells(frame)
    return Report(directory, frame, cells, cost_frame(frame, cells, speedup_vs, interpolate), curve_frame(frame),
                  speedup_vs, interpolate)


def stored_speedup_vs(directory: str | Path) -> str | None:
    """The reference method saved by an earlier ``write_report`` (so a later run reuses it)."""
    path = Path(directory) / SETTINGS_FILE
    return json.loads(path.read_text()).get("speedup_vs") if path.exists() else None


def speedup_vs_from_suite(path: str | Path) -> str | None:
    """``report.speedup_vs`` of a suite YAML file (None when absent)."""
    import yaml

    if not Path(path).is_file():
        raise ConfigError(f"suite: file not found: {path}")
    raw = yaml.safe_load(Path(path).read_text()) or {}
    return ((raw.get("report") or {}) if isinstance(raw, dict) else {}).get("speedup_vs")


