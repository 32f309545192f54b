"""Reports from the result store: tables (Markdown, LaTeX, CSV), plots and image grids.

``aggregate`` turns records into frames (and computes nothing the records do not hold);
``tables``, ``plots`` and ``grids`` render them; :func:`write_report` writes them all.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dd_bench.report.aggregate import SETTINGS_FILE, Report, build_report, speedup_vs_from_suite, stored_speedup_vs
from dd_bench.report.grids import write_grids
from dd_bench.report.plots import write_plots
from dd_bench.report.tables import summary, write_tables

log = logging.getLogger(__name__)

__all__ = ["Report", "build_report", "speedup_vs_from_suite", "summary", "write_report"]


def write_report(directory: str | Path, speedup_vs: str | None = None, *, plots: bool = True, grids: bool = True,
                 data_root: str | Path = "data", interpolate: bool = False, protocol: str | None = None,
                 model: str | None = None) -> list[Path]:
    """Write tables, plots and image grids into ``directory``; returns the files written.

    ``speedup_vs`` (a method label) is saved in ``report.json`` and reused when not given;
    ``protocol`` / ``model`` keep only that protocol's / architecture's tables.
    """
    directory = Path(directory)
    speedup_vs = speedup_vs or stored_speedup_vs(directory)
    report = build_report(directory, speedup_vs, interpolate, protocol=protocol, model=model)
    if report is None:
        log.warning("report: no records in %s", directory)
        return []
    if report.speedup_vs:
        (directory / SETTINGS_FILE).write_text(json.dumps({"speedup_vs": report.speedup_vs}, indent=1) + "\n")
    written = write_tables(report)
    if plots:
        written += write_plots(report, directory / "plots")
    if grids:
        written += write_grids(report.frame, directory, directory / "grids", data_root=data_root)
    log.info("report: wrote %d files under %s", len(written), directory)
    return written
