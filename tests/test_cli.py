"""The command line as a user meets it: exit codes, one-line errors, resume messages."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dd_bench.cli import main


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dd_bench.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.mark.parametrize(
    "overrides, field",
    [({"bogus": 1}, "unknown key 'bogus'"), ({"methods": ["nope"]}, "unknown method 'nope'"),
     ({"ipc": [0]}, "ipc[0]: invalid value 0")],
)
def test_broken_suite_is_one_line_and_exit_2(write_suite, overrides, field, tmp_path):
    result = _run("run", str(write_suite(overrides)), "--results", str(tmp_path / "r"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dd-bench: error: ") and field in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_data_is_one_line(write_suite, tmp_path):
    suite = write_suite({"datasets": ["cifar10"], "data": {"root": str(tmp_path / "nodata")}})
    result = _run("run", str(suite), "--results", str(tmp_path / "r"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "cifar10" in result.stderr and "Traceback" not in result.stderr


def test_run_then_rerun_does_nothing(write_suite, tmp_path, capsys, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="dd_bench")
    suite = str(write_suite())
    assert main(["run", suite, "--results", str(tmp_path / "r"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| mnist_sample | 1 |" in out
    caplog.clear()
    assert main(["run", suite, "--results", str(tmp_path / "r"), "--no-progress"]) == 0
    assert "nothing to do: all 1 cells of suite 'tiny' are already in" in caplog.text


def test_list_methods_and_models(capsys):
    assert main(["list", "methods"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert {"random", "herding", "kcenter", "full"} <= set(names)
    assert main(["list", "models"]) == 0
    assert "ConvNet" in capsys.readouterr().out


def test_dry_run_lists_cells(write_suite, capsys):
    assert main(["run", str(write_suite({"seeds": [0, 1]})), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("random mnist_sample ipc=1") == 2
