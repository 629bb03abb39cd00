"""Table 1 end to end: ``python -m eval.table1 [model=toyworld] [concept=circle] [out=outputs/table1]``.

For every method in ``erasure.registry.available()`` (or ``methods=[...]``): reuse ``<out>/runs/<method>``
when it holds a finished run, else train it with its default config in a subprocess
(``python -m erasure.train method=<m> model=<M> concept=<C> hydra.run.dir=<dir> <train_overrides>``).
Then evaluate the base model, each run and the reference row with the suite (images cached and
shared), and write the report (:mod:`eval.report`). ``make table1`` / ``make table1-smoke`` drive it.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from erasure.errors import UserError, exit_on_user_error

from .prompts import ROOT, resolve_path
from .report import load_records, log_wandb, to_markdown, write_report
from .run import compose_eval_cfg, evaluate_system

log = logging.getLogger("eval.table1")


def finished(run_dir: Path) -> bool:
    return (run_dir / "delta.safetensors").is_file() and (run_dir / "summary.json").is_file() \
        and (run_dir / "config.yaml").is_file()


def _overrides(value) -> list[str]:
    return str(value).split() if isinstance(value, str) else [str(o) for o in value or []]


def train_overrides(cfg: DictConfig, method: str) -> list[str]:
    """``train_overrides`` (every method) then ``method_overrides.<method>``: lists, or strings of
    space-separated overrides (handy from make)."""
    return _overrides(cfg.train_overrides) + _overrides((cfg.get("method_overrides") or {}).get(method))


def base_fingerprint(cfg: DictConfig) -> str:
    """Fingerprint of the base model erasure.train would load with this table's model and overrides."""
    from hydra import compose, initialize_config_dir

    from erasure.models import load_models

    overrides = [f"model={cfg.model}", f"concept={cfg.concept}"] + [o for o in _overrides(cfg.train_overrides)
                                                                  if o.startswith("model.")]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        train_cfg = compose(config_name="train", overrides=overrides)
    return load_models(train_cfg.model, "cpu").fingerprint


def _configured_iterations(method: str) -> int:
    path = ROOT / "conf" / "method" / f"{method}.yaml"
    try:
        return int(OmegaConf.load(path).get("iterations") or 0)
    except (OSError, ValueError, TypeError):
        return 0


def train_command(method: str, cfg: DictConfig, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "erasure.train", f"method={method}", f"model={cfg.model}", f"concept={cfg.concept}",
            f"hydra.run.dir={run_dir}", *train_overrides(cfg, method)]


@dataclasses.dataclass
class TrainJob:
    """One ``erasure.train`` subprocess: its name (logs, failures), run folder, command and expected length."""

    name: str
    run_dir: Path
    command: list[str]
    iterations: int = 0


def needs_training(job: TrainJob, reuse: bool, base: Callable[[], str]) -> bool:
    """False when the run folder holds a finished run of the current base model (``reuse``)."""
    if not (reuse and finished(job.run_dir)):
        return True
    trained_on = json.loads((job.run_dir / "summary.json").read_text()).get("base_fingerprint")
    if trained_on == base():
        log.info("reusing the finished run %s", job.run_dir)
        return False
    log.warning("run %s was trained on base %s, the current base is %s: training it again", job.run_dir, trained_on,
                base())
    return True


def run_training(jobs: list[TrainJob], n_jobs: int, reuse: bool, base: Callable[[], str]) -> tuple[dict, dict]:
    """Train the jobs that have no finished run, ``n_jobs`` subprocesses at a time, longest first (so parallel jobs
    end close together). Returns ({name: seconds}, {name: error}); each job's output goes to <run>/train_stdout.log.
    """
    todo = sorted((j for j in jobs if needs_training(j, reuse, base)), key=lambda j: -j.iterations if n_jobs > 1 else 0)
    running: dict[str, tuple] = {}
    timings, failed = {}, {}
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    total = len(todo)
    while todo or running:
        while todo and len(running) < n_jobs:
            job = todo.pop(0)
            job.run_dir.mkdir(parents=True, exist_ok=True)
            log.info("training %s (%d/%d): %s", job.name, total - len(todo), total, " ".join(job.command[1:]))
            logf = open(job.run_dir / "train_stdout.log", "w")
            running[job.name] = (subprocess.Popen(job.command, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT),
                                 logf, time.perf_counter(), job.run_dir)
        time.sleep(0.5)
        for name, (proc, logf, t0, run_dir) in list(running.items()):
            if proc.poll() is None:
                continue
            logf.close()
            del running[name]
            if proc.returncode != 0 or not finished(run_dir):
                lines = (run_dir / "train_stdout.log").read_text().strip().splitlines()
                failed[name] = (f"training '{name}' failed (exit {proc.returncode}): {' | '.join(lines[-2:])} "
                                f"(full log: {run_dir}/train_stdout.log)")
                log.error("%s", failed[name])
            else:
                timings[name] = round(time.perf_counter() - t0, 1)
                log.info("trained %s in %.0f s", name, timings[name])
    return timings, failed


