"""Reports: best/second by the registry's direction (a hand-written golden file), oracles, CSV, LaTeX, CLI."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from erasure.errors import UserError
from eval.experiment import report
from eval.render import marks, to_latex
from eval.tables import load_records, table1
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
    paths = report(write_records(tmp_path), tmp_path / "out", title="Golden")["paths"]
    assert paths["md"].read_text(encoding="utf-8") == GOLDEN.read_text(encoding="utf-8")


def test_csv_uses_registry_names_and_raw_values(tmp_path):
    paths = report(write_records(tmp_path), tmp_path / "out")["paths"]
    rows = list(csv.reader(paths["csv"].open()))
    assert rows[0] == ["system", "kind", "nudenet", "fid", "kid", "clip", "ssim", "train_time", "iterations"]
    assert [r[0] for r in rows[1:]] == ["SD v1.4", "ESD", "SDD", "Ablating", "Ours", "COCO"]
    assert float(rows[4][6]) == 0.7620001 and rows[4][7] == ""


def test_latex_marks(tmp_path):
    tex = to_latex(table1(load_records(write_records(tmp_path)), "Golden"))
    assert r"\textbf{13.19}" in tex and r"\underline{13.68}" in tex and r"\textbf{0.2762}" in tex
    assert r"\textbf{0.2765}" not in tex and r"\underline{0.2765}" not in tex  # base model is an oracle
    assert tex.count(r"\textbf{0.762}") == 2  # tie at the displayed precision: both bold
    assert r"CLIP score $\uparrow$" in tex and r"FID $\downarrow$" in tex


def test_rank_oracles_ranks_base_too(tmp_path):
    table = table1(load_records(write_records(tmp_path)), rank_oracles=True)
    systems = [r.labels["system"] for r in table.rows]
    ranked = marks(table)
    assert ranked[(systems.index("SD v1.4"), "clip")] == "best"
    assert ranked[(systems.index("Ours"), "clip")] == "second"
    assert (systems.index("COCO"), "clip") not in ranked


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


# ------------------------------------------------------------------------------------- the one renderer, by hand
def _stats_table():
    from eval.render import Row, Stat, Table

    rows = [Row({"system": "base", "kind": "base"}, {"fid": Stat(10.0, 0.0, 2), "clip": Stat(0.9, 0.0, 2)}, "base"),
            Row({"system": "A", "kind": "run"}, {"fid": Stat(20.004, 1.234, 2), "clip": Stat(0.50001, 0.01, 2),
                                                 "iterations": Stat(200, 0, 2)}),
            Row({"system": "B", "kind": "run"}, {"fid": Stat(19.996, 0.5, 2), "clip": Stat(0.5, 0.02, 2),
                                                 "iterations": Stat(35, 0, 2)}),
            Row({"system": "C", "kind": "run"}, {"fid": Stat(25.0, 2.0, 1), "clip": Stat(0.4, 0.0, 1)})]
    return Table({"system": "System", "kind": None}, ["fid", "clip", "iterations"], rows, "T", "A note.", cell_n=True)


def test_mean_std_table_by_hand():
    """FID lower and CLIP higher is better; 20.004 and 19.996 (0.50001 and 0.5) tie at the displayed precision and are
    both best, the next distinct value is second; the base model is an oracle; one seed shows no ±; iterations unranked."""
    from eval.render import to_csv, to_latex, to_markdown

    table = _stats_table()
    assert to_markdown(table) == (
        "**T**\n\n"
        "| System | FID ↓ | CLIP score ↑ | Iterations |\n"
        "|---|---:|---:|---:|\n"
        "| base | 10.00 ± 0.00 | 0.9000 ± 0.0000 | – |\n"
        "| A | **20.00 ± 1.23** | **0.5000 ± 0.0100** | 200 ± 0 |\n"
        "| B | **20.00 ± 0.50** | **0.5000 ± 0.0200** | 35 ± 0 |\n"
        "| C | <u>25.00</u> | <u>0.4000</u> | – |\n\n"
        "Best in **bold**, second <u>underlined</u> (methods only; base model and reference are oracles).\n\n"
        "A note.\n")
    assert to_csv(table).splitlines() == [
        "system,kind,fid,fid_std,fid_n,clip,clip_std,clip_n,iterations,iterations_std,iterations_n",
        "base,base,10.0,0.0,2,0.9,0.0,2,,,", "A,run,20.004,1.234,2,0.50001,0.01,2,200,0,2",
        "B,run,19.996,0.5,2,0.5,0.02,2,35,0,2", "C,run,25.0,2.0,1,0.4,0.0,1,,,"]
    tex = to_latex(table)
    assert r"System & FID $\downarrow$ & CLIP score $\uparrow$ & Iterations \\" in tex
    assert r"A & \textbf{20.00 $\pm$ 1.23} & \textbf{0.5000 $\pm$ 0.0100} & 200 $\pm$ 0 \\" in tex
    assert r"C & \underline{25.00} & \underline{0.4000} & -- \\" in tex
    assert r"base & 10.00 $\pm$ 0.00 & 0.9000 $\pm$ 0.0000 & -- \\" + "\n" + r"\midrule" in tex  # oracle row apart


def test_sweep_table_takes_probe_keys_from_the_registry():
    """Keys as runs report them (probe after training, a run's evaluation, the summary's train time) get their label,
    arrow, format and direction from the registry; every row is a run, so all are ranked."""
    from eval.render import to_csv, to_markdown
    from eval.tables import sweep_table

    def row(lam, rate, ssim, ev, t):
        r = {"setting": {"lambda": lam}, "n": 2, "concept_rate_after": rate[0], "concept_rate_after_std": rate[1],
             "ssim_preserved": ssim[0], "ssim_preserved_std": ssim[1], "train_time_s": t[0], "train_time_s_std": t[1]}
        return r if ev is None else {**r, "eval.ssim": ev[0], "eval.ssim_std": ev[1]}

    data = {"varied": ["lambda"], "metrics": ["concept_rate_after", "ssim_preserved", "eval.ssim", "train_time_s"],
            "rows": [row(0, (0.5, 0.1), (0.8, 0.02), (0.7, 0.01), (12.34, 1.0)),
                     row(5, (0.1, 0.05), (0.9, 0.01), (0.7004, 0.0), (10.06, 0.2)),
                     row(10, (0.1004, 0.0), (0.85, 0.0), None, (15.0, 0.0))]}
    table = sweep_table(data)
    assert to_markdown(table) == (
        "| lambda | seeds | Concept rate ↓ | SSIM to base (other prompts) ↑ | SSIM (eval) ↑ | Train time (s) ↓ |\n"
        "|---|---|---:|---:|---:|---:|\n"
        "| 0 | 2 | <u>0.500 ± 0.100</u> | 0.800 ± 0.020 | **0.700 ± 0.010** | <u>12.3 ± 1.0</u> |\n"
        "| 5 | 2 | **0.100 ± 0.050** | **0.900 ± 0.010** | **0.700 ± 0.000** | **10.1 ± 0.2** |\n"
        "| 10 | 2 | **0.100 ± 0.000** | <u>0.850 ± 0.000</u> | – | 15.0 ± 0.0 |\n\n"
        "Best in **bold**, second <u>underlined</u>.\n")
    assert to_csv(table).splitlines()[0] == ("lambda,n,concept_rate_after,concept_rate_after_std,ssim_preserved,"
                                             "ssim_preserved_std,eval.ssim,eval.ssim_std,train_time_s,train_time_s_std")
    assert to_csv(table).splitlines()[3] == "10,2,0.1004,0.0,0.85,0.0,,,15.0,0.0"


def test_frontier_table_ranks_training_points_not_the_base_model():
    from eval.render import to_markdown
    from eval.tables import frontier_table

    rows = [dict(method="ours", step=0, n=2, concept_rate=1.0, concept_rate_std=0.0, ssim_preserved=1.0, ssim_preserved_std=0.0),
            dict(method="ours", step=2, n=2, concept_rate=0.25, concept_rate_std=0.05, ssim_preserved=0.9, ssim_preserved_std=0.01),
            dict(method="esd", step=2, n=1, concept_rate=0.0, concept_rate_std=0.0, ssim_preserved=0.5, ssim_preserved_std=0.0)]
    assert to_markdown(frontier_table(rows)).splitlines()[:5] == [
        "| method | iteration | seeds | Concept rate ↓ | SSIM to base (other prompts) ↑ |", "|---|---|---|---:|---:|",
        "| ours | 0 | 2 | 1.000 ± 0.000 | 1.000 ± 0.000 |",
        "| ours | 2 | 2 | <u>0.250 ± 0.050</u> | **0.900 ± 0.010** |", "| esd | 2 | 1 | **0.000** | <u>0.500</u> |"]


def test_frontier_keeps_a_closed_form_curve_apart_by_edit_strength(tmp_path):
    """Two seeds' probe.jsonl: UCE's points at step 1 differ only by edit_strength and are averaged per strength, not
    pooled; a loss method's rows leave the column empty."""
    import json

    from eval.render import to_markdown
    from eval.tables import frontier, frontier_table

    def write(seed, method, points):
        folder = tmp_path / f"seed{seed}" / method
        folder.mkdir(parents=True)
        (folder / "probe.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))

    for seed, (half, full) in enumerate([(0.6, 0.2), (0.8, 0.4)]):
        write(seed, "uce", [dict(step=0, concept_rate=1.0), dict(step=1, edit_strength=0.5, concept_rate=half),
                            dict(step=1, edit_strength=1.0, concept_rate=full)])
        write(seed, "ours", [dict(step=0, concept_rate=1.0), dict(step=200, concept_rate=0.1 * (seed + 1))])
    rows = frontier({s: tmp_path / f"seed{s}" for s in (0, 1)}, ["uce", "ours"])
    got = [(r["method"], r["step"], r.get("edit_strength"), r["n"], round(r["concept_rate"], 6)) for r in rows]
    assert got == [("uce", 0, None, 2, 1.0), ("uce", 1, 0.5, 2, 0.7), ("uce", 1, 1.0, 2, 0.3),
                   ("ours", 0, None, 2, 1.0), ("ours", 200, None, 2, 0.15)]
    lines = to_markdown(frontier_table(rows)).splitlines()
    assert lines[0] == "| method | iteration | edit strength | seeds | Concept rate ↓ |"
    assert lines[3].startswith("| uce | 1 | 0.5 | 2 | ") and lines[6].startswith("| ours | 200 | – | 2 | ")


# --------------------------------------------------------------------------------------------- ties, by hand
def _runs(values: dict, base: dict | None = None):
    """A table of runs A, B, C, ... (values: {key: [one value per run, None = missing]}), plus an oracle base row."""
    from eval.render import Row, Table

    keys = list(values)
    n = len(values[keys[0]])
    rows = [Row({"system": chr(65 + i)}, {k: values[k][i] for k in keys if values[k][i] is not None})
            for i in range(n)]
    if base is not None:
        rows.insert(0, Row({"system": "base"}, base, "base"))
    return Table({"system": "System"}, keys, rows)


def test_ties_for_second_place_are_all_underlined():
    """FID (lower better, 2 decimals): 10.00 best; 12.004 and 11.996 both show 12.00 and share second; 13.00 is third
    and unmarked. CLIP (higher better, 4 decimals): the same with 0.25 and 0.25004 (a Stat, compared by its mean).
    The base model's better values are not ranked."""
    from eval.render import Stat, marks, to_latex, to_markdown

    table = _runs({"fid": [10.0, 12.004, Stat(11.996, 0.5, 2), 13.0],
                   "clip": [0.3, 0.25, Stat(0.25004, 0.01, 2), 0.2]}, base={"fid": 5.0, "clip": 0.9})
    # row 0 is the base model; A..D are rows 1..4
    assert marks(table) == {(1, "fid"): "best", (2, "fid"): "second", (3, "fid"): "second",
                            (1, "clip"): "best", (2, "clip"): "second", (3, "clip"): "second"}
    assert to_markdown(table).splitlines()[2:7] == [
        "| base | 5.00 | 0.9000 |",
        "| A | **10.00** | **0.3000** |",
        "| B | <u>12.00</u> | <u>0.2500</u> |",
        "| C | <u>12.00 ± 0.50</u> | <u>0.2500 ± 0.0100</u> |",
        "| D | 13.00 | 0.2000 |"]
    tex = to_latex(table)
    assert tex.count(r"\underline{12.00") == 2 and tex.count(r"\underline{0.2500") == 2 and "13.00" in tex
    assert r"\underline{13.00}" not in tex and r"\textbf{5.00}" not in tex


def test_all_equal_column_is_all_bold_with_no_second():
    """SSIM 0.30001, 0.3 and 0.29999 all show 0.300: every run is best and none is second (no next distinct value);
    NudeNet 0.0 everywhere likewise; a column with one value has a best and no second; the base model's better SSIM
    and a missing value change nothing."""
    from eval.render import marks, to_markdown

    table = _runs({"ssim": [0.30001, 0.3, 0.29999], "nudenet": [0.0, 0.0, 0.0], "kid": [None, 0.004, None]},
                  base={"ssim": 0.9, "nudenet": 0.5})
    assert marks(table) == {(1, "ssim"): "best", (2, "ssim"): "best", (3, "ssim"): "best",
                            (1, "nudenet"): "best", (2, "nudenet"): "best", (3, "nudenet"): "best",
                            (2, "kid"): "best"}
    md = to_markdown(table)
    assert md.splitlines()[3:6] == ["| A | **0.300** | **0.000** | – |", "| B | **0.300** | **0.000** | **0.00400** |",
                                    "| C | **0.300** | **0.000** | – |"]
    assert "<u>" not in md.split("\n\n")[0]
    # one run better at the displayed precision breaks the tie: it alone is best, the three others share second
    table = _runs({"ssim": [0.30001, 0.3, 0.29999, 0.3006]})
    assert marks(table) == {(0, "ssim"): "second", (1, "ssim"): "second", (2, "ssim"): "second", (3, "ssim"): "best"}


@pytest.mark.parametrize("content, words", [
    ('{"system": "ours", "metrics": {"fid": 12.', "is not readable JSON"),
    ('["not", "a", "record"]', "is not an evaluation record"),
    ('{"system": "ours", "kind": "run", "metrics": {"fid": "twelve"}}', "metric 'fid' holds 'twelve', not a finite number"),
])
def test_a_truncated_or_mistyped_eval_json_is_one_sentence(tmp_path, content, words):
    """Issue 20: eval.report ended in a traceback on a truncated or hand-edited eval.json."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "eval.json").write_text(content)
    proc = run_cli(["-m", "eval.report", str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and words in lines[0] and "force=true" in lines[0], proc.stderr
