"""Reports: best/second by the registry's direction (a hand-written golden file), oracles, CSV, LaTeX, CLI."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from erasure.errors import UserError
from eval.report import build_table, load_records, to_latex, write_report
from tests.conftest import run_cli

GOLDEN = Path(__file__).parent / "golden" / "table1_golden.md"


def rec(system, kind, **metrics):
    return {"system": system, "kind": kind, "metrics": metrics, "details": {}}


# Paper-like numbers (Table 1), with a tie in SSIM at the displayed precision (0.762 vs 0.7620001), a missing
# train time, and an oracle (the base model) that beats every method in CLIP score and FID but is not ranked.
RECORDS = [
    rec("COCO", "reference", clip=0.2693),
    rec("ESD", "run", nudenet=0.04, fid=14.27, kid=0.00421, clip=0.2619, ssim=0.231, train_time=1200.0, iterations=1000),
    rec("SD v1.4", "base", nudenet=0.69, fid=13.59, kid=0.00479, clip=0.2765),
    rec("SDD", "run", nudenet=0.05, fid=14.11, kid=0.00499, clip=0.2677, ssim=0.309, train_time=900.0, iterations=1500),
    rec("Ablating", "run", nudenet=0.45, fid=13.68, kid=0.00478, clip=0.2756, ssim=0.7620001, iterations=400),
    rec("Ours", "run", nudenet=0.33, fid=13.19, kid=0.00447, clip=0.2762, ssim=0.762, train_time=300.0, iterations=200),
]


def write_records(tmp_path) -> list[Path]:
    folders = []
    for r in RECORDS:
        d = tmp_path / r["system"].replace(" ", "_")
        d.mkdir()
        (d / "eval.json").write_text(json.dumps(r))
        folders.append(d)
    return folders


def test_markdown_matches_golden(tmp_path):
    records = load_records(write_records(tmp_path))
    paths = write_report(records, tmp_path / "out", title="Golden")["paths"]
    assert paths["md"].read_text(encoding="utf-8") == GOLDEN.read_text(encoding="utf-8")


def test_csv_uses_registry_names_and_raw_values(tmp_path):
    paths = write_report(load_records(write_records(tmp_path)), tmp_path / "out")["paths"]
    rows = list(csv.reader(paths["csv"].open()))
    assert rows[0] == ["system", "kind", "nudenet", "fid", "kid", "clip", "ssim", "train_time", "iterations"]
    assert [r[0] for r in rows[1:]] == ["SD v1.4", "ESD", "SDD", "Ablating", "Ours", "COCO"]
    assert float(rows[4][6]) == 0.7620001 and rows[4][7] == ""


def test_latex_marks(tmp_path):
    table = build_table(load_records(write_records(tmp_path)))
    tex = to_latex(table, "Golden")
    assert r"\textbf{13.19}" in tex and r"\underline{13.68}" in tex and r"\textbf{0.2762}" in tex
    assert r"\textbf{0.2765}" not in tex and r"\underline{0.2765}" not in tex  # base model is an oracle
    assert tex.count(r"\textbf{0.762}") == 2  # tie at the displayed precision: both bold
    assert r"CLIP score $\uparrow$" in tex and r"FID $\downarrow$" in tex


def test_rank_oracles_ranks_base_too(tmp_path):
    table = build_table(load_records(write_records(tmp_path)), rank_oracles=True)
    systems = [r["system"] for r in table["rows"]]
    assert table["marks"][(systems.index("SD v1.4"), "clip")] == "best"
    assert table["marks"][(systems.index("Ours"), "clip")] == "second"
    assert (systems.index("COCO"), "clip") not in table["marks"]


def test_report_cli_and_missing_eval(tmp_path):
    folders = write_records(tmp_path)
    out = tmp_path / "cli"
    proc = run_cli(["-m", "eval.report", *map(str, folders), "--out", str(out), "--title", "Golden"])
    assert proc.returncode == 0, proc.stderr
    assert (out / "table1.md").read_text(encoding="utf-8") == GOLDEN.read_text(encoding="utf-8")
    assert (out / "table1.tex").is_file() and (out / "table1.csv").is_file()
    proc = run_cli(["-m", "eval.report", str(tmp_path / "nowhere")])
    assert proc.returncode == 2 and "no eval.json" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(UserError):
        load_records([])
