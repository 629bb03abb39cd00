"""W&B offline logging of a sweep (grouping, image media, summaries), `python -m eval.sweep`'s tables, and the
Hydra launcher configs. Everything runs offline: the test reads the records W&B wrote into the run folders."""
from __future__ import annotations

import csv
import json
import math
import os
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from tests.conftest import ROOT, compose_cfg, run_cli
from tests.wandb_records import records


def _hydra_launcher(choice: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=[f"hydra/launcher={choice}"], return_hydra_config=True).hydra.launcher


def test_launcher_configs_compose():
    local = _hydra_launcher("local")
    assert local._target_.endswith("JoblibLauncher") and local.n_jobs == 2
    slurm = _hydra_launcher("slurm")
    assert slurm._target_.endswith("SlurmLauncher")
    assert slurm.gpus_per_node == 1 and slurm.timeout_min == 60 and slurm.array_parallelism == 32


def logged(path: Path) -> dict:
    """What an offline W&B run file holds, values decoded: {"group", "config": {key: value}, "history": {step:
    {key: value}}, "summary": {key: last value}} (nested keys joined with '/')."""
    out = {"group": None, "config": {}, "history": {}, "summary": {}}

    def items(seq):
        return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in seq}

    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["group"] = rec.run.run_group
            out["config"].update(items(rec.run.config.update))
        elif kind == "config":
            out["config"].update(items(rec.config.update))
        elif kind == "history":
            row = items(rec.history.item)
            out["history"].setdefault(int(row["_step"]), {}).update(row)
        elif kind == "summary":
            out["summary"].update(items(rec.summary.update))
    return out


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_wandb_offline_sweep_is_grouped_and_logs_what_the_run_folders_hold(tmp_path):
    """Each job's W&B run (read back from the offline file) holds its run folder's numbers: per step the
    metrics.jsonl row, as the summary the numbers of summary.json, as config the saved config.yaml, and as media
    the very preview and timeline PNGs; the sweep's own run holds sweep.csv as its table."""
    sweep = tmp_path / "2026-01-01" / "10-00-00"
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(WANDB_MODE="offline", HOME=str(tmp_path))  # no ~/.netrc: the logger chooses offline by itself
    done = run_cli(["-m", "erasure.train", "-m", "model=tiny", "concept=nudity", "trainer.iterations=2",
                    "trainer.preview_every=1", "logger=wandb", "lambda=0,1", f"hydra.sweep.dir={sweep}"], env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = run_cli(["-m", "eval.sweep", str(sweep), "wandb=true"], env=env)
    assert summary.returncode == 0, summary.stderr[-2000:]

    runs = sorted(sweep.glob("[0-9]_*"))
    assert len(runs) == 2
    for run in runs:
        (f,) = run.glob("wandb/offline-run-*/run-*.wandb")
        rec = logged(f)
        assert rec["group"] == "sweep-2026-01-01-10-00-00"  # the jobs of one multirun share a group
        saved = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))
        assert {k: v for k, v in rec["config"].items() if not k.startswith("_")} == saved
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        for r in rows:
            logged_row = {k[len("train/"):]: v for k, v in rec["history"][r["step"]].items() if k.startswith("train/")}
            assert logged_row == {k: v for k, v in r.items() if k != "step"}, r["step"]
        for step in (0, 1, 2):  # the preview grids, as written to samples/
            assert rec["history"][step]["preview/sha256"] == sha256(run / "samples" / f"step_{step:06d}.png")
        assert rec["history"][2]["timeline/sha256"] == sha256(run / "timeline.png")
        own = json.loads((run / "summary.json").read_text())
        numbers = {k: v for k, v in own.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        numbers.update({f"final/{k}": v for k, v in own["final"].items()})
        assert {k: rec["summary"].get(k) for k in numbers} == numbers
        assert numbers["final/loss"] == rows[-1]["loss"]

    (own,) = sweep.glob("wandb/offline-run-*/run-*.wandb")
    rec = logged(own)
    assert rec["group"] == "sweep-2026-01-01-10-00-00"
    (table,) = [row for row in rec["history"].values() if "sweep/table/path" in row]
    logged_table = json.loads((own.parent / "files" / table["sweep/table/path"]).read_text())
    with (sweep / "sweep.csv").open() as fh:
        rows = list(csv.reader(fh))
    assert logged_table["columns"] == rows[0]
    assert [[float(v) for v in r] for r in logged_table["data"]] == [[float(v) for v in r] for r in rows[1:]]
    times = [json.loads((p / "summary.json").read_text())["train_time_s"] for p in runs]
    assert [float(r[rows[0].index("train_time_s")]) for r in rows[1:]] == times  # one seed per setting: its own number
    assert [float(r[0]) for r in rows[1:]] == [0.0, 1.0]  # lambda

    # eval.figures stacks the runs' timelines (one per method: both runs are `ours`, the later one is shown)
    figs = run_cli(["-m", "eval.figures", f"runs={sweep}", f"out={tmp_path / 'figures'}"], env=env)
    assert figs.returncode == 0, figs.stderr[-2000:]
    from PIL import Image

    stacked = Image.open(tmp_path / "figures" / "timelines.png")
    one = Image.open(runs[-1] / "timeline.png")
    assert stacked.width == one.width and stacked.height > one.height
    assert "erasure curve: no run has probe.jsonl" in figs.stderr  # the tiny model has no probe: said, skipped


def _run_folder(root: Path, lam: float, seed: int, numbers: dict) -> None:
    """A run folder as erasure.train leaves it (config.yaml, summary.json); the numbers are given, the config real."""
    run = root / f"lam{lam}_seed{seed}"
    run.mkdir(parents=True)
    cfg = compose_cfg(["model=tiny", "concept=nudity", f"lambda={lam}", f"trainer.seed={seed}"])
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (run / "summary.json").write_text(json.dumps({"iterations": 200, **numbers}))


def test_sweep_means_and_stds_over_seeds(tmp_path):
    values = {(0.0, 0): 0.0, (0.0, 1): 0.2, (0.0, 2): 0.1, (5.0, 0): 0.8, (5.0, 1): 0.6, (5.0, 2): 0.7}
    for (lam, seed), rate in values.items():
        _run_folder(tmp_path, lam, seed, {"concept_rate_after": rate, "ssim_preserved": 1 - rate / 2})
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text("a: 1\n")
    done = run_cli(["-m", "eval.sweep", str(tmp_path)])
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert result["varied"] == ["lambda"] and result["replicates"] == ["trainer.seed"]
    for row in result["rows"]:
        lam = row["setting"]["lambda"]
        rates = [values[(lam, s)] for s in range(3)]
        assert row["n"] == 3
        assert math.isclose(row["concept_rate_after"], statistics.mean(rates), abs_tol=1e-12)
        assert math.isclose(row["concept_rate_after_std"], statistics.stdev(rates), abs_tol=1e-12)
        assert math.isclose(row["ssim_preserved"], statistics.mean(1 - r / 2 for r in rates), abs_tol=1e-12)
    md = (tmp_path / "sweep.md").read_text()  # headers and marks from the registry: rate lower, SSIM higher is better
    assert "| lambda | seeds | Concept rate ↓ | SSIM to base (other prompts) ↑ |" in md
    assert "| 0.0 | 3 | **0.100 ± 0.100** | **0.950 ± 0.050** |" in md
    assert "| 5.0 | 3 | <u>0.700 ± 0.100</u> | <u>0.650 ± 0.050</u> |" in md
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "unfinished" in done.stderr  # said, and left out


def test_sweep_of_an_empty_folder_is_one_sentence(tmp_path):
    done = run_cli(["-m", "eval.sweep", str(tmp_path)])
    assert done.returncode == 2 and done.stderr.strip().startswith("error: no finished runs")
