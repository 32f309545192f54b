"""Figures of a report (PNG and PDF): accuracy vs wall-clock and vs steps, speedup, accuracy per evaluation.

Draws what ``dd_bench.report.aggregate`` aggregated; computes nothing new. Figures are built on
``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, no display, no global state);
seaborn supplies the style, bars and heat maps. Each figure has one panel per (dataset, IPC),
and the protocol line printed beneath it, as under every table.
"""

from __future__ import annotations

import logging
import re
import textwrap
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from dd_bench.report.aggregate import Report, method_order, protocol_line

log = logging.getLogger(__name__)

FORMATS = ("png", "pdf")


def write_plots(report: Report, out_dir: str | Path) -> list[Path]:
    """Every figure the report's data supports; a figure with nothing to show is skipped (logged)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = _method_colors(report)
    written: list[Path] = []
    several = len(report.groups) > 1
    for group in report.groups:
        suffix = f"_{_slug(group)}" if several else ""
        curves = report.curves[report.curves["group"] == group]
        cells = report.cells[report.cells["group"] == group]
        if curves.empty:  # snapshots and curves exist for the first architecture of each protocol only
            continue
        footer = (f"eval {group}. x: init + distillation seconds (+ production for final sets). Error bars: ± std "
                  f"over all evaluation runs of all seeds. {_footer(report, group)}")
        written += _figure(out_dir / f"accuracy_vs_time{suffix}", cells, footer,
                           lambda ax, key: _accuracy_vs(ax, curves, cells, key, colors, "seconds"))
        iterative = curves[curves["step"] > 0]
        if iterative.empty:
            log.info("plots: no method took distillation steps under eval %s; accuracy-vs-steps skipped", group)
        else:
            written += _figure(out_dir / f"accuracy_vs_steps{suffix}", cells, footer,
                               lambda ax, key: _accuracy_vs(ax, curves, cells, key, colors, "step"))
    if report.speedup_vs is not None and report.groups:
        cells = report.cells[report.cells["group"] == report.groups[0]]
        note = (f"Speedup = (adapt + produce seconds) of {report.speedup_vs} ÷ the method's, same dataset and IPC "
                f"(preparation excluded). {_footer(report, report.groups[0])}")
        written += _figure(out_dir / "speedup", cells, note,
                           lambda ax, key: _speedup(ax, report.cost, key, colors, report.speedup_vs))
    if several:
        size = (max(4.0, 1.4 * len(report.groups) + 2), max(2.5, 0.55 * report.cells["method"].nunique() + 1.2))
        footer = "Mean accuracy (%) of each method (rows) under each evaluation protocol (columns). " + " ".join(
            f"[{g}] {_footer(report, g)}" for g in report.groups)
        written += _figure(out_dir / "cross_arch", report.cells, footer,
                           lambda ax, key: _cross_arch(ax, report.cells, key), panel_size=size)
    return written


# -- figure scaffolding ---------------------------------------------------------------------
def _figure(stem: Path, cells: pd.DataFrame, footer: str, draw: Callable[[Any, tuple[str, int]], None],
            panel_size: tuple[float, float] = (5.0, 3.6)) -> list[Path]:
    """One panel per (dataset, IPC): datasets as rows, IPCs as columns."""
    datasets = list(dict.fromkeys(cells["dataset"]))
    ipcs = sorted(cells["ipc"].unique())
    width, height = panel_size
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        fig = Figure(figsize=(width * len(ipcs), height * len(datasets)), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(datasets), len(ipcs), squeeze=False)
        present = set(zip(cells["dataset"], cells["ipc"]))
        for i, dataset in enumerate(datasets):
            for j, ipc in enumerate(ipcs):
                ax = axes[i][j]
                if (dataset, ipc) not in present:
                    ax.set_visible(False)
                    continue
                draw(ax, (dataset, int(ipc)))
                ax.set_title(f"{dataset}, IPC {ipc}")
        fig.supxlabel(textwrap.fill(footer, int(95 * len(ipcs) * width / 5)), x=0.0, ha="left", fontsize=6)
    paths = []
    for fmt in FORMATS:
        path = stem.with_suffix(f".{fmt}")
        fig.savefig(path, dpi=150)
        paths.append(path)
    return paths


def _footer(report: Report, group: str) -> str:
    return protocol_line(report.frame[report.frame["group"] == group])


def _method_colors(report: Report) -> dict[str, Any]:
    labels = method_order(report.frame)
    return dict(zip(labels, sns.color_palette("tab10", max(len(labels), 1))))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


# -- panels ---------------------------------------------------------------------------------
def _accuracy_vs(ax: Any, curves: pd.DataFrame, cells: pd.DataFrame, key: tuple[str, int], colors: dict,
                 x: str) -> None:
    """Accuracy vs distillation seconds (log x) or steps; reference methods as dashed lines."""
    dataset, ipc = key
    here = curves[(curves["dataset"] == dataset) & (curves["ipc"] == ipc)]
    row = cells[(cells["dataset"] == dataset) & (cells["ipc"] == ipc)]
    plotted = []
    for cell in row.itertuples():
        if cell.reference and cell.status in ("ok", "partial"):
            ax.axhline(cell.mean, ls="--", lw=1, color=colors[cell.method], label=f"{cell.method} (reference)")
            continue
        points = here[here["method"] == cell.method].sort_values("step")
        if x == "seconds" and (points[x] <= 0).any():
            log.info("plots: %s %s ipc %d: points at 0 s left off the log axis", cell.method, dataset, ipc)
            points = points[points[x] > 0]
        if points.empty or (x == "step" and points["step"].max() <= 0):
            continue
        partial = f" ({cell.n_seeds}/{cell.seeds_expected} seeds)" if cell.status == "partial" else ""
        ax.errorbar(points[x], points["mean"], yerr=points["std"], marker="o", ms=4, capsize=3, lw=1.2,
                    color=colors[cell.method], label=cell.method + partial)
        plotted += points[x].tolist()
    if x == "seconds":
        _log_seconds_axis(ax, plotted)
    else:
        ax.set_xlim(left=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("distillation steps")
    ax.set_ylabel("test accuracy (%)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")


def _log_seconds_axis(ax: Any, seconds: list[float]) -> None:
    """Log x spanning at least a decade; 1-2-5 ticks over a short span, decades over a long one."""
    ax.set_xscale("log")
    if seconds:
        low, high = min(seconds) / 2, max(seconds) * 2
        ax.set_xlim(low, high)
        subs = (1.0, 2.0, 5.0) if high / low < 1e3 else (1.0,)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("distillation wall-clock (s, log scale)")


def _speedup(ax: Any, cost: pd.DataFrame, key: tuple[str, int], colors: dict, reference: str) -> None:
    dataset, ipc = key
    here = cost[(cost["dataset"] == dataset) & (cost["ipc"] == ipc)].dropna(subset=["speedup"])
    if here.empty:
        ax.text(0.5, 0.5, f"no {reference} result here", ha="center", va="center", transform=ax.transAxes)
        return
    sns.barplot(data=here, x="method", y="speedup", hue="method", palette=colors, ax=ax, legend=False)
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", lw=0.8)
    for i, value in enumerate(here["speedup"]):
        ax.annotate(f"{value:.3g}×", (i, value), ha="center", va="bottom", fontsize=7)
    ax.set_xlabel("")
    ax.set_ylabel(f"speedup vs {reference} (log)")
    ax.tick_params(axis="x", rotation=30)


def _cross_arch(ax: Any, cells: pd.DataFrame, key: tuple[str, int]) -> None:
    """Heat map: methods x evaluation architectures; failed and missing cells say so."""
    dataset, ipc = key
    here = cells[(cells["dataset"] == dataset) & (cells["ipc"] == ipc)]
    means = here.pivot(index="method", columns="group", values="mean").astype(float)
    status = here.pivot(index="method", columns="group", values="status")
    order = list(dict.fromkeys(here["method"]))
    groups = list(dict.fromkeys(here["group"]))
    means, status = means.reindex(index=order, columns=groups), status.reindex(index=order, columns=groups)
    text = np.where(status.isin(["ok", "partial"]), means.map(lambda v: f"{v:.1f}"), status.fillna("missing"))
    ax.grid(False)
    sns.heatmap(means, annot=text, fmt="", cmap="viridis", ax=ax, cbar_kws={"label": "accuracy (%)"},
                mask=means.isna(), linewidths=0.5)
    ax.set_xlabel("evaluation architecture")
    ax.set_ylabel("")
    for (i, j), value in np.ndenumerate(np.asarray(text)):  # the heat map hides masked cells' annotations
        if means.isna().iat[i, j]:
            ax.text(j + 0.5, i + 0.5, value, ha="center", va="center", fontsize=7, color="dimgray")
