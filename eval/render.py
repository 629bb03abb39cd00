"""The one table renderer: markdown, CSV and LaTeX of every table (Table 1, Table 1 over seeds, the λ sweep, the
frontier, NudeNet's classes), with headers, arrows, number formats and bold/underline from the metric registry.

A :class:`Table` has label columns (the system; or the swept settings and the seeds; or method, iteration and seeds)
and metric columns, each a key :func:`eval.metrics.resolve` knows. A cell holds a number, a :class:`Stat` (mean, std,
n; shown ``mean ± std`` when n > 1) or nothing (``–``).

One ranking rule for every table: among the rows of kind ``run`` (every row with ``rank_oracles``), the best value by
the metric's direction is bold and the second underlined. Values are compared as displayed (a Stat by its mean), so
values equal at the displayed precision tie and share the mark, and the next distinct value is second. Metrics
without a direction are not ranked.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path

from erasure.io import write_text_atomic

from .metrics import heading, resolve

LEGEND = "Best in **bold**, second <u>underlined</u>"


@dataclasses.dataclass(frozen=True)
class Stat:
    mean: float
    std: float
    n: int


@dataclasses.dataclass
class Row:
    labels: dict  # label column -> value
    values: dict  # metric key -> number or Stat (absent or None: missing)
    kind: str = "run"  # run | base | reference: only runs are ranked (base model and reference are oracles)


@dataclasses.dataclass
class Table:
    labels: dict  # label column (CSV name) -> markdown/LaTeX header; None: in the CSV only
    columns: list  # metric keys
    rows: list
    title: str | None = None
    note: str | None = None  # a markdown paragraph under the table
    rank_oracles: bool = False
    cell_n: bool = False  # CSV: a <key>_n column beside <key>_std (Stats whose n differs from cell to cell)


def _shown(key: str, value) -> str:
    if value is None:
        return ""
    spec = resolve(key)
    if isinstance(value, Stat):
        return spec.format(value.mean) + (f" ± {spec.format(value.std)}" if value.n > 1 else "")
    return spec.format(value)


def marks(table: Table) -> dict:
    """{(row index, key): 'best' | 'second'} by the ranking rule above."""
    out = {}
    for key in table.columns:
        spec = resolve(key)
        if spec.higher_is_better is None:
            continue
        shown = {i: float(spec.format(v.mean if isinstance(v, Stat) else v)) for i, row in enumerate(table.rows)
                 if (v := row.values.get(key)) is not None and (table.rank_oracles or row.kind == "run")}
        distinct = sorted({s for s in shown.values() if not math.isnan(s)}, reverse=spec.higher_is_better)
        for i, s in shown.items():
            if distinct[:1] == [s]:
                out[(i, key)] = "best"
            elif distinct[1:2] == [s]:
                out[(i, key)] = "second"
    return out


def _cells(table: Table, missing: str, best: str, second: str) -> list[list[str]]:
    """The visible cells of each row (labels with a header, then the metrics), marked."""
    ranked = marks(table)
    rows = []
    for i, row in enumerate(table.rows):
        cells = [missing if row.labels[k] is None else str(row.labels[k]) for k, head in table.labels.items()
                 if head is not None]
        for key in table.columns:
            s = _shown(key, row.values.get(key)) or missing
            mark = ranked.get((i, key))
            cells.append(best.format(s) if mark == "best" else second.format(s) if mark == "second" else s)
        rows.append(cells)
    return rows


def to_markdown(table: Table) -> str:
    heads = [h for h in table.labels.values() if h is not None]
    lines = [f"**{table.title}**", ""] if table.title else []
    lines.append("| " + " | ".join(heads + [heading(k) for k in table.columns]) + " |")
    lines.append("|" + "---|" * len(heads) + "---:|" * len(table.columns))
    lines += ["| " + " | ".join(cells) + " |" for cells in _cells(table, "–", "**{}**", "<u>{}</u>")]
    if any(resolve(k).higher_is_better is not None for k in table.columns):
        oracles = not table.rank_oracles and any(r.kind != "run" for r in table.rows)
        lines += ["", LEGEND + (" (methods only; base model and reference are oracles)." if oracles else ".")]
    if table.note:
        lines += ["", table.note]
    return "\n".join(lines) + "\n"


def flat(table: Table, missing=""):
    """CSV header and rows: the label columns, then per metric its value (a Stat: ``<key>``, ``<key>_std`` and, with
    ``cell_n``, ``<key>_n``); raw numbers, not formatted."""
    stats = any(isinstance(v, Stat) for r in table.rows for v in r.values.values())
    parts = ("", "_std", "_n") if table.cell_n else ("", "_std") if stats else ("",)
    header = [*table.labels, *(k + p for k in table.columns for p in parts)]
    rows = []
    for r in table.rows:
        values = []
        for k in table.columns:
            v = r.values.get(k)
            cells = [v.mean, v.std, v.n] if isinstance(v, Stat) else [missing if v is None else v, missing, missing]
            values += cells[:len(parts)]
        rows.append([missing if r.labels[k] is None else r.labels[k] for k in table.labels] + values)
    return header, rows


def to_csv(table: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header, rows = flat(table)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _tex(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"), ("$", r"\$")):
        s = s.replace(a, b)
    return s.replace("↑", r"$\uparrow$").replace("↓", r"$\downarrow$").replace("±", r"$\pm$")


def to_latex(table: Table) -> str:
    heads = [_tex(h) for h in table.labels.values() if h is not None]
    lines = [r"\begin{table}[t]", r"\centering"]
    if table.title:
        lines.append(r"\caption{" + _tex(table.title) + "}")
    lines += [r"\begin{tabular}{" + "l" * len(heads) + "r" * len(table.columns) + "}", r"\toprule",
              " & ".join(heads + [_tex(heading(k)) for k in table.columns]) + r" \\", r"\midrule"]
    for i, cells in enumerate(_cells(table, "--", r"\textbf{{{}}}", r"\underline{{{}}}")):
        kind = table.rows[i].kind
        if i > 0 and (kind == "reference" or table.rows[i - 1].kind == "base") and kind != table.rows[i - 1].kind:
            lines.append(r"\midrule")
        n = len(heads)
        lines.append(" & ".join([_tex(c) for c in cells[:n]] + [c.replace("±", r"$\pm$") for c in cells[n:]]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


RENDERERS = {"md": to_markdown, "csv": to_csv, "tex": to_latex}


def write(table: Table, folder: str | Path, stem: str, formats=("md", "csv", "tex")) -> dict[str, Path]:
    """``<folder>/<stem>.<format>`` for each format, written atomically; returns {format: path}."""
    paths = {f: Path(folder) / f"{stem}.{f}" for f in formats}
    for f, path in paths.items():
        write_text_atomic(path, RENDERERS[f](table))
    return paths
