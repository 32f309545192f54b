"""Aggregating the result store into frames: accuracy cells, costs and speedups, accuracy curves.

Reads records; never recomputes a result, only aggregates what the records hold:

- one row per evaluation: a record (one cell) holds an evaluation per (set, protocol,
  architecture), and snapshot evaluations carry their step; a table is one *group*, a
  protocol of the suite on one architecture (``"main · ConvNet"``);
- an accuracy cell is mean ± std (population std, as the papers report) over every network
  of every seed of a (group, dataset, ipc, method), as the papers pool their 5 sets × 20 nets;
- what a method *is* comes from the traits its records carry (``reference``: "lower" is the
  baseline of the gain column, random real images; "upper" the whole-data reference; both are
  shown, never bolded; ``ipc_free``: one set for every IPC), never from its name;
- records made by an older version of a method than the one installed are left out, with a
  line saying so; evaluations made by an older evaluation version form their own table.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import yaml

from dd_bench.errors import ConfigError
from dd_bench.eval.protocol import EVAL_VERSION
from dd_bench.method import METHODS
from dd_bench.run.store import ResultStore

log = logging.getLogger(__name__)

SETTINGS_FILE = "report.json"
FAILED, MISSING, PARTIAL, OK = "failed", "missing", "partial", "ok"
NOT_REACHED = "not reached"
EPS = 1e-9


# -- reading --------------------------------------------------------------------------------
def current_version(method: str) -> str | None:
    """The installed version of a method (None when it is not installed)."""
    return METHODS.get(method).version if method in METHODS else None


def records_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per evaluation of a finished cell, one row per failed cell (group None)."""
    rows = []
    for r in records:
        base = _record_columns(r)
        if r["status"] != OK:
            rows.append({**base, "group": None, "protocol_name": None, "model": None, "eval_ipc": r["ipc"],
                         "step": None, "final": True, "accuracies": [], "protocol": {}, "protocol_text": "",
                         "eval_version": None, "label_type": None, "eval_lr": None, "eval_seconds": 0.0,
                         "produce_seconds": np.nan, "synthetic_set": None, "point_seconds": np.nan})
            continue
        sets = {s["ipc"]: s for s in r.get("sets", [])}
        snaps = {s["step"]: s for s in r.get("snapshots", [])}
        for e in r.get("evaluations", []):
            version = e.get("eval_version", EVAL_VERSION)
            group = f"{e.get('protocol_name', 'main')} · {e.get('model', '?')}"
            if version != EVAL_VERSION:
                group += f" (evaluation v{version})"
            step = e.get("step")
            produced = sets.get(e["ipc"], {})
            produce = float(produced.get("produce_seconds") or 0.0)
            if step is None:  # a final set: adaptation (init + steps) + its own production
                point = base["init_seconds"] + base["distill_seconds"] + produce
            else:
                point = base["init_seconds"] + float(snaps.get(step, {}).get("distill_seconds") or 0.0)
            rows.append({**base, "group": group, "protocol_name": e.get("protocol_name"), "model": e.get("model"),
                         "eval_ipc": int(e["ipc"]), "step": step, "final": step is None,
                         "accuracies": _finite(e.get("accuracies")), "protocol": e.get("protocol") or {},
                         "protocol_text": e.get("protocol_text", ""), "eval_version": version,
                         "label_type": e.get("label_type"), "eval_lr": e.get("lr"),
                         "eval_seconds": float(e.get("seconds") or 0.0), "produce_seconds": produce,
                         "synthetic_set": produced.get("path"), "point_seconds": point})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["ipc"] = frame["eval_ipc"].astype(int)
    return frame


