"""Report files from the result store: tables (Markdown, LaTeX, CSV), plots and image grids.

``dd_bench.report.aggregate`` turns records into frames; this module renders them and writes
``table.*`` and ``cost.*`` (and, through ``plots`` and ``grids``, the figures).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dd_bench.report.aggregate import (FAILED, NOT_REACHED, PARTIAL, Report, accuracy_wide, build_report, cell_text,
                                       failure_lines, protocol_line, stored_speedup_vs)

log = logging.getLogger(__name__)



# -- rendering -------------------------------------------------------------------------------
def _accuracy_notes(report: Report, group: str) -> list[str]:
    cells = report.cells[report.cells["group"] == group]
    refs = list(dict.fromkeys(cells[cells["reference"]]["method"]))
    return [f"Accuracy (%) on the real test set, eval {group}: mean ± std over all evaluation runs of all seeds "
            "(runs and seeds pooled, population std). Best method per row in bold"
            + (f" (reference columns {', '.join(refs)} excluded)" if refs else "") + ". "
            "'failed': every seed failed; 'missing': no record; '(k/m seeds)': only k of m seeds finished.",
            protocol_line(report.frame[report.frame["group"] == group])]


def _cost_notes(report: Report, group: str) -> list[str]:
    frame = report.frame[report.frame["group"] == group]
    kinds = ", ".join(k for k in dict.fromkeys(frame["memory_kind"]) if k) or "?"
    notes = [f"Cost per cell, eval {group}: means over finished seeds; prepare = one-off build (max over seeds; "
             f"cached builds report 0); peak memory per phase prepare/distill/evaluate in MiB ({kinds})."]
    if report.speedup_vs is None:
        notes.append("No speedup reference: pass --speedup-vs LABEL or set report.speedup_vs in the suite.")
    else:
        how = ("linear interpolation between snapshots" if report.interpolate
               else "first evaluated snapshot or final set reaching it, not interpolated")
        notes.append(f"Speedup = distillation seconds of {report.speedup_vs} ÷ the method's, same dataset and IPC "
                     f"(in brackets: including preparation). Time to acc. = distillation seconds until the seed-pooled "
                     f"mean accuracy reaches {report.speedup_vs}'s final accuracy in that row ({how}); "
                     f"'{NOT_REACHED}' when it never does. 'selection': a baseline that picks real images "
                     "and takes no distillation steps has no speedup.")
    return notes + [protocol_line(frame)]


def _seconds(x: float) -> str:
    return "–" if x != x else f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.3g}"


def _mib(x: float) -> str:
    return "–" if x != x else f"{x:.0f}"


def cost_display(report: Report, group: str) -> pd.DataFrame:
    """The cost table of one eval group as strings, rows (dataset, ipc, method)."""
    rows = {}
    for c in report.cost[report.cost["group"] == group].itertuples():
        done = c.status != FAILED
        row = {"status": c.status if c.status != PARTIAL else f"{c.seeds} seeds ok, others failed",
               "seeds": c.seeds, "steps": f"{c.steps:.0f}" if done else "–", "prepare s": _seconds(c.prepare_seconds),
               "distill s": _seconds(c.distill_seconds), "s/step": _seconds(c.seconds_per_step),
               "evaluate s": _seconds(c.evaluate_seconds),
               "peak MiB p/d/e": "/".join(_mib(m) for m in (c.peak_prepare_mb, c.peak_distill_mb, c.peak_evaluate_mb)),
               "device": c.device or "–"}
        if report.speedup_vs is not None:
            row[f"speedup vs {report.speedup_vs}"] = "selection" if done and c.steps == 0 else (
                "–" if c.speedup != c.speedup else
                f"{c.speedup:.3g}× ({c.speedup_incl_prepare:.3g}×)")
            row[f"time to {report.speedup_vs} acc."] = ("–" if not done or c.tta_target != c.tta_target
                                                          else NOT_REACHED if not c.tta_reached
                                                          else f"{_seconds(c.tta_seconds)} s (step {c.tta_step:.0f})")
        rows[(c.dataset, c.ipc, c.method)] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    return table.rename_axis(["dataset", "IPC", "method"])


def markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency such as tabulate)."""
    header = [str(n) for n in table.index.names] + [str(c) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for key, row in table.iterrows():
        keys = list(key) if isinstance(key, tuple) else [key]
        lines.append("| " + " | ".join(str(v) for v in keys + row.tolist()) + " |")
    return "\n".join(lines)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "×": r"$\times$",
        "÷": r"$\div$", "–": "--"}


