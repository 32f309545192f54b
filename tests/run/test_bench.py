"""The speed-regression check (dd_bench/run/bench.py): ratio rows from pytest-benchmark JSON,
baselines with margins from the spread, the verdicts, the CLI, and, end to end, that a
deliberately slowed step makes the check fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dd_bench.cli import main
from dd_bench.errors import ConfigError
from dd_bench.run import bench
from dd_bench.run.bench import BaselineEntry, RatioRow, compare, load_baseline, make_baseline, rows_from_pytest_json


def _entry(row: str, data: list[float], reference: list[float], units: float = 1, unit: str = "step") -> dict:
    return {"name": f"test_{row}", "stats": {"data": data},
            "extra_info": {"row": row, "unit": unit, "units_per_call": units, "reference_seconds": reference}}


def _pytest_json(path: Path, *entries: dict) -> Path:
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": list(entries)}))
    return path


def test_ratio_is_the_median_of_paired_rounds_per_unit():
    blob = {"benchmarks": [
        _entry("eval epoch", [2.0, 4.0, 3.0], [1.0, 2.0, 1.0], units=2, unit="epoch"),
        {"name": "test_paper_settings", "stats": {"data": [5.0]}, "extra_info": {}},  # no reference: not a row
    ]}
    (row,) = rows_from_pytest_json(blob)
    # per round: (2/2)/1 = 1, (4/2)/2 = 1, (3/2)/1 = 1.5 -> median 1; seconds per unit = median(2,4,3)/2
    assert (row.row, row.ratio, row.seconds, row.reference_seconds, row.unit, row.rounds) == \
        ("eval epoch", 1.0, 1.5, 1.0, "epoch", 3)


def test_margin_is_k_times_spread_with_a_floor():
    runs = [[RatioRow("a", r, 1, 1, "step", 5), RatioRow("b", 2.0, 1, 1, "step", 5)] for r in (9.0, 10.0, 11.0)]
    baseline = make_baseline(runs, k=3.0, floor=0.2)
    assert baseline["a"].ratio == 10.0 and baseline["a"].spread == pytest.approx(0.2)
    assert baseline["a"].margin == pytest.approx(0.6)  # 3 * (11 - 9) / 10
    assert baseline["b"].margin == 0.2  # no spread: the floor


def test_verdicts():
    baseline = {"same": BaselineEntry(10.0, 0.2), "slow": BaselineEntry(10.0, 0.2), "fast": BaselineEntry(10.0, 0.2),
                "gone": BaselineEntry(1.0, 0.2)}
    rows = [RatioRow(name, ratio, 1, 1, "step", 5) for name, ratio in
            [("same", 11.9), ("slow", 12.1), ("fast", 7.9), ("new", 3.0)]]
    verdicts = {v.row: v for v in compare(rows, baseline)}
    assert {name: v.status for name, v in verdicts.items()} == \
        {"same": "ok", "slow": "SLOWER", "fast": "faster", "new": "new", "gone": "not run"}
    assert [v.row for v in verdicts.values() if v.failed] == ["slow"]
    assert bench.verdict_line(list(verdicts.values()), "b.json").startswith("bench: FAIL: slower beyond the margin")
    assert "slow" in bench.render(list(verdicts.values()))


def test_baseline_round_trip_and_pytest_json_as_baseline(tmp_path):
    runs = [[RatioRow("step dm", r, 1, 1, "step", 5)] for r in (4.0, 5.0)]
    bench.save_baseline(tmp_path / "b.json", make_baseline(runs), k=3.0, floor=0.2)
    loaded = load_baseline(tmp_path / "b.json")
    assert loaded["step dm"].ratio == 4.5 and loaded["step dm"].runs == [4.0, 5.0]
    raw = _pytest_json(tmp_path / "raw.json", _entry("step dm", [1.0], [0.5]))
    assert load_baseline(raw, floor=0.3) == {"step dm": BaselineEntry(2.0, 0.3, 0.0, [2.0])}


@pytest.mark.parametrize("content, message", [(None, "file not found"), ("{", "is not JSON"),
                                              ('{"format": 99}', "neither a dd-bench baseline")])
def test_bad_baseline_is_one_config_error(tmp_path, content, message):
    path = tmp_path / "b.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_baseline(path)


def test_cli_compares_saved_runs(tmp_path, capsys):
    before = [_pytest_json(tmp_path / f"before{i}.json", _entry("step dm", [1.0 + 0.01 * i] * 3, [0.1] * 3),
                           _entry("cell overhead", [0.3] * 3, [0.1] * 3, unit="cell")) for i in range(3)]
    assert main(["bench", "--from", *map(str, before), "--save", str(tmp_path / "base.json")]) == 0
    after = _pytest_json(tmp_path / "after.json", _entry("step dm", [2.0] * 3, [0.1] * 3),
                         _entry("cell overhead", [0.3] * 3, [0.1] * 3, unit="cell"))
    assert main(["bench", "--from", str(after), "--compare", str(tmp_path / "base.json")]) == 1
    out = capsys.readouterr().out
    assert "step dm" in out and "SLOWER" in out and "+98.0%" in out
    assert out.strip().splitlines()[-1].startswith("bench: FAIL") and "step dm" in out.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_slowed_step_fails_the_check(tmp_path):
    """End to end through pytest-benchmark: the DM step run twice per round (the test-only switch
    in tests/benchmarks/test_ratios.py) against the same benchmark unslowed, measured just before."""
    unslowed, _ = bench.run_benchmarks(rounds=3, select="step and dm", json_path=tmp_path / "unslowed.json")
    slowed, _ = bench.run_benchmarks(rounds=3, select="step and dm", env={"DD_BENCH_TEST_SLOW": "step dm"})
    assert [r.row for r in unslowed] == [r.row for r in slowed] == ["step dm"]
    (verdict,) = compare(slowed, load_baseline(tmp_path / "unslowed.json"))
    assert verdict.failed and verdict.change > 0.5  # doubled work: about +100 %, far beyond the 20 % floor
