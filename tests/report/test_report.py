"""Tests for dd_bench.report (tables), dd_bench.report.plots and dd_bench.report.grids on a hand-built store.

The store below is written record by record with known accuracies and times, so every number
the report shows can be checked against arithmetic done by hand in the comments.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dd_bench.cli import main
from dd_bench.method import SyntheticSet
from dd_bench.report import build_report, summary, write_report
from dd_bench.report.aggregate import time_to_accuracy
from dd_bench.report.grids import to_pixels
from dd_bench.run.store import ResultStore

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NUM_CLASSES = 3


PROTOCOL = {"model": "ConvNet", "epochs": 300, "runs": 2, "lr": 0.01, "use_learned_lr": True, "momentum": 0.9,
            "weight_decay": 0.0005, "batch_size": 256, "augment": "dsa", "dsa_strategy": "color_crop",
            "schedule": "step", "optimizer": "sgd", "precision": "fp32", "version": 2}
TRAITS = {"random": {"reference": "lower", "iterative": False}, "full": {"reference": "upper", "ipc_free": True,
                                                                         "iterative": False}}


def _evaluation(accuracies: list[float], ipc: int, model: str, step: int | None = None, protocol_name: str = "main",
                protocol: dict | None = None) -> dict:
    return {"protocol_name": protocol_name, "request_key": f"{protocol_name}-{model}",
            "protocol": dict(protocol or PROTOCOL, model=model), "protocol_text": f"{model}, 300 epochs",
            "model": model, "ipc": ipc, "step": step, "accuracies": accuracies,
            "accuracy_mean": sum(accuracies) / len(accuracies), "accuracy_std": 0.0, "seconds": 1.5, "lr": 0.01,
            "label_type": "hard (CE)", "eval_version": 2}


def _record(store: ResultStore, label: str, ipc: int, seed: int, accuracies: list[float] | None = None, *,
            method: str | None = None, distill: float = 1.0, steps: int = 20, snapshots: list[dict] = (),
            model: str = "ConvNet", with_set: bool = True, init: float = 0.0, deployed: dict | None = None,
            extra_evaluations: list[dict] = ()) -> None:
    """Append one format-2 record; ``accuracies=None`` makes it a failed cell; ``deployed``: {ipc: (accuracies,
    produce seconds)} for a generator's other IPCs."""
    method = method or label
    cell_id = f"{label}-{model}-ipc{ipc}-s{seed}"
    failed = accuracies is None
    sets, evaluations = [], []
    if not failed:
        for set_ipc, (accs, produce) in {ipc: (accuracies, 0.0), **(deployed or {})}.items():
            path = None
            if with_set:
                syn = SyntheticSet(torch.randn(NUM_CLASSES * set_ipc, 1, 8, 8),
                                   torch.arange(NUM_CLASSES).repeat_interleave(set_ipc),
                                   meta={"mean": [0.1307], "std": [0.3081], "zca": False})
                target = store.set_path(cell_id, None if set_ipc == ipc else set_ipc)
                syn.save(target)
                path = str(target.relative_to(store.directory))
            sets.append({"ipc": set_ipc, "path": path, "produce_seconds": produce, "size": NUM_CLASSES * set_ipc})
            evaluations.append(_evaluation(accs, set_ipc, model))
        evaluations += [_evaluation(s["accuracies"], ipc, model, step=s["step"]) for s in snapshots]
        evaluations += list(extra_evaluations)
    store.append({
        "format": 2, "cell_id": cell_id, "suite": "fixture", "status": "failed" if failed else "ok",
        "method": method, "label": label, "dataset": "mnist_sample", "ipc": ipc, "seed": seed, "config": {},
        "method_version": "1", "traits": TRAITS.get(method, {"reference": None, "iterative": True}),
        "deploy_ipc": sorted(deployed or {}), "data": {"zca": False},
        "budget": {"steps": 20, "seconds": None, "snapshot_every": 5},
        "steps": 0 if failed else steps, "prepare_seconds": 0.0, "prepare_cached": False, "artifact": None,
        "init_seconds": 0.0 if failed else init, "distill_seconds": 0.0 if failed else distill,
        "seconds_per_step": distill / steps if steps and not failed else None, "evaluate_seconds": 3.0,
        "sets": sets, "evaluations": evaluations,
        "snapshots": [{"step": s["step"], "distill_seconds": s["distill_seconds"], "path": None} for s in snapshots],
        "peak_memory_mb": {"prepare": 100.0, "distill": 200.0, "evaluate": 300.0}, "memory_kind": "process_rss",
        "device": "cpu:test", "metrics": {}, "dataset_info": {"name": "mnist_sample", "num_classes": NUM_CLASSES,
                                                               "zca": False},
        "env": {}, "error": "RuntimeError: boom" if failed else None, "traceback": None,
        "started_at": "", "finished_at": f"2026-01-01T00:00:{seed:02d}",
    })


