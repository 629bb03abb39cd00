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
from tests.wandb_records import summarise


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


def test_wandb_offline_sweep_is_grouped_and_logs_media(tmp_path):
    sweep = tmp_path / "2026-01-01" / "10-00-00"
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(WANDB_MODE="offline", HOME=str(tmp_path))  # no ~/.netrc: the logger chooses offline by itself
    done = run_cli(["-m", "erasure.train", "-m", "model=tiny", "concept=nudity", "trainer.iterations=2",
                    "trainer.preview_every=1", "logger=wandb", "lambda=0,1", f"hydra.sweep.dir={sweep}"], env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = run_cli(["-m", "eval.sweep", str(sweep), "wandb=true"], env=env)
    assert summary.returncode == 0, summary.stderr[-2000:]

    jobs = sorted(sweep.glob("[0-9]_*/wandb/offline-run-*/run-*.wandb"))
    assert len(jobs) == 2
    for f in jobs:
        rec = summarise(f)
        assert rec["group"] == "sweep-2026-01-01-10-00-00"  # the jobs of one multirun share a group
        assert {"train/loss", "train/concept", "train/penalty", "train/lr"} <= rec["history_keys"]
        assert {"preview/_type", "timeline/_type"} <= rec["history_keys"]  # image media: previews and timeline
        assert {"train_time_s", "final/loss"} <= rec["summary_keys"]
        assert {"method", "trainer", "lambda"} <= rec["config_keys"]
    (own,) = sweep.glob("wandb/offline-run-*/run-*.wandb")
    rec = summarise(own)
    assert rec["group"] == "sweep-2026-01-01-10-00-00" and "sweep/table/_type" in rec["history_keys"]

    rows = list(csv.DictReader((sweep / "sweep.csv").open()))
    assert [r["lambda"] for r in rows] == ["0.0", "1.0"] or [r["lambda"] for r in rows] == ["0", "1"]
    times = {json.loads((p / "summary.json").read_text())["train_time_s"] for p in sweep.glob("[0-9]_*")}
    assert {float(r["train_time_s"]) for r in rows} == times  # one seed per setting: the run's own number

    # eval.figures stacks the runs' timelines (one per method: both runs are `ours`, the later one is shown)
    figs = run_cli(["-m", "eval.figures", f"runs={sweep}", f"out={tmp_path / 'figures'}"], env=env)
    assert figs.returncode == 0, figs.stderr[-2000:]
    from PIL import Image

    stacked = Image.open(tmp_path / "figures" / "timelines.png")
    one = Image.open(sorted(sweep.glob("[0-9]_*/timeline.png"))[-1])
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
