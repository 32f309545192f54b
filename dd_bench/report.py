"""Tables from the result store. Reads records; never recomputes a result.

Accuracy cells are ``mean ± std`` over every evaluation run of every seed of a
(dataset, ipc, method) group, as the papers pool their 5 sets × 20 nets.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dd_bench.results import ResultStore

log = logging.getLogger(__name__)

FAILED = "failed"
MISSING = "–"


def records_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per cell record, with the columns tables and plots need."""
    rows = []
    for r in records:
        rows.append({
            "cell_id": r["cell_id"], "status": r["status"], "method": r["method"], "label": r["label"],
            "dataset": r["dataset"], "ipc": r["ipc"], "seed": r["seed"], "accuracies": r.get("accuracies") or [],
            "accuracy_mean": r.get("accuracy_mean"), "accuracy_std": r.get("accuracy_std"),
            "steps": r.get("steps", 0), "prepare_seconds": r.get("prepare_seconds", 0.0),
            "distill_seconds": r.get("distill_seconds", 0.0), "evaluate_seconds": r.get("evaluate_seconds", 0.0),
            "seconds_per_step": r.get("seconds_per_step"), "peak_memory_mb": max((r.get("peak_memory_mb") or {}).values(), default=None),
            "device": r.get("device", ""), "protocol_text": r.get("protocol_text", ""), "error": r.get("error"),
            "label_type": r.get("label_type"),
        })
    return pd.DataFrame(rows)


def store_frame(directory: str | Path) -> pd.DataFrame:
    return records_frame(ResultStore(directory).latest().values())


def pooled(accuracy_lists: Iterable[list[float]]) -> tuple[float, float, int]:
    values = [a for accs in accuracy_lists for a in accs]
    if not values:
        return float("nan"), float("nan"), 0
    return float(np.mean(values)), float(np.std(values)), len(values)


def accuracy_table(frame: pd.DataFrame, methods: list[str] | None = None) -> pd.DataFrame:
    """Rows (dataset, ipc), columns method labels, cells ``mean ± std`` (failed / missing shown as such)."""
    if frame.empty:
        return pd.DataFrame()
    methods = methods or list(dict.fromkeys(frame["label"]))
    rows = {}
    for (dataset, ipc), group in frame.groupby(["dataset", "ipc"], sort=True):
        row = {}
        for method in methods:
            cells = group[group["label"] == method]
            ok = cells[cells["status"] == "ok"]
            if not ok.empty:
                mean, std, _ = pooled(ok["accuracies"])
                row[method] = f"{mean:.1f} ± {std:.1f}"
            elif not cells.empty:
                row[method] = FAILED
            else:
                row[method] = MISSING
        rows[(dataset, int(ipc))] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index = pd.MultiIndex.from_tuples(table.index, names=["dataset", "ipc"])
    return table[methods]


def cost_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per method label: mean phase times, steps, seconds per step, peak memory, device."""
    ok = frame[frame["status"] == "ok"]
    if ok.empty:
        return pd.DataFrame()
    grouped = ok.groupby("label", sort=False)
    table = pd.DataFrame({
        "cells": grouped.size(),
        "steps": grouped["steps"].mean().round(0).astype(int),
        "prepare s": grouped["prepare_seconds"].mean(),
        "distill s": grouped["distill_seconds"].mean(),
        "s/step": grouped["seconds_per_step"].mean(),
        "evaluate s": grouped["evaluate_seconds"].mean(),
        "peak MiB": grouped["peak_memory_mb"].max(),
        "device": grouped["device"].first(),
    })
    return table


def markdown(table: pd.DataFrame, float_format: str = "{:.3g}") -> str:
    """A GitHub-flavoured Markdown table (no extra dependency such as tabulate)."""
    if table.empty:
        return "(no results)"
    index_names = [n or "" for n in (table.index.names if table.index.nlevels > 1 else [table.index.name])]
    header = index_names + [str(c) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for key, row in table.iterrows():
        keys = list(key) if isinstance(key, tuple) else [key]
        cells = [_fmt(v, float_format) for v in keys] + [_fmt(v, float_format) for v in row.tolist()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: Any, float_format: str) -> str:
    if isinstance(value, float):
        return "" if np.isnan(value) else float_format.format(value)
    return str(value)


def protocol_lines(frame: pd.DataFrame) -> list[str]:
    ok = frame[frame["status"] == "ok"]
    lines = []
    for text, group in ok.groupby("protocol_text", sort=False):
        lines.append(f"Protocol: {text} [{', '.join(dict.fromkeys(group['label']))}]")
    return lines


def summary(directory: str | Path) -> str:
    """The text printed at the end of a run: accuracy table, cost table, protocol, failures."""
    frame = store_frame(directory)
    if frame.empty:
        return "(no results yet)"
    parts = ["Accuracy (%) on the real test set, mean ± std over all evaluation runs of all seeds",
             markdown(accuracy_table(frame)), "", "Cost per cell (means)", markdown(cost_table(frame)), ""]
    parts += protocol_lines(frame)
    failed = frame[frame["status"] == "failed"]
    for _, row in failed.iterrows():
        parts.append(f"FAILED {row['label']} {row['dataset']} ipc={row['ipc']} seed={row['seed']}: {row['error']}")
    return "\n".join(parts)