def _snap(step: int, seconds: float, accuracies: list[float]) -> dict:
    return {"step": step, "distill_seconds": seconds, "accuracies": accuracies}


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
    # In brackets: the gain over random at the same dataset, IPC and protocol; never shown for random itself.
    assert _row(table, 1) == ["mnist_sample", "1", "13.0 ± 2.2", "24.0 ± 3.7 (+11.0)", "**32.0 ± 1.9 (+19.0)**",
                              "failed"]
    assert _row(table, 10) == ["mnist_sample", "10", "63.0 ± 2.2", "**53.0 ± 2.2 (-10.0)**",
                               "46.0 ± 1.0 (-17.0) (1/2 seeds)", "missing"]
    assert "runs and seeds pooled" in table and "gain over random in points" in table
    assert "## Accuracy (%), eval main · ConvNet" in table


def test_latex_cells_bold_and_booktabs(written) -> None:
    tex = (written[0] / "table.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    line = next(l for l in tex.splitlines() if l.startswith("mnist\\_sample & 1 &"))
    cells = [c.strip() for c in line.rstrip("\\ ").split("&")]
    assert cells == ["mnist\\_sample", "1", "13.0 $\\pm$ 2.2", "24.0 $\\pm$ 3.7 (+11.0)",
                     "\\textbf{32.0 $\\pm$ 1.9 (+19.0)}", "failed"]
    line10 = next(l for l in tex.splitlines() if l.lstrip().startswith("& 10 &"))
    assert "\\textbf{53.0 $\\pm$ 2.2 (-10.0)}" in line10 and "\\textbf{63.0" not in line10


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
    assert float(by["dm", "1"]["gain"]) == 19.0 and by["random", "1"]["gain"] == ""


def test_failed_and_missing_never_show_as_zero(written) -> None:
    for name in ("table.md", "table.tex"):
        text = (written[0] / name).read_text()
        assert "0.0 ± 0.0" not in text and "0.0 $\\pm$ 0.0" not in text
    assert "FAILED mtt mnist_sample ipc=1 seed=0" in (written[0] / "table.md").read_text()
    cost = (written[0] / "cost.md").read_text()
    mtt = next(l for l in cost.splitlines() if "| mtt |" in l)
    assert "failed" in mtt and "| 0 |" not in mtt.split("| failed |")[1]


def test_speedup_is_the_ratio_of_adaptation_plus_production_seconds(written) -> None:
    cost = pd.read_csv(written[0] / "cost.csv")
    at = cost.set_index(["ipc", "method"])
    assert at.loc[(1, "dm"), "distill_seconds"] == 11.0
    assert at.loc[(1, "dm"), "speedup"] == pytest.approx(110.0 / 11.0)
    assert at.loc[(1, "dc"), "speedup"] == pytest.approx(1.0)
    assert at.loc[(10, "dm"), "speedup"] == pytest.approx(200.0 / 20.0)
    assert "| mnist_sample | 1 | dm |" in (md := (written[0] / "cost.md").read_text()) and "| 10× |" in md


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
    assert "5.5 s (step 10)" in md and "not reached" in md and "not interpolated" in md and "stays at or above" in md
    report = build_report(written[0], "dc", interpolate=True)
    dm = report.cost.set_index(["ipc", "method"]).loc[(1, "dm")]
    assert dm["tta_seconds"] == pytest.approx(2.2 + 0.75 * 3.3)


def test_time_to_accuracy_needs_the_curve_to_stay_above_the_target() -> None:
    """A lucky snapshot that touches the target once and falls back does not count."""
    points = pd.DataFrame({"step": [1, 2, 3, 4], "seconds": [1.0, 2.0, 3.0, 4.0], "mean": [10.0, 30.0, 20.0, 28.0]})
    assert time_to_accuracy(points, 25.0) == (4.0, 4)           # step 2 reached it, but step 3 fell back
    assert time_to_accuracy(points, 20.0) == (2.0, 2)           # from step 2 on, every point is >= 20
    assert time_to_accuracy(points, 15.0, interpolate=True) == (1.25, 2)
    assert time_to_accuracy(points, 31.0) is None


def test_protocol_line_under_every_table(written) -> None:
    for name in ("table.md", "cost.md"):
        lines = (written[0] / name).read_text().splitlines()
        last_table_line = max(i for i, l in enumerate(lines) if l.startswith("|"))
        after = "\n".join(lines[last_table_line + 1 :])
        assert "Protocol: preset: none | eval: ConvNet | length: 300 epochs" in after
        for part in ("aug: DSA(color_crop)", "labels: hard (CE)", "runs per set: 2", "seeds: 2 (0, 1)",
                     "budget: 20 steps", "device: cpu:test", "precision: fp32", "×0.1 after pass E/2+1"):
            assert part in after, (name, part)
    for name in ("table.tex", "cost.tex"):
        tex = (written[0] / name).read_text()
        assert tex.index("Protocol: preset: none | eval: ConvNet") > tex.index("\\end{tabular}")
        assert "device: cpu:test" in tex


def test_plots_and_grids_are_written(written) -> None:
    directory, paths = written
    for stem in ("accuracy_vs_time", "accuracy_vs_steps", "speedup"):
        for ext in ("png", "pdf"):
            assert directory / "plots" / f"{stem}.{ext}" in paths
    grids = sorted((directory / "grids").glob("*.png"))
    ok_with_sets = 11  # every ok record above
    assert len(grids) == ok_with_sets and directory / "grids" / "dm_mnist_sample_ipc1_seed0.png" in paths
    assert directory / "cross_arch.md" not in paths  # one architecture only
    for path in paths:
        assert path.exists() and path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG_MAGIC
    assert (directory / "report.json").exists()  # the reference method is kept for the next run


def test_cross_architecture_tables_and_heat_map(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "xarch")
    alexnet = lambda accs: [_evaluation(accs, 1, "AlexNet")]  # noqa: E731  (one set, scored on two nets)
    _record(store, "dc", 1, 0, [40, 42], with_set=False, extra_evaluations=alexnet([30, 32]))
    _record(store, "dm", 1, 0, [50, 52], with_set=False, extra_evaluations=alexnet([40, 42]))
    _record(store, "dsa", 1, 0, None)
    paths = write_report(store.directory, grids=False)
    assert store.directory / "plots" / "cross_arch.png" in paths and store.directory / "cross_arch.md" in paths
    table = (store.directory / "table.md").read_text()
    assert "## Accuracy (%), eval main · ConvNet" in table and "## Accuracy (%), eval main · AlexNet" in table
    convnet, alexnet_part = table.split("## Accuracy (%), eval main · AlexNet")
    assert _row(convnet, 1)[2:] == ["41.0 ± 1.0", "**51.0 ± 1.0**", "failed"]
    assert _row(alexnet_part, 1)[2:] == ["31.0 ± 1.0", "**41.0 ± 1.0**", "failed"]
    assert "eval: AlexNet" in alexnet_part
    cross = (store.directory / "cross_arch.md").read_text()
    assert "| dataset | IPC | method | ConvNet | AlexNet |" in cross
    assert "| mnist_sample | 1 | dm | 51.0 ± 1.0 | 41.0 ± 1.0 |" in cross
    only = summary(store.directory, model="AlexNet")
    assert "eval main · AlexNet" in only and "eval main · ConvNet" not in only


def test_a_generator_is_charged_its_adaptation_once_and_each_ipc_its_production(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "deploy")
    _record(store, "mgdd", 10, 0, [70.0, 72.0], distill=30.0, init=2.0,
            deployed={1: ([50.0, 52.0], 0.1), 50: ([80.0, 82.0], 0.4)})
    _record(store, "dc", 10, 0, [65.0, 67.0], distill=320.0)
    write_report(store.directory, "dc", plots=False, grids=False)
    cost = pd.read_csv(store.directory / "cost.csv").set_index(["ipc", "method"])
    for ipc in (1, 10, 50):
        assert cost.loc[(ipc, "mgdd"), "distill_seconds"] == 30.0 and cost.loc[(ipc, "mgdd"), "init_seconds"] == 2.0
    assert cost.loc[(1, "mgdd"), "produce_seconds"] == 0.1 and cost.loc[(50, "mgdd"), "produce_seconds"] == 0.4
    assert cost.loc[(10, "mgdd"), "speedup"] == pytest.approx(320.0 / 32.0)
    md = (store.directory / "cost.md").read_text()
    assert "32.0 (adapted at 10, shared by 1/10/50)" in md
    assert "Suite totals: adaptation 352 s" in md  # mgdd's 32 s once, dc's 320 s; not 3 x 32
    table = (store.directory / "table.md").read_text()
    assert _row(table, 1)[2] == "**51.0 ± 1.0**" and _row(table, 50)[2] == "**81.0 ± 1.0**"


def test_records_of_an_older_method_version_are_left_out_and_said_so(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "stale")
    _record(store, "dc", 1, 0, [20, 22], with_set=False)
    _record(store, "dm", 1, 0, [30, 32], with_set=False)
    lines = store.path.read_text().splitlines()
    old = json.loads(lines[1])
    old["method_version"] = "0"
    store.path.write_text(lines[0] + "\n" + json.dumps(old) + "\n")
    text = summary(store.directory)
    assert "Left out: 1 record(s) of dm made by its version 0; the installed version is 1" in text
    assert "| dm |" not in text.split("## Cost")[0]


def test_a_results_directory_from_the_old_format_still_reports(tmp_path: Path) -> None:
    import shutil

    shutil.copytree(Path(__file__).parent.parent / "fixtures" / "legacy_v1", tmp_path / "legacy")
    paths = write_report(tmp_path / "legacy", plots=False)
    table = (tmp_path / "legacy" / "table.md").read_text()
    assert "eval main · ConvNet (evaluation v1)" in table and "| mnist_sample | 1 |" in table
    assert any(p.suffix == ".png" for p in paths)  # grids of the old sets


def test_cli_report_and_bad_reference(written, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    directory = build_store(tmp_path / "cli")
    assert main(["report", str(directory), "--speedup-vs", "dm", "--no-plots", "--no-grids"]) == 0
    out = capsys.readouterr().out
    assert "speedup vs dm" in out and "**32.0 ± 1.9 (+19.0)**" in out
    assert not (directory / "plots").exists()
    assert main(["report", str(directory), "--speedup-vs", "nope", "--no-plots", "--no-grids"]) == 2
    assert "available: random, dc, dm, mtt" in capsys.readouterr().err


def test_summary_still_works(written) -> None:
    text = summary(written[0])
    assert "**32.0 ± 1.9 (+19.0)**" in text and "speedup vs dc" in text  # reference kept from write_report


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
    assert _row(table, 1)[2:] == ["12.0 ± 1.0", "**22.0 ± 1.0 (+10.0)**", "98.5 ± 0.5"]  # no gain for references
    assert _row(table, 10)[2:] == ["21.0 ± 1.0", "**31.0 ± 1.0 (+10.0)**", "98.5 ± 0.5"]
