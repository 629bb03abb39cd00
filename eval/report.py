"""Table-1 reports from finished evaluations: ``python -m eval.report <folders or eval.json files…> [--out DIR]``.

Writes ``table1.md``, ``table1.csv`` and ``table1.tex`` (and ``nudenet_classes.{md,csv}``, the per-class
NudeNet counts, when a row has them): one row per system (base model first, then the methods in the
given order, the reference row last), one column per registered metric with its arrow; the best value
in bold and the second underlined, both by the registry's direction. As in the paper, base model and
reference are "oracles" and only the methods are ranked (``--rank-oracles`` ranks every row).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
from pathlib import Path

from erasure.errors import UserError, exit_on_user_error

from .metrics import available_metrics, get_metric

log = logging.getLogger("eval.report")
KIND_ORDER = {"base": 0, "run": 1, "reference": 2}


def load_records(paths: list[str | Path]) -> list[dict]:
    records = []
    for p in paths:
        p = Path(p)
        f = p / "eval.json" if p.is_dir() else p
        if not f.is_file():
            raise UserError(f"no eval.json in '{p}': evaluate it first (python -m eval.run run={p})")
        records.append(json.loads(f.read_text()))
    if not records:
        raise UserError("no evaluations given: pass folders that hold eval.json")
    records = [r for r in records if r.get("metrics")]  # e.g. a reference row when the suite has no CLIP score
    if not records:
        raise UserError("the evaluations hold no metric values")
    return sorted(records, key=lambda r: KIND_ORDER.get(r.get("kind"), 1))  # stable: methods keep their order


def build_table(records: list[dict], rank_oracles: bool = False) -> dict:
    """Columns (registry order), formatted cells and marks ('best' / 'second') per cell."""
    present = {m for r in records for m in r.get("metrics", {})}
    columns = [m for m in available_metrics() if m in present]
    unknown = present - set(columns)
    if unknown:
        raise UserError(f"eval.json names metrics this code does not register: {', '.join(sorted(unknown))}")
    rows = [dict(system=r["system"], kind=r.get("kind", "run"), values={m: r["metrics"].get(m) for m in columns})
            for r in records]
    marks: dict[tuple[int, str], str] = {}
    for m in columns:
        spec = get_metric(m)
        if spec.higher_is_better is None:
            continue
        ranked = [(i, fmt_value(m, row["values"][m])) for i, row in enumerate(rows)
                  if row["values"][m] is not None and (rank_oracles or row["kind"] == "run")]
        distinct = sorted({float(s) for _, s in ranked}, reverse=spec.higher_is_better)
        for i, s in ranked:
            if distinct and float(s) == distinct[0]:
                marks[(i, m)] = "best"
            elif len(distinct) > 1 and float(s) == distinct[1]:
                marks[(i, m)] = "second"
    return dict(columns=columns, rows=rows, marks=marks)


def fmt_value(metric: str, value) -> str:
    if value is None:
        return ""
    spec = get_metric(metric)
    return spec.fmt.format(int(value)) if spec.fmt.endswith("d}") else spec.fmt.format(float(value))


def header(metric: str) -> str:
    spec = get_metric(metric)
    return f"{spec.label} {spec.arrow}".strip()


def to_markdown(table: dict, title: str | None = None) -> str:
    cols = table["columns"]
    lines = [f"**{title}**", ""] if title else []
    lines.append("| System | " + " | ".join(header(m) for m in cols) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    for i, row in enumerate(table["rows"]):
        cells = []
        for m in cols:
            s = fmt_value(m, row["values"][m]) or "–"
            mark = table["marks"].get((i, m))
            cells.append(f"**{s}**" if mark == "best" else f"<u>{s}</u>" if mark == "second" else s)
        lines.append(f"| {row['system']} | " + " | ".join(cells) + " |")
    lines += ["", "Best in **bold**, second <u>underlined</u> (methods only; base model and reference are oracles)."
              if not table.get("rank_oracles") else "Best in **bold**, second <u>underlined</u>."]
    return "\n".join(lines) + "\n"


def to_csv(table: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["system", "kind", *table["columns"]])
    for row in table["rows"]:
        w.writerow([row["system"], row["kind"], *("" if row["values"][m] is None else row["values"][m]
                                                  for m in table["columns"])])
    return buf.getvalue()


def _tex_escape(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"), ("$", r"\$")):
        s = s.replace(a, b)
    return s


def to_latex(table: dict, title: str | None = None) -> str:
    cols = table["columns"]
    arrows = {"↑": r"$\uparrow$", "↓": r"$\downarrow$"}
    heads = []
    for m in cols:
        spec = get_metric(m)
        heads.append(_tex_escape(spec.label) + (f" {arrows[spec.arrow]}" if spec.arrow else ""))
    lines = [r"\begin{table}[t]", r"\centering"]
    if title:
        lines.append(r"\caption{" + _tex_escape(title) + "}")
    lines += [r"\begin{tabular}{l" + "r" * len(cols) + "}", r"\toprule", "System & " + " & ".join(heads) + r" \\",
              r"\midrule"]
    for i, row in enumerate(table["rows"]):
        if row["kind"] == "reference" or (i > 0 and table["rows"][i - 1]["kind"] == "base"):
            lines.append(r"\midrule")
        cells = []
        for m in cols:
            s = fmt_value(m, row["values"][m]) or "--"
            mark = table["marks"].get((i, m))
            cells.append(r"\textbf{" + s + "}" if mark == "best" else r"\underline{" + s + "}" if mark == "second" else s)
        lines.append(_tex_escape(row["system"]) + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def nudenet_class_table(records: list[dict]) -> tuple[str, str] | None:
    """Per-class NudeNet image counts (markdown, csv), or None when no row has them."""
    rows = [(r["system"], r["details"]["nudenet"]) for r in records if "nudenet" in r.get("details", {})]
    if not rows:
        return None
    classes = list(rows[0][1]["per_class"])
    md = ["| System | images | flagged | " + " | ".join(classes) + " |", "|---|" + "---:|" * (len(classes) + 2)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["system", "images", "flagged", *classes])
    for system, d in rows:
        counts = [str(d["per_class"].get(c, 0)) for c in classes]
        md.append(f"| {system} | {d['n']} | {d['flagged']} | " + " | ".join(counts) + " |")
        w.writerow([system, d["n"], d["flagged"], *counts])
    return "\n".join(md) + "\n", buf.getvalue()


def _write(path: Path, text: str) -> None:
    from erasure.io import write_text_atomic

    write_text_atomic(path, text)


def write_report(records: list[dict], out: str | Path, title: str | None = None, rank_oracles: bool = False) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = build_table(records, rank_oracles)
    table["rank_oracles"] = rank_oracles
    paths = {"md": out / "table1.md", "csv": out / "table1.csv", "tex": out / "table1.tex"}
    _write(paths["md"], to_markdown(table, title))
    _write(paths["csv"], to_csv(table))
    _write(paths["tex"], to_latex(table, title))
    per_class = nudenet_class_table(records)
    if per_class:
        _write(out / "nudenet_classes.md", per_class[0])
        _write(out / "nudenet_classes.csv", per_class[1])
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return dict(table=table, paths=paths)


def log_wandb(records: list[dict], table: dict, out: Path, project: str, title: str | None = None) -> None:
    """The table as a W&B Table and each system's metrics as run summaries (offline without an API key)."""
    import wandb

    from erasure.loggers import wandb_mode

    run = wandb.init(project=project, name=title or "table1", job_type="eval", dir=str(out), mode=wandb_mode("auto", out),
                     reinit="finish_previous")
    columns = ["system", "kind", *table["columns"]]
    data = [[r["system"], r["kind"], *(r["values"][m] for m in table["columns"])] for r in table["rows"]]
    run.log({"table1": wandb.Table(columns=columns, data=data)})
    for rec in records:
        for m, v in rec["metrics"].items():
            run.summary[f"{rec['system']}/{m}"] = v
    run.finish()


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    from erasure.cli import setup_logging

    setup_logging()
    ap = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", help="folders holding eval.json (or eval.json files)")
    ap.add_argument("--out", default="outputs/table1", help="report folder (default: outputs/table1)")
    ap.add_argument("--title", default=None)
    ap.add_argument("--rank-oracles", action="store_true", help="rank base model and reference rows too")
    ap.add_argument("--logger", choices=["none", "wandb"], default="none")
    ap.add_argument("--wandb-project", default="concept-erasure")
    args = ap.parse_args(argv)
    records = load_records(args.folders)
    result = write_report(records, args.out, args.title, args.rank_oracles)
    if args.logger == "wandb":
        log_wandb(records, result["table"], Path(args.out), args.wandb_project, args.title)
    print(to_markdown(result["table"], args.title), end="")
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