def _record_columns(r: dict[str, Any]) -> dict[str, Any]:
    traits = r.get("traits") or {}
    peaks = r.get("peak_memory_mb") or {}
    return {
        "cell_id": r["cell_id"], "status": r["status"], "method": r["method"], "label": r["label"],
        "method_version": str(r.get("method_version", "1")), "reference": traits.get("reference"),
        "ipc_free": bool(traits.get("ipc_free", False)), "iterative": bool(traits.get("iterative", True)),
        "finished_at": r.get("finished_at") or "", "dataset": r["dataset"], "adapt_ipc": int(r["ipc"]),
        "deploy_ipc": list(r.get("deploy_ipc") or []), "seed": int(r["seed"]), "steps": int(r.get("steps") or 0),
        "prepare_seconds": _num(r.get("prepare_seconds")), "prepare_cached": bool(r.get("prepare_cached")),
        "artifact_key": (r.get("artifact") or {}).get("key"), "init_seconds": _num(r.get("init_seconds"), 0.0),
        "distill_seconds": _num(r.get("distill_seconds"), 0.0), "seconds_per_step": _num(r.get("seconds_per_step")),
        "evaluate_seconds": _num(r.get("evaluate_seconds")), "peak_prepare_mb": _num(peaks.get("prepare")),
        "peak_distill_mb": _num(peaks.get("distill")), "peak_evaluate_mb": _num(peaks.get("evaluate")),
        "memory_kind": r.get("memory_kind", ""), "budget": r.get("budget") or {},
        # A GPU shared with other cells inflates timings: the device says so wherever it is shown.
        "device": r.get("device", "") + (f" ({r['gpu_share']:g} GPU, shared)" if (r.get("gpu_share") or 1) < 1 else ""),
        "dataset_info": r.get("dataset_info") or {}, "error": r.get("error"),
    }


def _num(value: Any, default: float = float("nan")) -> float:
    return default if value is None else float(value)


def _finite(values: Any) -> list[float]:
    """Accuracies as stored; a non-finite one was stored as null and is left out."""
    return [float(v) for v in values or [] if v is not None]


