"""`make results-smoke`: the evidence pipeline (issue 9) end to end at tiny sizes, and its summaries checked against
the per-seed files they were made from (a second route: means and standard deviations recomputed here)."""
import json
import os
import statistics
import subprocess

import pytest
from PIL import Image

from tests.conftest import ROOT

def _make_smoke(out):
    env = {**os.environ, "RESULTS_SMOKE_OUT": str(out)}
    proc = subprocess.run(["make", "-s", "results-smoke", f"RESULTS_SMOKE_OUT={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((out / "results_meta.json").read_text())


def _sd(values):
    return statistics.stdev(values) if len(values) > 1 else 0.0


@pytest.mark.slow  # the whole results-smoke pipeline, 6 trainings + evaluations (about 4 min on 2 cores): make test-slow
def test_results_smoke_summaries_match_the_per_seed_files_and_a_rerun_trains_nothing(tmp_path):
    out = tmp_path / "results"
    meta = _make_smoke(out)
    assert meta["seeds"] == [0, 1] and not meta["failed"]
    assert len(meta["train_times"]) == 2 + 2 * 2  # ours x 2 seeds, 2 lambdas x 2 seeds

    # Table 1 over seeds = mean/std of the seeds' eval.json, system by system
    table = json.loads((out / "table1.json").read_text())
    per_seed = {s: {} for s in (0, 1)}
    for s in (0, 1):
        root = out / "table1" / f"seed{s}"
        for folder in [root / "base", root / "runs" / "ours", root / "reference"]:
            rec = json.loads((folder / "eval.json").read_text())
            per_seed[s][rec["system"]] = rec["metrics"]
    rows = {r["system"]: r for r in table["rows"]}
    assert set(rows) == set(per_seed[0])
    checked = 0
    for system, row in rows.items():
        for metric, (mean, std, n) in row["values"].items():
            vals = [per_seed[s][system][metric] for s in (0, 1)]
            assert n == 2 and mean == pytest.approx(statistics.mean(vals)) and std == pytest.approx(_sd(vals))
            checked += 1
    assert checked >= 9
    md = (out / "table1.md").read_text()
    ours_fid = rows["ours"]["values"]["fid"]
    assert f"{ours_fid[0]:.2f} ± {ours_fid[1]:.2f}" in md

    # the frontier = each method's probe.jsonl averaged over seeds, step by step
    frontier = json.loads((out / "frontier.json").read_text())
    for method in ("ours",):
        curves = [[json.loads(x) for x in (out / "table1" / f"seed{s}" / "runs" / method / "probe.jsonl").read_text().split("\n") if x]
                  for s in (0, 1)]
        steps = [p["step"] for p in curves[0]]
        assert steps == [0, 2]
        for i, step in enumerate(steps):
            row = next(r for r in frontier if r["method"] == method and r["step"] == step)
            for key in ("concept_rate", "ssim_preserved"):
                vals = [c[i][key] for c in curves]
                assert row[key] == pytest.approx(statistics.mean(vals)) and row[key + "_std"] == pytest.approx(_sd(vals))
        assert next(r for r in frontier if r["method"] == method and r["step"] == 0)["ssim_preserved"] == pytest.approx(1.0)
    assert Image.open(out / "frontier.png").size[0] > 300

    # the lambda sweep: one row per lambda, both seeds
    sweep = json.loads((out / "lambda" / "sweep.json").read_text())
    assert sweep["varied"] == ["lambda"] and [(r["setting"]["lambda"], r["n"]) for r in sweep["rows"]] == [(0, 2), (5, 2)]
    assert "## λ sweep of ours" in (out / "results.md").read_text()

    # resumable: everything is cached, nothing trains again and the numbers do not move
    again = _make_smoke(out)
    assert again["train_times"] == {}
    assert json.loads((out / "table1.json").read_text()) == table
