"""Reading results written before the format-2 store (one protocol per record, protocol in the cell id).

A format-1 record becomes a format-2 record on read, in memory (the file is never rewritten):

- its id is recomputed by today's rule (method, version "1", config, dataset, ipc, seed,
  budget, ZCA), so a suite re-run finds the cell distilled and only evaluates its saved set
  under the protocols it asks for; the old id is kept as ``legacy_cell_id``;
- its one evaluation becomes ``evaluations[0]``, tagged with evaluation version 1 (the lr then
  dropped one pass earlier than the official loop), so reports show it in a table of its own
  and a re-run evaluates again under the current version instead of mixing the two;
- snapshot accuracies become evaluations with their ``step``;
- ``distill_seconds`` loses the ``init_seconds`` it used to include;
- traits come from the method registry (a method no longer installed gets none).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from dd_bench.method import METHODS
from dd_bench.run.cells import cell_identity

LEGACY_EVAL_VERSION = 1


def _legacy_request_key(protocol: dict[str, Any]) -> str:
    blob = json.dumps({"legacy_protocol": protocol}, sort_keys=True, default=str)
    return "v1-" + hashlib.sha256(blob.encode()).hexdigest()[:9]


def upgrade_format1(old: dict[str, Any]) -> dict[str, Any]:
    """The format-2 form of a format-1 record (see the module docstring)."""
    info = old.get("dataset_info") or {}
    zca = bool(info.get("zca", False))
    data = {"zca": zca, "zca_mode": info.get("zca_mode") or "trace", "zca_reg": info.get("zca_reg") or 0.1} \
        if zca else {"zca": False}
    budget = old.get("budget") or {}
    cell_id = cell_identity(old["method"], "1", old.get("config") or {}, old["dataset"], int(old["ipc"]),
                            int(old["seed"]), budget, data)
    protocol = dict(old.get("protocol") or {}, version=LEGACY_EVAL_VERSION)
    model = protocol.get("model", "ConvNet")
    key = _legacy_request_key(old.get("protocol") or {})
    metrics = dict(old.get("metrics") or {})
    init_seconds = float(metrics.pop("init_seconds", 0.0) or 0.0)
    evaluations, snapshots = [], []
    if old.get("status") == "ok":
        evaluations.append(_evaluation(old.get("accuracies"), old.get("evaluate_seconds"), old.get("eval_lr"),
                                       old.get("label_type"), protocol, old.get("protocol_text", ""), model,
                                       int(old["ipc"]), None, key))
    for snap in old.get("snapshots") or []:
        snapshots.append({"step": snap["step"], "distill_seconds": snap.get("distill_seconds"),
                          "path": snap.get("synthetic_set")})
        evaluations.append(_evaluation(snap.get("accuracies"), None, old.get("eval_lr"), old.get("label_type"),
                                       protocol, old.get("protocol_text", ""), model, int(old["ipc"]), snap["step"],
                                       key))
    sets = [{"ipc": int(old["ipc"]), "path": old["synthetic_set"], "produce_seconds": 0.0}] \
        if old.get("synthetic_set") else []
    method = old["method"]
    traits = METHODS.get(method).traits() if method in METHODS else {}
    distill = float(old.get("distill_seconds") or 0.0)
    return {
        "format": 2, "legacy_cell_id": old["cell_id"], "cell_id": cell_id, "suite": old.get("suite", ""),
        "status": old["status"], "method": method, "label": old.get("label", method), "dataset": old["dataset"],
        "ipc": int(old["ipc"]), "seed": int(old["seed"]), "config": old.get("config") or {}, "method_version": "1",
        "traits": traits, "deploy_ipc": [], "data": data, "budget": budget, "steps": int(old.get("steps") or 0),
        "prepare_seconds": float(old.get("prepare_seconds") or 0.0),
        "prepare_cached": bool(old.get("prepare_cached", False)), "artifact": None,
        "init_seconds": init_seconds, "distill_seconds": max(0.0, distill - init_seconds),
        "seconds_per_step": old.get("seconds_per_step"), "evaluate_seconds": float(old.get("evaluate_seconds") or 0.0),
        "sets": sets, "evaluations": evaluations, "snapshots": snapshots,
        "peak_memory_mb": old.get("peak_memory_mb") or {}, "memory_kind": old.get("memory_kind", ""),
        "device": old.get("device", ""), "metrics": metrics, "dataset_info": info, "env": old.get("env") or {},
        "error": old.get("error"), "traceback": old.get("traceback"), "started_at": old.get("started_at", ""),
        "finished_at": old.get("finished_at", ""),
    }


def _evaluation(accuracies: Any, seconds: Any, lr: Any, label_type: Any, protocol: dict[str, Any], text: str,
                model: str, ipc: int, step: int | None, key: str) -> dict[str, Any]:
    values = [float(a) for a in accuracies or [] if a is not None]
    mean = sum(values) / len(values) if values else None
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5 if values else None
    return {"protocol_name": "main", "request_key": key, "protocol": protocol, "protocol_text": text,
            "model": model, "ipc": ipc, "step": step, "accuracies": values, "accuracy_mean": mean,
            "accuracy_std": std, "seconds": float(seconds) if seconds is not None else None, "lr": lr,
            "label_type": label_type, "eval_version": LEGACY_EVAL_VERSION}