def method_jobs(methods: list[str], cfg: DictConfig, out: Path, tag: str = "") -> list[TrainJob]:
    return [TrainJob(m + tag, out / "runs" / m, train_command(m, cfg, out / "runs" / m), _configured_iterations(m))
            for m in methods]


def train_methods(methods: list[str], cfg: DictConfig, out: Path) -> tuple[dict, dict]:
    """Train the methods that have no finished run in <out>/runs/<method>, ``cfg.jobs`` at a time."""
    return run_training(method_jobs(methods, cfg, out), max(1, int(cfg.get("jobs") or 1)), bool(cfg.reuse),
                        functools.cache(lambda: base_fingerprint(cfg)))


def chosen_methods(cfg: DictConfig) -> list[str]:
    """``methods`` (null = every registered method), each checked against the registry."""
    from erasure import registry

    methods = list(cfg.methods) if cfg.methods else registry.available()
    unknown = [m for m in methods if m not in registry.available()]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(registry.available())}")
    return methods


def cli(argv: list[str], config_name: str, fn):
    """The eval drivers' entry: compose ``conf/eval/<config_name>.yaml``, check the model/concept groups, run ``fn``."""
    from erasure.cli import check_group_overrides, setup_logging

    setup_logging()
    cfg = compose_eval_cfg(argv, config_name=config_name)
    check_group_overrides([f"model={cfg.model}", f"concept={cfg.concept}"])
    return fn(cfg)


def system_cfg(cfg: DictConfig, system: str, run: Path | None, out: Path) -> DictConfig:
    """An eval.run config for one system that shares the table's suite (and its overrides)."""
    return OmegaConf.create(dict(run=str(run) if run else None, system=system, out=str(out), name=None,
                                 data_dir=cfg.data_dir, cache_dir=cfg.cache_dir, device=cfg.device, force=cfg.force,
                                 suite=OmegaConf.to_container(cfg.suite, resolve=False)))


def table1(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    out = resolve_path(cfg.out)
    methods = chosen_methods(cfg)
    train_times, failed = train_methods(methods, cfg, out)
    timings = {f"train/{m}": t for m, t in train_times.items()}
    runs = [out / "runs" / m for m in methods if m not in failed]
    if not runs:
        raise UserError("no method trained successfully: " + "; ".join(failed.values()))
    folders = [out / "base"] + runs + [out / "reference"]
    systems = [("base", runs[0])] + [("run", r) for r in runs] + [("reference", None)]
    for (system, run), folder in zip(systems, folders):
        t0 = time.perf_counter()
        evaluate_system(system_cfg(cfg, system, run, folder))
        timings[f"eval/{folder.name}"] = round(time.perf_counter() - t0, 1)
    records = load_records(folders)
    title = cfg.title or f"Table 1 analogue: model={cfg.model}, concept={cfg.concept}, suite={cfg.suite.name}"
    result = write_report(records, out, title, bool(cfg.rank_oracles))
    if cfg.logger == "wandb":
        log_wandb(records, result["table"], out, str(cfg.wandb_project), title)
    elif cfg.logger != "none":
        raise UserError(f"unknown logger '{cfg.logger}': choose none or wandb")
    meta = dict(command="python -m eval.table1 " + " ".join(sys.argv[1:]), date=datetime.datetime.now().isoformat(timespec="seconds"),
                total_s=round(time.perf_counter() - start, 1), timings=timings, failed=failed, methods=methods)
    (out / "table1_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(to_markdown(result["table"], title), end="")
    if failed:
        print(f"\nmissing (training failed): {', '.join(failed)}; see {out}/runs/<method>/train_stdout.log")
    log.info("table 1 done in %.0f s -> %s", meta["total_s"], out)
    return dict(result, meta=meta)


@exit_on_user_error
def main(argv: list[str]) -> dict:
    return cli(argv, "table1", table1)


if __name__ == "__main__":
    main(sys.argv[1:])
