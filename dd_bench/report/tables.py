"""Tables of a report: accuracy per (protocol · architecture), cross-architecture, cost; as
Markdown, LaTeX (booktabs, with the protocol line under every table) and CSV."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dd_bench.report.aggregate import (FAILED, NOT_REACHED, PARTIAL, Report, accuracy_wide, build_report, cell_text,
                                       cross_arch_wide, failure_lines, protocol_line, stored_speedup_vs, suite_totals)

log = logging.getLogger(__name__)


# -- rendering -------------------------------------------------------------------------------
def _accuracy_notes(report: Report, group: str) -> list[str]:
    cells = report.cells[report.cells["group"] == group]
    refs = list(dict.fromkeys(cells[cells["reference"]]["method"]))
    lower = list(dict.fromkeys(cells[cells["lower_reference"]]["method"]))
    gain = (f" In brackets: gain over {lower[0]} in points at the same dataset, IPC and protocol (DD-Ranking's IOR)."
            if lower and cells["gain"].notna().any() else "")
    return [f"Accuracy (%) on the real test set, eval {group}: mean ± std over all evaluation runs of all seeds "
            "(runs and seeds pooled, population std); each network trained for the protocol's full length and "
            "tested once. Best method per row in bold"
            + (f" (reference columns {', '.join(refs)} excluded)" if refs else "") + "." + gain +
            " 'failed': every seed failed; 'missing': no record; '(k/m seeds)': only k of m seeds finished.",
            protocol_line(report.frame[report.frame["group"] == group]), *report.notes]


def _cost_notes(report: Report) -> list[str]:
    frame = report.frame
    kinds = ", ".join(k for k in dict.fromkeys(frame["memory_kind"]) if k) or "?"
    notes = ["Cost per set: means over finished seeds. adapt s = init + distillation steps (a generator adapted "
             "once and deployed at several IPCs shows the same adaptation on each, marked 'shared by'); produce s = "
             "making the set after the steps (a generator's forward pass at that IPC); prepare s = build time of "
             "the shared artifact the cell used (reported even when it was cached, marked *); evaluate s = all "
             f"evaluations of that set. Peak memory per phase prepare/distill/evaluate in MiB ({kinds})."]
    if report.speedup_vs is None:
        notes.append("No speedup reference: pass --speedup-vs LABEL or set report.speedup_vs in the suite.")
    else:
        how = ("linear interpolation before that point" if report.interpolate else "not interpolated")
        first = report.groups[0] if report.groups else "?"
        notes.append(f"Speedup = (adapt + produce seconds) of {report.speedup_vs} ÷ the method's, same dataset and "
                     f"IPC; preparation excluded (its one-off cost is shown). Time to acc. = adapt seconds at the "
                     f"first evaluated snapshot (or final set) from which the seed-pooled mean accuracy under "
                     f"{first} reaches {report.speedup_vs}'s final accuracy in that row and stays at or above it "
                     f"({how}); '{NOT_REACHED}' when it does not end there. 'selection': a baseline that picks real "
                     "images takes no distillation steps and has no speedup.")
    totals = suite_totals(frame)
    notes.append(f"Suite totals: adaptation {_seconds(totals['adaptation_seconds'])} s (each cell once, however many "
                 f"IPCs it served), production {_seconds(totals['production_seconds'])} s, preparation "
                 f"{_seconds(totals['prepare_seconds'])} s (each artifact once), evaluation "
                 f"{_seconds(totals['evaluate_seconds'])} s.")
    if report.groups:
        notes.append(protocol_line(frame[frame["group"] == report.groups[0]]))
    return notes + report.notes


def _seconds(x: float) -> str:
    return "–" if x != x else f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.3g}"


def _mib(x: float) -> str:
    return "–" if x != x else f"{x:.0f}"


def cost_display(report: Report) -> pd.DataFrame:
    """The cost table as strings, rows (dataset, ipc, method)."""
    rows = {}
    for c in report.cost.itertuples():
        done = c.status != FAILED
        adapt = _seconds(c.init_seconds + c.distill_seconds)
        if c.shared_by:
            adapt += f" (adapted at {c.adapt_ipc}, shared by {'/'.join(map(str, c.shared_by))})"
        row = {"status": c.status if c.status != PARTIAL else f"{c.seeds} seeds ok, others failed",
               "seeds": c.seeds, "steps": f"{c.steps:.0f}" if done else "–", "adapt s": adapt if done else "–",
               "init s": _seconds(c.init_seconds), "s/step": _seconds(c.seconds_per_step),
               "produce s": _seconds(c.produce_seconds),
               "prepare s": _seconds(c.prepare_seconds) + ("*" if c.prepare_cached and c.prepare_seconds > 0 else ""),
               "evaluate s": _seconds(c.evaluate_seconds),
               "peak MiB p/d/e": "/".join(_mib(m) for m in (c.peak_prepare_mb, c.peak_distill_mb, c.peak_evaluate_mb)),
               "device": c.device or "–"}
        if report.speedup_vs is not None:
            row[f"speedup vs {report.speedup_vs}"] = "selection" if done and c.steps == 0 else (
                "–" if c.speedup != c.speedup else f"{c.speedup:.3g}×")
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


def _bold(cell: Any) -> str:
    return f"**{cell_text(cell)}**" if cell.best else cell_text(cell)


def accuracy_markdown(report: Report) -> str:
    text = _markdown_sections(report, "Accuracy (%)", lambda g: accuracy_wide(report.cells, g, _bold), _accuracy_notes)
    return "\n".join([text, *failure_lines(report.frame)]).rstrip() + "\n"


def cost_markdown(report: Report) -> str:
    parts = ["## Cost", "", markdown(cost_display(report)), ""] + [n + "  " for n in _cost_notes(report)]
    return "\n".join(parts).rstrip() + "\n"


def cross_arch_markdown(report: Report) -> str | None:
    """One table per protocol evaluated on several architectures (rows methods, columns architectures)."""
    parts = []
    for name in report.protocol_names:
        table = cross_arch_wide(report.cells, name, lambda c: cell_text(c, with_gain=False))
        if table is not None:
            parts += [f"## Cross-architecture accuracy (%), protocol {name}", "", markdown(table), "",
                      f"Sets distilled once, each scored by protocol {name} on every architecture; mean ± std over "
                      "all runs of all seeds.  ", ""]
    return "\n".join(parts).rstrip() + "\n" if parts else None


def accuracy_latex(report: Report) -> str:
    return "\n".join(latex(accuracy_wide(report.cells, g, cell_text), f"Test accuracy (%), eval {g}",
                           _accuracy_notes(report, g), accuracy_wide(report.cells, g, lambda c: c.best))
                     for g in report.groups)


def cost_latex(report: Report) -> str:
    return latex(cost_display(report), "Cost", _cost_notes(report))


def cross_arch_latex(report: Report) -> str | None:
    tables = []
    for name in report.protocol_names:
        table = cross_arch_wide(report.cells, name, lambda c: cell_text(c, with_gain=False))
        if table is not None:
            tables.append(latex(table, f"Cross-architecture accuracy (%), protocol {name}",
                                [f"Sets distilled once, each scored by protocol {name} on every architecture."]))
    return "\n".join(tables) if tables else None


def _with_protocol(report: Report, table: pd.DataFrame) -> pd.DataFrame:
    lines = {g: protocol_line(report.frame[report.frame["group"] == g]) for g in report.groups}
    return table.rename(columns={"group": "eval"}).assign(protocol=table["group"].map(lines))


def write_tables(report: Report) -> list[Path]:
    """table.md/.tex/.csv (accuracy), cost.md/.tex/.csv, and cross_arch.md/.tex/.csv when a protocol
    was evaluated on several architectures, in the store directory."""
    d = report.directory
    files = {d / "table.md": accuracy_markdown(report), d / "table.tex": accuracy_latex(report),
             d / "cost.md": cost_markdown(report), d / "cost.tex": cost_latex(report)}
    cross_md, cross_tex = cross_arch_markdown(report), cross_arch_latex(report)
    if cross_md is not None:
        files[d / "cross_arch.md"], files[d / "cross_arch.tex"] = cross_md, cross_tex
    for path, text in files.items():
        path.write_text(text)
    cells = _with_protocol(report, report.cells)
    cells.to_csv(d / "table.csv", index=False)
    report.cost.to_csv(d / "cost.csv", index=False)
    written = [*files, d / "table.csv", d / "cost.csv"]
    if cross_md is not None:
        cells.assign(architecture=cells["eval"].str.split(" · ").str[1]).to_csv(d / "cross_arch.csv", index=False)
        written.append(d / "cross_arch.csv")
    return written


def summary(directory: str | Path, speedup_vs: str | None = None, protocol: str | None = None,
            model: str | None = None) -> str:
    """The text printed at the end of a run and by ``dd-bench report``: the tables with their notes."""
    report = build_report(directory, speedup_vs or stored_speedup_vs(directory), protocol=protocol, model=model)
    if report is None:
        return "(no results yet)"
    cross = cross_arch_markdown(report)
    return accuracy_markdown(report) + ("\n\n" + cross if cross else "") + "\n\n" + cost_markdown(report)
