"""eval.concept_tables on hand-written run folders: 3 concepts (two shapes, one colour) x 3 methods, one run missing;
every expected number is worked out by hand below."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import yaml

from eval import concept_tables as ct
from eval import render

CONCEPTS = ["circle", "square", "red"]
METHODS = ["ours", "esd", "uce"]

PROBES = {
    "circle": dict(attribute="shape", concept="circle",
                   instructions=[("a round shape", -7.5), ("a square", 6.5), ("a triangle", 6.5)],
                   preserve=[("a red square", "square", "red"), ("a blue triangle", "triangle", "blue"),
                             ("a green oval", "oval", "green")]),
    "square": dict(attribute="shape", concept="square",
                   instructions=[("a square shape", -7.5), ("a diamond", 6.5), ("a cross", 6.5)],
                   preserve=[("a red circle", "circle", "red"), ("a blue oval", "oval", "blue")]),
    "red": dict(attribute="color", concept="red",
                instructions=[("a crimson shape", -7.5), ("a blue shape", 6.5), ("a yellow shape", 6.5)],
                preserve=[("a green circle", "circle", "green"), ("a blue oval", "oval", "blue")]),
}
# (concept rate, shape acc., colour acc., SSIM preserved) after erasure; square/uce is missing
AFTER = {
    ("circle", "ours"): (0.2, 1.0, 1.0, 0.6), ("circle", "esd"): (0.1, 0.8, 0.9, 0.4),
    ("circle", "uce"): (0.5, 0.9, 1.0, 0.8),
    ("square", "ours"): (0.3, 0.9, 1.0, 0.7), ("square", "esd"): (0.3, 0.7, 1.0, 0.5),
    ("red", "ours"): (0.0, 1.0, 0.6, 0.9), ("red", "esd"): (0.4, 1.0, 0.8, 0.3), ("red", "uce"): (0.2, 0.5, 0.8, 0.9),
}
BEFORE = {"circle": (1.0, 1.0, 1.0), "square": (0.9, 0.95, 1.0), "red": (1.0, 1.0, 0.9)}


def _counts(prompt_counts: dict) -> dict:
    return {p: {"shape": s, "color": c} for p, (s, c) in prompt_counts.items()}


def _summary(concept: str, method: str) -> dict:
    rate, shape, colour, ssim = AFTER[concept, method]
    b_rate, b_shape, b_colour = BEFORE[concept]
    s = dict(method=method, concept=concept, concept_rate_before=b_rate, concept_rate_after=rate,
             preserved_accuracy_before=b_shape, preserved_accuracy_after=shape,
             preserved_color_accuracy_before=b_colour, preserved_color_accuracy_after=colour,
             ssim_preserved=ssim, ssim_target=0.3, train_time_s=10.0,
             preserved_per_prompt_before={p: 1.0 for p, *_ in PROBES[concept]["preserve"]},
             preserved_per_prompt_after={p: 1.0 for p, *_ in PROBES[concept]["preserve"]})
    if concept == "circle":  # 'a red square' was already weak in the base model; 'a green oval' breaks
        s["preserved_per_prompt_before"]["a red square"] = 0.7
        s["preserved_per_prompt_after"].update({"a red square": 0.2, "a green oval": 0.6})
    if (concept, method) == ("circle", "ours"):  # the oval is pulled towards the instruction 'a square'
        s["preserved_predictions_after"] = _counts({
            "a red square": ({"square": 2, "circle": 8}, {"red": 10}),
            "a blue triangle": ({"triangle": 10}, {"blue": 10}),
            "a green oval": ({"oval": 6, "square": 3, "triangle": 1}, {"green": 10})})
    if (concept, method) == ("square", "ours"):  # the circle turns into the erased concept (named only negatively)
        s["preserved_per_prompt_after"]["a red circle"] = 0.7
        s["preserved_predictions_after"] = _counts({"a red circle": ({"circle": 7, "square": 3}, {"red": 10}),
                                                    "a blue oval": ({"oval": 10}, {"blue": 10})})
    if (concept, method) == ("red", "ours"):  # colours: shape stays right; green turns purple, blue was weak before
        s["preserved_predictions_before"] = _counts({"a green circle": ({"circle": 10}, {"green": 10}),
                                                     "a blue oval": ({"oval": 10}, {"blue": 7, "yellow": 3})})
        s["preserved_predictions_after"] = _counts({"a green circle": ({"circle": 10}, {"purple": 6, "green": 4}),
                                                    "a blue oval": ({"oval": 10}, {"blue": 5, "yellow": 5})})
    if (concept, method) == ("red", "uce"):
        s["ssim_target"] = float("nan")  # must not reach concepts.json as NaN
    return s


def _config(concept: str) -> dict:
    p = PROBES[concept]
    return {"method": {"name": "x"}, "concept": {
        "name": concept, "targets": [f"a {concept}"],
        "instructions": [dict(text=t, guidance=g, window=[0.0, 1.0], kappa=0.5) for t, g in p["instructions"]],
        "probe": dict(attribute=p["attribute"], concept=p["concept"], target_prompts=[f"a {concept}"],
                      preserve_prompts=[dict(prompt=q, shape=s, color=c) for q, s, c in p["preserve"]])}}


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for c in CONCEPTS:
        for m in METHODS:
            f = root / c / m
            f.mkdir(parents=True)
            (f / "config.yaml").write_text(yaml.safe_dump(_config(c)))
            if (c, m) not in AFTER:  # square/uce: started, never finished (no delta, no summary)
                continue
            (f / "summary.json").write_text(json.dumps(_summary(c, m)))
            (f / "delta.safetensors").write_bytes(b"x")
    # a summary without a delta is not finished either
    (root / "square" / "uce" / "summary.json").write_text(json.dumps(_summary("square", "ours")))
    return root


@pytest.fixture
def data(runs):
    return ct.collect(runs, CONCEPTS, METHODS)


def _sample(values):
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def test_collect_reads_kinds_base_and_missing(data):
    assert data["missing"] == [("square", "uce")]
    assert data["kinds"] == {"circle": "shape", "square": "shape", "red": "color"}
    assert data["runs"]["square"]["uce"] is None
    assert data["runs"]["red"]["uce"]["ssim_target"] is None  # NaN in summary.json
    assert data["runs"]["circle"]["esd"]["preserved_predictions"] is None  # an older summary: absent
    # the concept's own attribute: shape accuracy for circle, colour accuracy for red
    assert data["runs"]["circle"]["uce"]["preserved_attr_accuracy"] == 0.9
    assert data["runs"]["red"]["uce"]["preserved_attr_accuracy"] == 0.8
    assert data["base"]["square"]["concept_rate_after"] == 0.9
    assert data["base"]["red"]["preserved_attr_accuracy"] == 0.9
    assert "ssim_preserved" not in data["base"]["red"]


def test_collect_takes_a_run_without_its_folder_from_its_record(runs, tmp_path):
    """A fresh clone has no run folders (outputs/ is not committed) but the committed records: a run missing here
    comes from <records>/<concept>/<method> (summary, config, recorded.json); a finished run folder wins over its
    record; a record without recorded.json (torn) is not read."""
    records = tmp_path / "records"
    keep = records / "square" / "uce"  # square/uce never finished in runs/: its numbers come from the record
    keep.mkdir(parents=True)
    summary = _summary("square", "ours") | {"method": "uce", "concept_rate_after": 0.05}
    (keep / "summary.json").write_text(json.dumps(summary))
    (keep / "config.yaml").write_text(yaml.safe_dump(_config("square")))
    (keep / "recorded.json").write_text("{}")
    stale = records / "circle" / "ours"  # circle/ours is finished in runs/: the run folder is read, not this
    shutil.copytree(keep, stale)
    torn = records / "red" / "esd"
    shutil.copytree(keep, torn)
    shutil.rmtree(runs / "red" / "esd")
    (torn / "recorded.json").unlink()

    data = ct.collect(runs, CONCEPTS, METHODS, records)
    assert data["from_records"] == ["square/uce"] and data["missing"] == [("red", "esd")]
    assert data["runs"]["square"]["uce"]["concept_rate_after"] == 0.05
    assert data["runs"]["circle"]["ours"]["concept_rate_after"] == 0.2
    report = ct.report(data, tmp_path / "out", "t")
    assert "came from" in report and "square/uce" in report.split("## Runs read from their records")[1]
    assert ct.collect(runs, CONCEPTS, METHODS)["missing"] == [("square", "uce"), ("red", "esd")]


def test_summary_table_mean_std_over_concepts(data):
    table = ct.summary_table(data)
    rows = {r.labels["method"]: r for r in table.rows}
    assert [r.labels["method"] for r in table.rows] == ["base", "ours", "esd", "uce"]
    assert rows["base"].kind == "base" and rows["ours"].kind == "run"
    assert (rows["ours"].labels["n"], rows["uce"].labels["n"], rows["base"].labels["n"]) == (3, 2, 3)
    # ours' concept rate over circle, square, red: 0.2, 0.3, 0.0 -> mean 1/6, sample std sqrt(0.04667/2)
    s = rows["ours"].values["concept_rate_after"]
    assert s.n == 3 and s.mean == pytest.approx(1 / 6) and s.std == pytest.approx(0.1527525, abs=1e-6)
    m, sd = _sample([0.8, 0.7, 1.0])  # esd shape accuracy
    assert rows["esd"].values["preserved_accuracy_after"] == render.Stat(pytest.approx(m), pytest.approx(sd), 3)
    u = rows["uce"].values["ssim_preserved"]  # uce: circle 0.8, red 0.9
    assert (u.mean, u.std, u.n) == (pytest.approx(0.85), pytest.approx(math.sqrt(0.005)), 2)
    b = rows["base"].values
    assert b["concept_rate_after"].mean == pytest.approx(2.9 / 3) and b["ssim_preserved"] is None
    # ranked by the renderer: ours has the lowest mean concept rate (1/6 < 0.267 (esd) < 0.35 (uce))
    marks = render.marks(table)
    assert marks[(1, "concept_rate_after")] == "best" and marks[(2, "concept_rate_after")] == "second"
    assert (0, "concept_rate_after") not in marks  # the base model is an oracle


def test_per_concept_tables_mark_the_best_method_per_row(data):
    tables = ct.per_concept_tables(data)
    assert len(tables) == 4
    rate = tables[0]
    assert rate.columns == ["concept_rate_after@base", "concept_rate_after@ours", "concept_rate_after@esd",
                            "concept_rate_after@uce"]
    assert [r.labels["best"] for r in rate.rows] == ["esd", "ours, esd", "ours"]  # square: a tie
    assert [r.labels["kind"] for r in rate.rows] == ["shape", "shape", "color"]
    assert rate.rows[1].values["concept_rate_after@uce"] is None
    assert render.marks(rate) == {}  # columns compare concepts: not ranked
    md = ct._markdown(rate)
    assert "Concept rate (ours) ↓" in md and render.LEGEND not in md
    ssim = tables[3]
    assert "ssim_preserved@base" not in ssim.columns
    assert [r.labels["best"] for r in ssim.rows] == ["uce", "ours", "ours, uce"]


def test_ranks_count_best_and_top2_with_ties(data):
    r = ct.ranks(data)
    # SSIM: circle uce > ours > esd; square ours > esd; red ours = uce > esd
    assert r["ours"]["ssim_preserved"] == dict(best=2, top2=3, of=3)
    assert r["esd"]["ssim_preserved"] == dict(best=0, top2=2, of=3)
    assert r["uce"]["ssim_preserved"] == dict(best=2, top2=2, of=2)
    # the concept's own attribute: circle (shape) ours 1.0 > uce 0.9; square ours; red (colour) esd = uce 0.8 > ours
    assert r["ours"]["preserved_attr_accuracy"] == dict(best=2, top2=3, of=3)
    assert r["esd"]["preserved_attr_accuracy"] == dict(best=1, top2=2, of=3)
    assert r["uce"]["preserved_attr_accuracy"] == dict(best=1, top2=2, of=2)
    # concept rate, lower is better: circle esd < ours; square ours = esd; red ours < uce
    assert r["ours"]["concept_rate_after"] == dict(best=2, top2=3, of=3)
    assert r["esd"]["concept_rate_after"] == dict(best=2, top2=2, of=3)
    assert r["uce"]["concept_rate_after"] == dict(best=0, top2=1, of=2)
    table = ct.ranks_table(data)
    assert table.rows[0].labels["ssim_preserved_best"] == "2/3"


def test_order_holds(data):
    assert ct.order_holds(data, "ours", ["esd"], "ssim_preserved") == (3, 3)
    assert ct.order_holds(data, "ours", ["esd", "uce"], "ssim_preserved") == (0, 2)  # red is a tie: not better
    assert ct.order_holds(data, "ours", ["esd"], "concept_rate_after") == (1, 3)  # lower is better; square ties
    assert ct.order_holds(data, "esd", ["ours"], "concept_rate_after") == (1, 3)


def test_broken_prompts_say_what_they_became(data):
    broken = ct.broken_prompts(data, "ours")
    got = {(b["concept"], b["prompt"]): b for b in broken}
    # circle's 'a red square' was below 0.8 before; red's 'a blue oval' too (colour 0.7)
    assert sorted(got) == [("circle", "a green oval"), ("red", "a green circle"), ("square", "a red circle")]
    oval = got["circle", "a green oval"]
    assert (oval["became"], oval["share"], oval["cause"], oval["instruction"]) == (
        "square", 0.3, "instruction", "a square")
    assert (oval["before"], oval["after"]) == (1.0, 0.6)
    assert ct._why(oval) == "pulled towards an instruction: 'a square'"
    circle = got["square", "a red circle"]  # 'a square shape' has negative guidance: not a pull
    assert (circle["became"], circle["cause"], circle["instruction"]) == ("square", "erased", None)
    green = got["red", "a green circle"]  # colour concept: colour accuracy from the prediction counts
    assert (green["truth"], green["before"], green["after"], green["became"], green["cause"]) == (
        "green", 1.0, 0.4, "purple", "other")
    # an older summary without prediction counts: listed, cause unknown
    esd = ct.broken_prompts(data, "esd")
    assert [(b["concept"], b["prompt"], b["became"], b["cause"]) for b in esd] == [
        ("circle", "a green oval", None, "unknown")]
    # at 0.5 the circle's weak 'a red square' (0.7 -> 0.2) counts, the oval (0.6) and the red circle (0.7) do not
    assert [(b["prompt"], b["became"], b["cause"]) for b in ct.broken_prompts(data, "ours", threshold=0.5)] == [
        ("a red square", "circle", "erased"), ("a green circle", "purple", "other")]


def test_report_writes_every_file_and_strict_json(data, tmp_path):
    out = tmp_path / "report"
    md = ct.report(data, out, "Concepts (test)")
    names = {p.name for p in out.iterdir()}
    expected = {f"{stem}.{ext}" for stem in ["concepts_summary", *(f"concepts_{k}" for k in ct.METRICS)]
                for ext in ("md", "csv", "tex")} | {"concepts.json", "concepts.png", "concepts.md"}
    assert expected <= names
    assert (out / "concepts.md").read_text() == md
    text = (out / "concepts.json").read_text()
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in concepts.json"))
    assert back["runs"]["red"]["uce"]["ssim_target"] is None and back["missing"] == [["square", "uce"]]
    assert md.startswith("# Concepts (test)\n")
    assert "![" in md and "(concepts.png)" in md
    assert "pulled towards an instruction: 'a square'" in md
    assert "- square/uce" in md
    assert md.count(render.LEGEND) == 1  # the summary's; the per-concept tables are not ranked


def test_figure_none_without_data(data, tmp_path):
    empty = dict(data, methods=["uce"], runs={c: {"uce": None} for c in CONCEPTS})
    assert ct.figure(empty, tmp_path / "x.png", "t") is None
    assert not (tmp_path / "x.png").exists()