def drop_stale_and_superseded(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Leave out records of an older method version and records superseded by a newer one of the
    same (method label, dataset, ipc, seed); return the kept rows and notes saying what was left out."""
    notes = []
    installed = {m: current_version(m) for m in frame["method"].unique()}
    stale = frame.apply(lambda r: installed[r["method"]] is not None and r["method_version"] != installed[r["method"]],
                        axis=1)
    if stale.any():
        for (method, version), part in frame[stale].groupby(["method", "method_version"]):
            notes.append(f"Left out: {part['cell_id'].nunique()} record(s) of {method} made by its version {version}; "
                         f"the installed version is {installed[method]} (run the suite again to refresh them).")
        frame = frame[~stale]
    cells = frame.drop_duplicates("cell_id")
    key = ["label", "dataset", "adapt_ipc", "seed"]
    newest = cells.sort_values("finished_at", kind="stable").drop_duplicates(key, keep="last")["cell_id"]
    superseded = ~frame["cell_id"].isin(set(newest))
    if superseded.any():
        log.warning("report: %d superseded record(s) left out (same method label, dataset, ipc and seed as a newer "
                    "record): %s", frame.loc[superseded, "cell_id"].nunique(),
                    ", ".join(dict.fromkeys(frame.loc[superseded, "cell_id"])))
        frame = frame[~superseded]
    return frame.reset_index(drop=True), notes


def store_frame(directory: str | Path) -> tuple[pd.DataFrame, list[str]]:
    frame = records_frame(ResultStore(directory).latest().values())
    if frame.empty:
        return frame, []
    return drop_stale_and_superseded(frame)


def method_order(frame: pd.DataFrame) -> list[str]:
    """Labels in suite order, with the lower reference first and the upper reference last."""
    refs = dict(zip(frame["label"], frame["reference"]))
    labels = list(dict.fromkeys(frame["label"]))
    rank = {"lower": 0, "upper": 2}
    return sorted(labels, key=lambda lab: (rank.get(refs[lab], 1), labels.index(lab)))


def pooled(accuracy_lists: Iterable[list[float]]) -> tuple[float, float, int]:
    values = [a for accs in accuracy_lists for a in accs]
    if not values:
        return float("nan"), float("nan"), 0
    return float(np.mean(values)), float(np.std(values)), len(values)


def groups_of(frame: pd.DataFrame) -> list[str]:
    return [g for g in dict.fromkeys(frame["group"]) if isinstance(g, str)]


# -- accuracy -------------------------------------------------------------------------------
def accuracy_cells(frame: pd.DataFrame, digits: int = 1) -> pd.DataFrame:
    """Long form: one row per (group, dataset, ipc, method) with status, mean, std, n, best, gain."""
    out = []
    labels = method_order(frame)
    refs = {label: (ref if isinstance(ref, str) else None) for label, ref in zip(frame["label"], frame["reference"])}
    ipc_free = dict(zip(frame["label"], frame["ipc_free"]))
    failed = frame[frame["status"] == FAILED]
    finals = frame[(frame["status"] == OK) & frame["final"]]
    for group in groups_of(frame):
        in_group = finals[finals["group"] == group]
        for dataset in dict.fromkeys(in_group["dataset"]):
            data = in_group[in_group["dataset"] == dataset]
            expected = frame[frame["dataset"] == dataset]["seed"].nunique()
            present = [lab for lab in labels if lab in set(data["label"]) | set(failed["label"])]
            for ipc in sorted(data["ipc"].unique()):
                for label in present:
                    ok = data[(data["label"] == label) & (ipc_free[label] | (data["ipc"] == ipc))]
                    bad = failed[(failed["label"] == label) & (failed["dataset"] == dataset)
                                 & (ipc_free[label] | (failed["adapt_ipc"] == ipc))]
                    mean, std, n = pooled(ok["accuracies"])
                    seeds = ok["seed"].nunique()
                    status = (MISSING if ok.empty and bad.empty else FAILED if ok.empty
                              else PARTIAL if seeds < expected and not ipc_free[label] else OK)
                    out.append({"group": group, "dataset": dataset, "ipc": int(ipc), "method": label,
                                "reference": refs[label] is not None, "lower_reference": refs[label] == "lower",
                                "status": status, "mean": mean, "std": std, "n_runs": n, "n_seeds": seeds,
                                "seeds_expected": expected})
    cells = pd.DataFrame(out)
    if cells.empty:
        return cells
    cells["best"] = False
    cells["gain"] = np.nan
    for _, row in cells.groupby(["group", "dataset", "ipc"], sort=False):
        scored = row[~row["reference"] & row["status"].isin([OK, PARTIAL])]
        if not scored.empty:
            top = scored["mean"].round(digits).max()
            cells.loc[scored.index[scored["mean"].round(digits) == top], "best"] = True
        base = row[row["lower_reference"] & row["status"].isin([OK, PARTIAL])]
        if len(base) == 1:  # DD-Ranking's improvement over random (IOR), in points
            others = row.index[~row["reference"] & row["status"].isin([OK, PARTIAL])]
            cells.loc[others, "gain"] = cells.loc[others, "mean"] - float(base["mean"].iloc[0])
    return cells


def cell_text(cell: Any, digits: int = 1, with_gain: bool = True) -> str:
    """``mean ± std`` (and the gain over the lower reference), or why there is no number."""
    if cell.status in (MISSING, FAILED):
        return cell.status
    text = f"{cell.mean:.{digits}f} ± {cell.std:.{digits}f}"
    if with_gain and cell.gain == cell.gain:
        text += f" ({cell.gain:+.{digits}f})"
    return text + (f" ({cell.n_seeds}/{cell.seeds_expected} seeds)" if cell.status == PARTIAL else "")


def accuracy_wide(cells: pd.DataFrame, group: str, render: Any) -> pd.DataFrame:
    """Rows (dataset, ipc), columns methods; ``render(cell) -> str`` makes each entry."""
    part = cells[cells["group"] == group]
    texts = part.assign(text=[render(c) for c in part.itertuples()])
    wide = texts.pivot(index=["dataset", "ipc"], columns="method", values="text")
    wide = wide.reindex(index=pd.MultiIndex.from_frame(part[["dataset", "ipc"]].drop_duplicates()),
                        columns=list(dict.fromkeys(part["method"])))
    return wide.rename_axis(index=["dataset", "IPC"], columns=None)


def cross_arch_wide(cells: pd.DataFrame, protocol_name: str, render: Any) -> pd.DataFrame | None:
    """Rows (dataset, ipc, method), columns evaluation architectures, for one protocol of the suite;
    None when the suite evaluated that protocol on a single architecture."""
    part = cells[cells["group"].str.split(" · ").str[0] == protocol_name].copy()
    part["architecture"] = part["group"].str.split(" · ").str[1]
    if part["architecture"].nunique() < 2:
        return None
    texts = part.assign(text=[render(c) for c in part.itertuples()])
    wide = texts.pivot(index=["dataset", "ipc", "method"], columns="architecture", values="text")
    order = part[["dataset", "ipc", "method"]].drop_duplicates()
    wide = wide.reindex(index=pd.MultiIndex.from_frame(order), columns=list(dict.fromkeys(part["architecture"])))
    return wide.rename_axis(index=["dataset", "IPC", "method"], columns=None)


# -- cost, speedup, time to accuracy --------------------------------------------------------
def curve_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Accuracy over distillation at the adaptation IPC (snapshots and final sets), pooled over seeds.

    ``seconds`` is what producing that set had cost: init + steps so far (+ production for a
    final set), the quantity speedups and time-to-accuracy use.
    """
    points = frame[(frame["status"] == OK) & (frame["ipc"] == frame["adapt_ipc"])]
    columns = ["group", "dataset", "ipc", "method", "step", "seconds", "mean", "std", "n_runs", "final"]
    if points.empty:
        return pd.DataFrame(columns=columns)
    points = points.assign(step_or_final=[r.steps if r.final else r.step for r in points.itertuples()])
    rows = []
    for key, g in points.groupby(["group", "dataset", "ipc", "label", "step_or_final"], sort=False):
        mean, std, n = pooled(g["accuracies"])
        rows.append((*key, float(g["point_seconds"].mean()), mean, std, n, bool(g["final"].all())))
    return pd.DataFrame(rows, columns=columns).sort_values(columns[:5]).reset_index(drop=True)


def time_to_accuracy(points: pd.DataFrame, target: float, interpolate: bool = False) -> tuple[float, int] | None:
    """Seconds (and step) from which the mean accuracy reaches ``target`` and stays there.

    The first evaluated point (snapshot or final set) such that it and every later point are
    at or above the target, so a noisy curve that touches the target once and falls back does
    not count. With ``interpolate``, the crossing is placed linearly between that point and the
    one before it. None when the curve does not end above the target.
    """
    ordered = list(points.sort_values("step").itertuples())
    start = None
    for i in range(len(ordered) - 1, -1, -1):
        if ordered[i].mean >= target - EPS:
            start = i
        else:
            break
    if start is None:
        return None
    point = ordered[start]
    if interpolate and start > 0 and point.mean > ordered[start - 1].mean:
        before = ordered[start - 1]
        share = (target - before.mean) / (point.mean - before.mean)
        return before.seconds + share * (point.seconds - before.seconds), int(point.step)
    return float(point.seconds), int(point.step)


def cost_frame(frame: pd.DataFrame, cells: pd.DataFrame, curves: pd.DataFrame, speedup_vs: str | None = None,
               interpolate: bool = False) -> pd.DataFrame:
    """One row per (dataset, ipc, method): what producing that set cost, and speedups.

    A generator adapted once and deployed at several IPCs shows its adaptation (init + steps)
    on every IPC it served, marked shared, plus each IPC's own production time; a speedup
    compares adaptation + production. Time to accuracy uses the first table's group.
    """
    order = {label: i for i, label in enumerate(method_order(frame))}
    cells_of = frame.drop_duplicates(["cell_id", "ipc"])
    rows = []
    for (dataset, ipc, label), g in cells_of.groupby(["dataset", "ipc", "label"], sort=False):
        ok = g[g["status"] == OK]
        failed = g[g["status"] == FAILED]
        generators = [r for r in ok.itertuples() if r.deploy_ipc]
        shared_by = sorted({generators[0].adapt_ipc, *generators[0].deploy_ipc}) if generators else []
        rows.append({
            "dataset": dataset, "ipc": int(ipc), "method": label,
            "status": OK if failed.empty else FAILED if ok.empty else PARTIAL, "seeds": ok["seed"].nunique(),
            "steps": ok["steps"].mean(), "iterative": bool(g["iterative"].all()),
            "adapt_ipc": int(ok["adapt_ipc"].iloc[0]) if not ok.empty else int(ipc),
            "shared_by": shared_by,
            "prepare_seconds": ok["prepare_seconds"].max(), "prepare_cached": bool(ok["prepare_cached"].all()),
            "init_seconds": ok["init_seconds"].mean(), "distill_seconds": ok["distill_seconds"].mean(),
            "produce_seconds": ok["produce_seconds"].mean(), "seconds_per_step": ok["seconds_per_step"].mean(),
            "evaluate_seconds": np.nan if ok.empty else frame[
                (frame["status"] == OK) & (frame["label"] == label) & (frame["dataset"] == dataset)
                & (frame["ipc"] == ipc)]["eval_seconds"].sum() / ok["seed"].nunique(),
            "peak_prepare_mb": ok["peak_prepare_mb"].max(), "peak_distill_mb": ok["peak_distill_mb"].max(),
            "peak_evaluate_mb": ok["peak_evaluate_mb"].max(),
            "memory_kind": ", ".join(k for k in dict.fromkeys(ok["memory_kind"]) if k),
            "device": ", ".join(d for d in dict.fromkeys(ok["device"]) if d),
        })
    cost = pd.DataFrame(rows)
    if cost.empty:
        return cost
    cost["produce_total_seconds"] = cost["init_seconds"] + cost["distill_seconds"] + cost["produce_seconds"]
    cost = cost.assign(_o=cost["method"].map(order)).sort_values(["dataset", "ipc", "_o"], kind="stable")
    cost = cost.drop(columns="_o").reset_index(drop=True)
    if speedup_vs is None:
        return cost
    keys = ["dataset", "ipc"]
    ref = cost[cost["method"] == speedup_vs][keys + ["produce_total_seconds"]].rename(
        columns={"produce_total_seconds": "_ref"})
    first_group = groups_of(frame)[0] if groups_of(frame) else None
    target = cells[(cells["group"] == first_group) & (cells["method"] == speedup_vs)
                   & cells["status"].isin([OK, PARTIAL])][keys + ["mean"]]
    cost = cost.merge(ref, on=keys, how="left").merge(target.rename(columns={"mean": "tta_target"}), on=keys,
                                                      how="left")
    # No speedup for selection baselines (no distillation steps): microseconds of selection would
    # show as a meaningless 1e5x.
    positive = cost["produce_total_seconds"].where((cost["produce_total_seconds"] > 0) & (cost["steps"] > 0))
    cost["speedup"] = cost["_ref"] / positive
    here = curves[curves["group"] == first_group]
    points = {key: g for key, g in here.groupby(["dataset", "ipc", "method"])}
    reached = [time_to_accuracy(points[key], t, interpolate) if t == t and key in points else None
               for key, t in zip(zip(cost["dataset"], cost["ipc"], cost["method"]), cost["tta_target"])]
    cost["tta_seconds"] = [r[0] if r else np.nan for r in reached]
    cost["tta_step"] = [r[1] if r else np.nan for r in reached]
    cost["tta_reached"] = [np.nan if t != t else r is not None for r, t in zip(reached, cost["tta_target"])]
    return cost.drop(columns=["_ref"])


def suite_totals(frame: pd.DataFrame) -> dict[str, float]:
    """Seconds a suite took: each cell's adaptation once (however many IPCs it served), each
    artifact's build once (however many cells used it), every evaluation."""
    cells = frame[frame["status"] == OK].drop_duplicates("cell_id")
    artifacts = cells.dropna(subset=["artifact_key"]).drop_duplicates("artifact_key")
    return {"adaptation_seconds": float((cells["init_seconds"] + cells["distill_seconds"]).sum()),
            "production_seconds": float(frame[(frame["status"] == OK)].drop_duplicates(["cell_id", "ipc"])[
                "produce_seconds"].sum()),
            "prepare_seconds": float(artifacts["prepare_seconds"].sum()),
            "evaluate_seconds": float(frame[frame["status"] == OK]["eval_seconds"].sum())}


# -- protocol and notes ---------------------------------------------------------------------
def protocol_line(frame: pd.DataFrame) -> str:
    """Everything about the evaluation in one line; a field that differs between methods lists
    each value with its methods."""
    ok = frame[(frame["status"] == OK) & frame["final"]]
    values: dict[str, dict[str, list[str]]] = {}
    for r in (ok if not ok.empty else frame).itertuples():
        for name, value in _protocol_fields(r).items():
            labels = values.setdefault(name, {}).setdefault(value, [])
            labels += [] if r.label in labels else [r.label]
    parts = [f"{name}: " + (next(iter(by)) if len(by) == 1 else
                            "; ".join(f"{v} [{', '.join(ls)}]" for v, ls in by.items()))
             for name, by in values.items()]
    seeds = sorted(frame["seed"].unique())
    parts.append(f"seeds: {len(seeds)} ({', '.join(map(str, seeds))}), runs and seeds pooled")
    notes = sorted({n for p in ok["protocol"] for n in (p.get("notes") or [])})
    return "Protocol: " + " | ".join(parts) + ("" if not notes else " | notes: " + "; ".join(notes))


def _protocol_fields(r: Any) -> dict[str, str]:
    p = r.protocol
    if p.get("steps") is not None:
        length = f"{p['steps']} steps"
    else:
        length = f"{p.get('epochs', '?')} epochs"
    if p.get("optimizer", "sgd") == "adam":
        optimiser = f"Adam lr {p.get('lr', '?')}"
    else:
        optimiser = (f"SGD lr {p.get('lr', '?')}{' (or learned)' if p.get('use_learned_lr') else ''}, "
                     f"mom {p.get('momentum', '?')}, wd {p.get('weight_decay', '?')}")
    schedule = {"step": "×0.1 after pass E/2+1", "cosine": f"warm-up {p.get('warmup_steps')} + cosine"}.get(
        p.get("schedule", "step"), p.get("schedule", "?"))
    aug = p.get("augment", "?")
    aug = {"dsa": f"DSA({p.get('dsa_strategy')})", "dc": f"DC({p.get('dc_strategy')})",
           "frepo": f"FRePo({p.get('frepo_strategy')})"}.get(aug, aug)
    return {"preset": str(p.get("preset") or "none"), "eval": str(p.get("model", "?")), "length": length,
            "optimiser": f"{optimiser}, {schedule}, batch {p.get('batch_size', '?')}", "aug": aug,
            "labels": r.label_type or "?", "runs per set": str(p.get("runs", "?")),
            "precision": str(p.get("precision", "fp32")), "budget": budget_text(r.budget), "device": r.device or "?"}


def budget_text(budget: dict[str, Any]) -> str:
    parts = [f"{budget['steps']} steps"] if budget.get("steps") is not None else []
    parts += [f"{budget['seconds']:g} s"] if budget.get("seconds") is not None else []
    return " or ".join(parts) or "?"


def failure_lines(frame: pd.DataFrame) -> list[str]:
    failed = frame[frame["status"] == FAILED]
    return [f"FAILED {r.label} {r.dataset} ipc={r.adapt_ipc} seed={r.seed}: {r.error}" for r in failed.itertuples()]


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
    notes: list[str]

    @property
    def groups(self) -> list[str]:
        return groups_of(self.frame)

    @property
    def protocol_names(self) -> list[str]:
        return list(dict.fromkeys(g.split(" · ")[0] for g in self.groups))


def build_report(directory: str | Path, speedup_vs: str | None = None, interpolate: bool = False,
                 protocol: str | None = None, model: str | None = None) -> Report | None:
    """Aggregate the store (None when it holds no records); ``speedup_vs`` must be a method label;
    ``protocol`` / ``model`` keep only the tables of that protocol name / architecture."""
    directory = Path(directory)
    frame, notes = store_frame(directory)
    if frame.empty:
        return None
    frame = _pick(frame, protocol, model)
    if speedup_vs is not None and speedup_vs not in set(frame["label"]):
        by_name = frame[frame["method"] == speedup_vs]["label"].unique()
        if len(by_name) != 1:
            raise ConfigError(f"speedup_vs: {speedup_vs!r} is not a method in {directory} "
                              f"(available: {', '.join(method_order(frame))})")
        speedup_vs = str(by_name[0])
    cells = accuracy_cells(frame)
    curves = curve_frame(frame)
    return Report(directory, frame, cells, cost_frame(frame, cells, curves, speedup_vs, interpolate), curves,
                  speedup_vs, interpolate, notes)


def _pick(frame: pd.DataFrame, protocol: str | None, model: str | None) -> pd.DataFrame:
    keep = pd.Series(True, index=frame.index)
    evaluated = frame["group"].notna()
    for value, column, what in ((protocol, "protocol_name", "protocol"), (model, "model", "model")):
        if value is None:
            continue
        known = sorted(frame.loc[evaluated, column].dropna().unique())
        if value not in known:
            raise ConfigError(f"{what}: {value!r} is not in these results (available: {', '.join(known)})")
        keep &= ~evaluated | (frame[column] == value)
    return frame[keep].reset_index(drop=True)


def stored_speedup_vs(directory: str | Path) -> str | None:
    """The reference method saved by an earlier ``write_report`` (so a later run reuses it)."""
    path = Path(directory) / SETTINGS_FILE
    return json.loads(path.read_text()).get("speedup_vs") if path.exists() else None


def speedup_vs_from_suite(path: str | Path) -> str | None:
    """``report.speedup_vs`` of a suite YAML file (None when absent)."""
    if not Path(path).is_file():
        raise ConfigError(f"suite: file not found: {path}")
    raw = yaml.safe_load(Path(path).read_text()) or {}
    return ((raw.get("report") or {}) if isinstance(raw, dict) else {}).get("speedup_vs")
