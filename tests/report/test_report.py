"""Tests for dd_bench.report (tables), dd_bench.report.plots and dd_bench.report.grids on a hand-built store.

The store below is written record by record with known accuracies and times, so every number
the report shows can be checked against arithmetic done by hand in the comments.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dd_bench.report.aggregate import time_to_accuracy
from dd_bench.cli import main
from dd_bench.report.grids import to_pixels
from dd_bench.method import SyntheticSet
from dd_bench.report import build_report, summary, write_report
from dd_bench.run.store import ResultStore

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NUM_CLASSES = 3


def _record(store: ResultStore, label: str, ipc: int, seed: int, accuracies: list[float] | None = None, *,
            method: str | None = None, distill: float = 1.0, steps: int = 20, snapshots: list[dict] = (),
            model: str = "ConvNet", with_set: bool = True) -> None:
    """Append one record; ``accuracies=None`` makes it a failed cell."""
    cell_id = f"{label}-{model}-ipc{ipc}-s{seed}"
    failed = accuracies is None
    set_path = None
    if with_set and not failed:
        images = torch.randn(NUM_CLASSES * ipc, 1, 8, 8)
        labels = torch.arange(NUM_CLASSES).repeat_interleave(ipc)
        syn = SyntheticSet(images, labels, meta={"mean": [0.1307], "std": [0.3081], "zca": False})
        syn.save(store.set_path(cell_id))
        set_path = str(store.set_path(cell_id).relative_to(store.directory))
    store.append({
        "cell_id": cell_id, "suite": "fixture", "status": "failed" if failed else "ok", "method": method or label,
        "label": label, "dataset": "mnist_sample", "ipc": ipc, "seed": seed, "config": {},
        "protocol": {"model": model, "epochs": 300, "runs": 2, "lr": 0.01, "use_learned_lr": True, "momentum": 0.9,
                     "weight_decay": 0.0005, "batch_size": 256, "augment": "dsa", "dsa_strategy": "color_crop"},
        "protocol_text": f"{model}, 300 epochs", "budget": {"steps": 20, "seconds": None, "snapshot_every": 5},
        "accuracies": [] if failed else accuracies, "label_type": None if failed else "hard (CE)",
        "steps": 0 if failed else steps, "prepare_seconds": 0.0, "distill_seconds": 0.0 if failed else distill,
        "evaluate_seconds": 3.0, "seconds_per_step": distill / steps if steps and not failed else None,
        "peak_memory_mb": {"prepare": 100.0, "distill": 200.0, "evaluate": 300.0}, "memory_kind": "process_rss",
        "device": "cpu:test", "snapshots": list(snapshots), "synthetic_set": set_path,
        "dataset_info": {"name": "mnist_sample", "num_classes": NUM_CLASSES, "zca": False},
        "error": "RuntimeError: boom" if failed else None,
    })


def _snap(step: int, seconds: float, accuracies: list[float]) -> dict:
    return {"step": step, "distill_seconds": seconds, "accuracies": accuracies,
            "accuracy_mean": sum(accuracies) / len(accuracies), "accuracy_std": 0.0, "synthetic_set": None}


def build_store(directory: Path) -> Path:
    store = ResultStore(directory)
    # IPC 1. random: runs 10, 12, 14, 16 -> mean 13, std sqrt((9+1+1+9)/4) = sqrt(5) = 2.236
    _record(store, "random", 1, 0, [10, 12], steps=0, distill=0.001)
    _record(store, "random", 1, 1, [14, 16], steps=0, distill=0.001)
    # dc: 20, 22, 24, 30 -> mean 24, std sqrt((16+4+0+36)/4) = sqrt(14) = 3.742; distill 100 s and 120 s -> 110 s
    _record(store, "dc", 1, 0, [20, 22], distill=100.0, snapshots=[_snap(5, 50.0, [10, 12])])
    _record(store, "dc", 1, 1, [24, 30], distill=120.0, snapshots=[_snap(5, 60.0, [14, 16])])
    # dm: 30, 31, 32, 35 -> mean 32, std sqrt((4+1+0+9)/4) = sqrt(3.5) = 1.871 (best of the row);
    # distill 10 s and 12 s -> 11 s, speedup vs dc 110 / 11 = 10.
    # Snapshots: step 5 at 2.0/2.4 s, mean 21; step 10 at 5.0/6.0 s, mean 25 >= dc's 24 -> reached at 5.5 s
    # (interpolated: 2.2 + (24 - 21) / (25 - 21) * (5.5 - 2.2) = 4.675 s).
    _record(store, "dm", 1, 0, [30, 31], distill=10.0, snapshots=[_snap(5, 2.0, [20, 21]), _snap(10, 5.0, [24, 25])])
    _record(store, "dm", 1, 1, [32, 35], distill=12.0, snapshots=[_snap(5, 2.4, [21, 22]), _snap(10, 6.0, [25, 26])])
    _record(store, "mtt", 1, 0, None)  # every seed failed -> "failed"
    _record(store, "mtt", 1, 1, None)
    # IPC 10. random 60..66 -> 63.0 ± 2.2 is the highest, but a reference column is never bold: dc (53.0 ± 2.2) is.
    _record(store, "random", 10, 0, [60, 62], steps=0, distill=0.001)
    _record(store, "random", 10, 1, [64, 66], steps=0, distill=0.001)
    _record(store, "dc", 10, 0, [50, 52], distill=200.0)
    _record(store, "dc", 10, 1, [54, 56], distill=200.0)
    _record(store, "dm", 10, 0, [45, 47], distill=20.0)  # seed 1 failed -> 46.0 ± 1.0 (1/2 seeds)
    _record(store, "dm", 10, 1, None)
    # mtt has no IPC 10 record at all -> "missing"
    return directory


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    directory = build_store(tmp_path_factory.mktemp("store") / "fixture")
    return directory, write_report(directory, speedup_vs="dc")


def _row(markdown: str, ipc: int) -> list[str]:
    line = next(l for l in markdown.splitlines() if l.startswith(f"| mnist_sample | {ipc} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_hand_arithmetic_of_the_fixture() -> None:
    assert math.isclose(pd.Series([10, 12, 14, 16]).std(ddof=0), math.sqrt(5))
    assert math.isclose(pd.Series([20, 22, 24, 30]).std(ddof=0), math.sqrt(14))
    assert math.isclose(pd.Series([30, 31, 32, 35]).std(ddof=0), math.sqrt(3.5))


def test_markdown_cells_pool_runs_and_seeds_and_bold_the_best(written) -> None:
    directory, _ = written
    table = (directory / "table.md").read_text()
    header = next(l for l in table.splitlines() if l.startswith("| dataset"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["dataset", "IPC", "random", "dc", "dm", "mtt"]
    assert _row(table, 1) == ["mnist_sample", "1", "13.0 ± 2.2", "24.0 ± 3.7", "**32.0 ± 1.9**", "failed"]
    assert _row(table, 10) == ["mnist_sample", "10", "63.0 ± 2.2", "**53.0 ± 2.2**", "46.0 ± 1.0 (1/2 seeds)",
                               "missing"]
    assert "runs and seeds pooled" in table


def test_latex_cells_bold_and_booktabs(written) -> None:
    tex = (written[0] / "table.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    line = next(l for l in tex.splitlines() if l.startswith("mnist\\_sample & 1 &"))
    cells = [c.strip() for c in line.rstrip("\\ ").split("&")]
    assert cells == ["mnist\\_sample", "1", "13.0 $\\pm$ 2.2", "24.0 $\\pm$ 3.7", "\\textbf{32.0 $\\pm$ 1.9}", "failed"]
    line10 = next(l for l in tex.splitlines() if l.lstrip().startswith("& 10 &"))
    assert "\\textbf{53.0 $\\pm$ 2.2}" in line10 and "\\textbf{63.0" not in line10


def test_csv_holds_numbers_and_status_not_zeros(written) -> None:
    rows = list(csv.DictReader((written[0] / "table.csv").read_text().splitlines()))
    by = {(r["method"], r["ipc"]): r for r in rows}
    assert float(by["dc", "1"]["mean"]) == 24.0 and math.isclose(float(by["dc", "1"]["std"]), math.sqrt(14))
    assert by["dc", "1"]["n_runs"] == "4" and by["dc", "1"]["n_seeds"] == "2"
    assert by["dm", "1"]["best"] == "True" and by["dc", "10"]["best"] == "True"
    assert by["random", "10"]["best"] == "False"  # highest of its row, but a reference column
    assert by["mtt", "1"]["status"] == "failed" and by["mtt", "1"]["mean"] == ""
    assert by["mtt", "10"]["status"] == "missing" and by["mtt", "10"]["mean"] == ""
    assert by["dm", "10"]["status"] == "partial" and by["dm", "10"]["n_seeds"] == "1"


def test_failed_and_missing_never_show_as_zero(written) -> None:
    for name in ("table.md", "table.tex"):
        text = (written[0] / name).read_text()
        assert "0.0 ± 0.0" not in text and "0.0 $\\pm$ 0.0" not in text
    assert "FAILED mtt mnist_sample ipc=1 seed=0" in (written[0] / "table.md").read_text()
    cost = (written[0] / "cost.md").read_text()
    mtt = next(l for l in cost.splitlines() if "| mtt |" in l)
    assert "failed" in mtt and "| 0 |" not in mtt.split("| failed |")[1]


def test_speedup_is_the_distill_seconds_ratio(written) -> None:
    cost = pd.read_csv(written[0] / "cost.csv")
    at = cost.set_index(["ipc", "method"])
    assert at.loc[(1, "dm"), "distill_seconds"] == 11.0
    assert at.loc[(1, "dm"), "speedup"] == pytest.approx(110.0 / 11.0)
    assert at.loc[(1, "dc"), "speedup"] == pytest.approx(1.0)
    assert at.loc[(10, "dm"), "speedup"] == pytest.approx(200.0 / 20.0)
    assert "| mnist_sample | 1 | dm |" in (md := (written[0] / "cost.md").read_text()) and "10× (10×)" in md


def test_selection_baselines_get_no_speedup(written) -> None:
    # random took 0 steps in 0.001 s: a ratio would read 1e4x and mean nothing.
    cost = pd.read_csv(written[0] / "cost.csv").set_index(["ipc", "method"])
    assert np.isnan(cost.loc[(1, "random"), "speedup"])
    row = next(line for line in (written[0] / "cost.md").read_text().splitlines() if "| 1 | random |" in line)
    assert "| selection |" in row


def test_time_to_accuracy_from_snapshots(written) -> None:
    cost = pd.read_csv(written[0] / "cost.csv").set_index(["ipc", "method"])
    assert cost.loc[(1, "dm"), "tta_target"] == 24.0
    assert cost.loc[(1, "dm"), "tta_seconds"] == pytest.approx(5.5) and cost.loc[(1, "dm"), "tta_step"] == 10
    assert cost.loc[(1, "dc"), "tta_seconds"] == pytest.approx(110.0)  # dc reaches its own final only at the end
    assert not cost.loc[(1, "random"), "tta_reached"] and math.isnan(cost.loc[(1, "random"), "tta_seconds"])
    md = (written[0] / "cost.md").read_text()
    assert "5.5 s (step 10)" in md and "not reached" in md and "not interpolated" in md
    report = build_report(written[0], "dc", interpolate=True)
    dm = report.cost.set_index(["ipc", "method"]).loc[(1, "dm")]
    assert dm["tta_seconds"] == pytest.approx(2.2 + 0.75 * 3.3)


def test_time_to_accuracy_takes_the_first_point_reaching_the_target() -> None:
    points = pd.DataFrame({"step": [1, 2, 3], "distill_seconds": [1.0, 2.0, 3.0], "mean": [10.0, 30.0, 20.0]})
    assert time_to_accuracy(points, 25.0) == (2.0, 2)
    assert time_to_accuracy(points, 20.0, interpolate=True) == (1.5, 2)
    assert time_to_accuracy(points, 31.0) is None


def test_protocol_line_under_every_table(written) -> None:
    for name in ("table.md", "cost.md"):
        lines = (written[0] / name).read_text().splitlines()
        last_table_line = max(i for i, l in enumerate(lines) if l.startswith("|"))
        after = "\n".join(lines[last_table_line + 1 :])
        assert "Protocol: eval: ConvNet | epochs: 300" in after
        for part in ("aug: DSA(color_crop)", "labels: hard (CE)", "runs per set: 2", "seeds: 2 (0, 1)",
                     "budget: 20 steps", "device: cpu:test"):
            assert part in after, (name, part)
    for name in ("table.tex", "cost.tex"):
        tex = (written[0] / name).read_text()
        assert tex.index("Protocol: eval: ConvNet") > tex.index("\\end{tabular}")
        assert "device: cpu:test" in tex


def test_plots_and_grids_are_written(written) -> None:
    directory, paths = written
    for stem in ("accuracy_vs_time", "accuracy_vs_steps", "speedup"):
        for ext in ("png", "pdf"):
            assert directory / "plots" / f"{stem}.{ext}" in paths
    grids = sorted((directory / "grids").glob("*.png"))
    ok_with_sets = 11  # every ok record above
    assert len(grids) == ok_with_sets and directory / "grids" / "dm_mnist_sample_ipc1_seed0.png" in paths
    for path in paths:
        assert path.exists() and path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG_MAGIC
    assert (directory / "report.json").exists()  # the reference method is kept for the next run


def test_cross_architecture_tables_and_heat_map(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "xarch")
    for model, shift in (("ConvNet", 0.0), ("AlexNet", -10.0)):
        _record(store, "dc", 1, 0, [40 + shift, 42 + shift], model=model, with_set=False)
        _record(store, "dm", 1, 0, [50 + shift, 52 + shift], model=model, with_set=False)
    _record(store, "dsa", 1, 0, None, model="AlexNet")
    paths = write_report(store.directory, grids=False)
    assert store.directory / "plots" / "cross_arch.png" in paths
    table = (store.directory / "table.md").read_text()
    assert "## Accuracy (%), eval ConvNet" in table and "## Accuracy (%), eval AlexNet" in table
    convnet, alexnet = table.split("## Accuracy (%), eval AlexNet")
    assert _row(convnet, 1)[2:] == ["41.0 ± 1.0", "**51.0 ± 1.0**"]
    assert _row(alexnet, 1)[2:] == ["31.0 ± 1.0", "**41.0 ± 1.0**", "failed"]
    assert "Protocol: eval: AlexNet" in alexnet


def test_cli_report_and_bad_reference(written, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    directory = build_store(tmp_path / "cli")
    assert main(["report", str(directory), "--speedup-vs", "dm", "--no-plots", "--no-grids"]) == 0
    out = capsys.readouterr().out
    assert "speedup vs dm" in out and "**32.0 ± 1.9**" in out
    assert not (directory / "plots").exists()
    assert main(["report", str(directory), "--speedup-vs", "nope", "--no-plots", "--no-grids"]) == 2
    assert "available: random, dc, dm, mtt" in capsys.readouterr().err


def test_summary_still_works(written) -> None:
    text = summary(written[0])
    assert "**32.0 ± 1.9**" in text and "speedup vs dc" in text  # reference kept from write_report


def test_grid_notes_zca_it_could_not_undo() -> None:
    syn = SyntheticSet(torch.randn(6, 1, 4, 4), torch.arange(3).repeat_interleave(2),
                       meta={"zca": True, "mean": [0.5], "std": [0.25]})
    pixels, note = to_pixels(syn, "no_such_dataset", {"zca": True})
    assert "ZCA not undone" in note and pixels.min() >= 0 and pixels.max() <= 1
    pixels, note = to_pixels(SyntheticSet(torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long),
                                          meta={"mean": [0.5], "std": [0.25]}), "x", {})
    assert note == "de-normalised" and torch.allclose(pixels, torch.full_like(pixels, 0.5))


def test_run_path_writes_the_report_with_the_suites_reference(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    from dd_bench.cli import _print_summary

    store = ResultStore(tmp_path / "results" / "tiny")
    _record(store, "dc", 1, 0, [20, 22], distill=100.0, with_set=False)
    _record(store, "dm", 1, 0, [30, 32], distill=10.0, with_set=False)
    _print_summary(store.directory, speedup_vs="dc")  # what `dd-bench run` passes from suite.report
    assert "speedup vs dc" in capsys.readouterr().out
    cost = pd.read_csv(store.directory / "cost.csv").set_index("method")
    assert cost.loc["dm", "speedup"] == pytest.approx(10.0)
    assert (store.directory / "plots" / "speedup.png").exists()


def test_full_dataset_reference_column_is_last_pooled_over_ipc_and_never_bold(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "full")
    _record(store, "whole", 1, 0, [98, 99], method="full", steps=0, with_set=False)
    for ipc in (1, 10):
        _record(store, "dc", ipc, 0, [20 + ipc, 22 + ipc], with_set=False)
        _record(store, "random", ipc, 0, [10 + ipc, 12 + ipc], steps=0, with_set=False)
    write_report(store.directory, plots=False, grids=False)
    table = (store.directory / "table.md").read_text()
    assert "| dataset | IPC | random | dc | whole |" in table
    assert _row(table, 1)[2:] == ["12.0 ± 1.0", "**22.0 ± 1.0**", "98.5 ± 0.5"]
    assert _row(table, 10)[2:] == ["21.0 ± 1.0", "**31.0 ± 1.0**", "98.5 ± 0.5"]