def tex_escape(text: Any) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def latex(table: pd.DataFrame, caption: str, notes: list[str], bold: pd.DataFrame | None = None) -> str:
    """A booktabs table (pandas Styler) with the notes, protocol included, set under it."""
    flat = table.reset_index()
    first = flat.columns[0]
    flat[first] = flat[first].where(flat[first].ne(flat[first].shift()), "")  # dataset once per block
    flat = flat.map(tex_escape)
    flat.columns = [tex_escape(c) for c in flat.columns]
    styler = flat.style.hide(axis="index")
    if bold is not None:
        mask = pd.DataFrame(False, index=flat.index, columns=flat.columns)
        mask.iloc[:, table.index.nlevels:] = bold.to_numpy(dtype=bool)
        styler = styler.apply(lambda _: np.where(mask, "textbf:--rwrap;", ""), axis=None)
    tabular = styler.to_latex(hrules=True, column_format="l" * table.index.nlevels + "r" * table.shape[1])
    notes_tex = "\\\\\n".join(tex_escape(n) for n in notes)
    return (f"% needs \\usepackage{{booktabs}}\n\\begin{{table}}[ht]\n\\centering\n\\caption{{{tex_escape(caption)}}}\n"
            f"\\small\n{tabular}\\par\\smallskip\n{{\\footnotesize {notes_tex}}}\n\\end{{table}}\n")


def _markdown_sections(report: Report, title: str, table: Any, notes: Any) -> str:
    parts = []
    for group in report.groups:
        parts += [f"## {title}, eval {group}", "", markdown(table(group)), ""]
        parts += [n + "  " for n in notes(report, group)] + [""]  # two spaces: a Markdown line break
    return "\n".join(parts)


def accuracy_markdown(report: Report) -> str:
    bold = lambda c: f"**{cell_text(c)}**" if c.best else cell_text(c)  # noqa: E731
    text = _markdown_sections(report, "Accuracy (%)", lambda g: accuracy_wide(report.cells, g, bold), _accuracy_notes)
    return "\n".join([text, *failure_lines(report.frame)]).rstrip() + "\n"


def cost_markdown(report: Report) -> str:
    return _markdown_sections(report, "Cost", lambda g: cost_display(report, g), _cost_notes).rstrip() + "\n"


def accuracy_latex(report: Report) -> str:
    return "\n".join(latex(accuracy_wide(report.cells, g, cell_text), f"Test accuracy (%), eval {g}",
                           _accuracy_notes(report, g), accuracy_wide(report.cells, g, lambda c: c.best))
                     for g in report.groups)


def cost_latex(report: Report) -> str:
    return "\n".join(latex(cost_display(report, g), f"Cost, eval {g}", _cost_notes(report, g)) for g in report.groups)


def _with_protocol(report: Report, table: pd.DataFrame) -> pd.DataFrame:
    lines = {g: protocol_line(report.frame[report.frame["group"] == g]) for g in report.groups}
    return table.rename(columns={"group": "eval"}).assign(protocol=table["group"].map(lines))


def write_tables(report: Report) -> list[Path]:
    """table.md/.tex/.csv (accuracy) and cost.md/.tex/.csv in the store directory."""
    d = report.directory
    files = {d / "table.md": accuracy_markdown(report), d / "table.tex": accuracy_latex(report),
             d / "cost.md": cost_markdown(report), d / "cost.tex": cost_latex(report)}
    for path, text in files.items():
        path.write_text(text)
    _with_protocol(report, report.cells).to_csv(d / "table.csv", index=False)
    _with_protocol(report, report.cost).to_csv(d / "cost.csv", index=False)
    return [*files, d / "table.csv", d / "cost.csv"]


def summary(directory: str | Path, speedup_vs: str | None = None) -> str:
    """The text printed at the end of a run and by ``dd-bench report``: both tables with their notes."""
    report = build_report(directory, speedup_vs or stored_speedup_vs(directory))
    if report is None:
        return "(no results yet)"
    return accuracy_markdown(report) + "\n\n" + cost_markdown(report)
