"""Accuracy against adaptation steps, meta-trained vs untrained MGDD generator (issue 11).

Reads the records of suites/acceptance/fmnist_mgdd.yaml (200 steps, snapshots every 50) and
suites/acceptance/fmnist_mgdd_curve.yaml (10 steps, and the meta-trained generator without
adaptation) from one results root, and draws one figure (PNG and PDF) with a CSV of its points:

- meta-trained: ``mgdd no adaptation`` (step 0), ``mgdd`` of the curve suite (10), ``mgdd`` of
  the main suite (snapshots and its final set at the adaptation IPC);
- untrained: ``mgdd labels only`` (step 0: the identity generator gives the same set),
  ``mgdd untrained`` of both suites;
- ``random`` at the same IPC as a horizontal line.

usage: python tools/mgdd_curve.py RESULTS_ROOT [--out DIR] [--protocol common]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MAIN, CURVE = "fmnist_mgdd", "fmnist_mgdd_curve"
#: (suite, label) -> (curve, where the step comes from)
SOURCES = {
    (CURVE, "mgdd no adaptation"): "meta-trained",
    (CURVE, "mgdd"): "meta-trained",
    (MAIN, "mgdd"): "meta-trained",
    (MAIN, "mgdd labels only"): "untrained",
    (CURVE, "mgdd untrained"): "untrained",
    (MAIN, "mgdd untrained"): "untrained",
}


def _records(root: Path, suite: str) -> list[dict]:
    path = root / suite / "results.jsonl"
    if not path.exists():
        return []
    latest: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            latest[record["cell_id"]] = record  # the store appends: the last record of a cell wins
    return [r for r in latest.values() if r.get("status") == "ok"]


def points(root: Path, protocol: str) -> tuple[pd.DataFrame, float | None]:
    """One row per (generator, step): mean and std over the evaluation's networks."""
    rows, random_by_ipc, ipcs = [], {}, set()
    for suite in (MAIN, CURVE):
        for record in _records(root, suite):
            for e in record["evaluations"]:
                if e["protocol_name"] != protocol or e["ipc"] != record["ipc"]:
                    continue
                if record["label"] == "random" and suite == MAIN:
                    random_by_ipc[record["ipc"]] = e["accuracy_mean"]
                curve = SOURCES.get((suite, record["label"]))
                if curve is None:
                    continue
                step = e["step"] if e["step"] is not None else record["steps"]
                accs = e["accuracies"]
                ipcs.add(record["ipc"])
                rows.append({"generator": curve, "step": int(step), "mean": statistics.fmean(accs),
                             "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0, "n_nets": len(accs),
                             "suite": suite, "label": record["label"]})
    frame = pd.DataFrame(rows).sort_values(["generator", "step"]).reset_index(drop=True)
    random_acc = random_by_ipc.get(next(iter(ipcs))) if len(ipcs) == 1 else None  # random at the adaptation IPC
    return frame, random_acc


def draw(frame: pd.DataFrame, random_acc: float | None, stem: Path, protocol_text: str) -> list[Path]:
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        fig = Figure(figsize=(5.5, 3.8), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for name, group in frame.groupby("generator", sort=False):
            ax.errorbar(group["step"], group["mean"], yerr=group["std"], marker="o", capsize=3, label=name)
        if random_acc is not None:
            ax.axhline(random_acc, color="grey", linestyle="--", linewidth=1, label="random real images")
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xticks(sorted(frame["step"].unique()))
        ax.get_xaxis().set_major_formatter(lambda x, _: f"{x:g}")
        ax.set_xlabel("adaptation steps")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("MGDD, Fashion-MNIST IPC 10: meta-trained vs untrained generator")
        ax.legend()
        fig.text(0.01, -0.02, protocol_text, fontsize=6, wrap=True)
        written = []
        for fmt in ("png", "pdf"):
            path = stem.with_suffix(f".{fmt}")
            fig.savefig(path, bbox_inches="tight")
            written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="results root holding fmnist_mgdd/ and fmnist_mgdd_curve/")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: ROOT/fmnist_mgdd/plots)")
    parser.add_argument("--protocol", default="common", help="protocol name in the suites")
    args = parser.parse_args()
    frame, random_acc = points(args.root, args.protocol)
    if frame.empty:
        raise SystemExit(f"no MGDD evaluations under protocol {args.protocol!r} in {args.root}")
    out = args.out or args.root / MAIN / "plots"
    out.mkdir(parents=True, exist_ok=True)
    texts = {e["protocol_text"] for r in _records(args.root, MAIN) for e in r["evaluations"]
             if e["protocol_name"] == args.protocol and r["label"] == "mgdd"}
    frame.to_csv(out / "mgdd_adaptation_curve.csv", index=False)
    written = draw(frame, random_acc, out / "mgdd_adaptation_curve", " / ".join(sorted(texts)))
    print(frame.to_string(index=False))
    if random_acc is not None:
        print(f"random (same IPC): {random_acc:.2f}")
    print("wrote", ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
