"""Experiments (``conf/experiment/*.yaml``) on one orchestration path.

:func:`run` (``eval.table1``, ``eval.results``): trains what is missing, ``jobs`` subprocesses of
``python -m erasure.train`` at a time, longest first (every command is made by :func:`train_job`); evaluates each
table's systems (base model, every method, reference row; the tables of several seeds ``jobs`` at a time in worker
processes) and writes its report. With ``seeds`` it also trains the λ sweep and writes Table 1 over seeds, the sweep
summary, the frontier and ``results.md``. Resumable: a finished run folder of the current base model is reused, and
evaluations come from the image cache.

:func:`sweep` summarises a folder of runs (``eval.sweep``); :func:`report` rebuilds Table 1 from finished evaluations
(``eval.report``).
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import logging.handlers
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from erasure import schema
from erasure.errors import UserError, terminate_raises
from erasure.io import to_json, write_text_atomic

from . import plots, render, tables
from .concept_tables import RECORD_FILES, RUN_FILES
from .config import compose
from .evaluation import evaluate
from .prompts import ROOT, resolve_path

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- training
def _split(value) -> list[str]:
    """Overrides given as a list, or as one string of space-separated overrides (handy from make)."""
    return str(value).split() if isinstance(value, str) else [str(o) for o in value or []]


@dataclasses.dataclass
class TrainJob:
    """One ``erasure.train`` subprocess: its name (logs, failures), run folder, overrides and their config."""

    name: str
    run_dir: Path
    overrides: list[str]
    config: DictConfig  # what erasure.train composes from the overrides

    resume: bool = False  # set by needs_training: the folder holds this job's unfinished run with a checkpoint
    record: Path | None = None  # where the finished run's numbers are kept (record_run); a matching record is reused

    @property
    def command(self) -> list[str]:
        # the experiment decided this folder needs training: continue this job's own killed run from its last
        # checkpoint, or replace what is there (nothing, another config's run, or a run of another base)
        where = [f"resume={self.run_dir}"] if self.resume else ["overwrite=true"]
        return [sys.executable, "-m", "erasure.train", *self.overrides, f"hydra.run.dir={self.run_dir}", *where]


def train_job(cfg: DictConfig, method: str, run_dir: Path, name: str, extra: list[str] = ()) -> TrainJob:
    """The one place a training command is made: the experiment's model and concept, ``train_overrides`` (every
    method), ``method_overrides.<method>``, then the job's own (seed, λ, probe points). The config is composed here,
    so that a bad override stops the experiment before any training."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from erasure.config import compose as compose_train

    every = cfg.get("checkpoint_every")  # before train_overrides, which may change it
    overrides = [*system_overrides(cfg, method), f"model={cfg.model}", f"concept={cfg.concept}",
                 *([f"trainer.checkpoint_every={int(every)}"] if every is not None else []), *_split(cfg.train_overrides), *_split((cfg.get("method_overrides") or {}).get(method)), *extra]
    try:
        config = compose_train(overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(f"training '{name}': {str(exc).strip().splitlines()[0]}") from None
    return TrainJob(name, run_dir, overrides, config)


def finished(run_dir: Path) -> bool:
    return all((run_dir / f).is_file() for f in RUN_FILES)


def recorded(record_dir: Path | None) -> bool:
    return record_dir is not None and all((record_dir / f).is_file() for f in RECORD_FILES)


def record_run(run_dir: Path, record_dir: Path, wall_s: float | None = None) -> bool:
    """Copy a finished run's summary and config to ``record_dir`` with ``recorded.json`` (trained when: the summary's
    time; on which machine; the commit checked out when it was recorded; the wall-clock seconds of its training
    process when known). Returns False when the record already holds this run (same summary). Each file is written
    atomically."""
    summary = (run_dir / "summary.json").read_text()
    if recorded(record_dir) and (record_dir / "summary.json").read_text() == summary:
        return False
    if recorded(record_dir) and _saved_config(record_dir) != _saved_config(run_dir):
        log.warning("not recorded: %s holds a run of another config than %s (remove that folder to record this "
                    "run in its place, or give the experiment another record=<folder>)", record_dir, run_dir)
        return False
    if recorded(record_dir):
        log.warning("replacing the record %s with the run %s (same config, trained again)", record_dir, run_dir)
    when = datetime.datetime.fromtimestamp((run_dir / "summary.json").stat().st_mtime).isoformat(timespec="seconds")
    meta = dict(run_dir=str(run_dir), trained=when, machine=machine(), git_head_at_record=_commit(), wall_s=wall_s)
    write_text_atomic(record_dir / "config.yaml", (run_dir / "config.yaml").read_text())
    write_text_atomic(record_dir / "summary.json", summary)
    write_text_atomic(record_dir / "recorded.json", to_json(meta, indent=2) + "\n")  # last: marks it complete
    log.info("recorded %s -> %s", run_dir, record_dir)
    return True


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@functools.cache
def _fingerprint(model_yaml: str) -> str:
    from erasure.models import load_models

    return load_models(OmegaConf.create(model_yaml), "cpu").fingerprint


def same_run(job: TrainJob, folder: Path | None = None) -> bool:
    """Whether the ``config.yaml`` saved in ``folder`` (the job's run folder by default) is the config this job would
    train (``resume``/``overwrite`` aside), compared after the same validation ``erasure.train`` applies (shortcuts
    copied into the method)."""
    from erasure.config import validate

    saved = _saved_config(folder or job.run_dir)
    if saved is None:  # unreadable or torn: not this job's run
        return False
    mine = job.config.copy()
    validate(mine)
    return _without_run_keys(OmegaConf.to_container(mine, resolve=True)) == saved


def _without_run_keys(config: dict) -> dict:
    """A run's config without the keys that say how it was started rather than what it trains."""
    return {k: v for k, v in config.items() if k not in ("resume", "resume_edited", "overwrite")}


def _saved_config(folder: Path) -> dict | None:
    """``folder/config.yaml`` as a dict without the start keys, or None when it cannot be read. Trainer keys added
    after the run was saved take their schema default, which is how that run trained (e.g. trainer.channels_last)."""
    try:
        saved = _without_run_keys(OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"), resolve=True))
    except Exception:
        return None
    if isinstance(saved.get("trainer"), dict):
        from erasure.config import TrainerConfig

        defaults = dataclasses.asdict(TrainerConfig())
        saved["trainer"] = {**{k: v for k, v in defaults.items() if k not in saved["trainer"]}, **saved["trainer"]}
    return saved


def needs_training(job: TrainJob, reuse: bool) -> bool:
    """False when the run folder holds a finished run of the job's base model (``reuse``). An unfinished run of the
    same config with a checkpoint (an experiment killed mid-training) is continued from it (``job.resume``)."""
    from erasure.checkpoint import list_checkpoints

    if not finished(job.run_dir) and reuse and recorded(job.record) and _same_base(job, job.record) \
            and same_run(job, job.record):
        log.info("reusing the recorded run %s (its run folder %s is not here)", job.record, job.run_dir)
        return False
    if not finished(job.run_dir):
        job.resume = bool(reuse and list_checkpoints(job.run_dir) and same_run(job))
        if job.resume:
            log.info("continuing the unfinished run %s from its last checkpoint", job.run_dir)
        return True
    if not reuse:
        return True
    if _same_base(job, job.run_dir):
        log.info("reusing the finished run %s", job.run_dir)
        return False
    log.warning("run %s was trained on another base model than the current one: training it again", job.run_dir)
    return True


def _same_base(job: TrainJob, folder: Path) -> bool:
    """Whether the run in ``folder`` (its summary.json) was trained on the job's base model (same fingerprint)."""
    trained_on = json.loads((folder / "summary.json").read_text()).get("base_fingerprint")
    return trained_on == _fingerprint(OmegaConf.to_yaml(job.config.model, resolve=True))


def _die_with_parent() -> None:
    """In a training child before exec (Linux): SIGTERM it when the experiment process dies, however it dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the experiment's own handler still stops its children
        pass


def stop_children(running: dict) -> None:
    """SIGTERM every running training child, wait for it (a killed training resumes from its last checkpoint), and
    say which runs were stopped."""
    for proc, *_ in running.values():
        if proc.poll() is None:
            proc.terminate()
    for name, (proc, logf, *_) in running.items():
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        logf.close()
    if running:
        log.warning("stopped %d training(s): %s; rerun the same command to resume them", len(running),
                    ", ".join(running))


def run_training(jobs: list[TrainJob], n_jobs: int, reuse: bool) -> tuple[dict, dict]:
    """Train the jobs that have no finished run, ``n_jobs`` subprocesses at a time, longest first (so parallel jobs
    end close together). Returns ({name: seconds}, {name: error}); each job's output goes to <run>/train_stdout.log.
    The children belong to this process: Ctrl-C or SIGTERM stops them before it exits, and they die with it.
    """
    todo = [j for j in jobs if needs_training(j, reuse)]
    if n_jobs > 1:
        todo.sort(key=lambda j: -int(j.config.trainer.iterations))
    running: dict[str, tuple] = {}
    previous = terminate_raises()
    try:
        return _train_all(todo, running, n_jobs)
    except BaseException:
        stop_children(running)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _train_all(todo: list[TrainJob], running: dict, n_jobs: int) -> tuple[dict, dict]:
    timings, failed = {}, {}
    records = {j.name: j.record for j in todo}
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    total = len(todo)
    while todo or running:
        while todo and len(running) < n_jobs:
            job = todo.pop(0)
            job.run_dir.mkdir(parents=True, exist_ok=True)
            log.info("training %s (%d/%d): %s", job.name, total - len(todo), total, " ".join(job.command[1:]))
            logf = open(job.run_dir / "train_stdout.log", "a" if job.resume else "w")
            running[job.name] = (subprocess.Popen(job.command, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                                  preexec_fn=_die_with_parent if sys.platform == "linux" else None),
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
            else:  # the checkpoints were there to continue a killed run; the finished run is its delta
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
                timings[name] = round(time.perf_counter() - t0, 1)
                log.info("trained %s in %.0f s", name, timings[name])
                if records.get(name) is not None:  # at once: an experiment stopped later keeps what it finished
                    record_run(run_dir, records[name], timings[name])
    return timings, failed


def system_overrides(cfg: DictConfig, name: str) -> list[str]:
    """The overrides that make system ``name``: ``method=<name>`` for a registered method, or the variant's own
    (``variants.<name>``: a string or list of erasure.train overrides that starts with ``method=<registered method>``,
    e.g. ``ours_adv: method=ours method.adversarial=true``). A variant is a row of its own, trained in runs/<name>."""
    variant = (cfg.get("variants") or {}).get(name)
    if variant is None:
        return [f"method={name}"]
    overrides = _split(variant)
    if not overrides or not overrides[0].startswith("method="):
        raise UserError(f"variants.{name} must start with method=<a registered method>, got {variant!r}")
    return overrides


def chosen_methods(cfg: DictConfig) -> list[str]:
    """``methods`` (null = every registered method, then every variant), each checked against the registry and
    ``variants``."""
    from erasure import registry

    variants = list(cfg.get("variants") or {})
    known = registry.available() + [v for v in variants if v not in registry.available()]
    methods = list(cfg.methods) if cfg.methods else known
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(known)} (or add a variant: "
                        f"++variants.<name>=\"'method=<method> <overrides>'\")")
    return methods


# -------------------------------------------------------------------------------------------------- evaluation
def system_cfg(cfg: DictConfig, system: str, run: Path | None, out: Path, name: str | None = None) -> DictConfig:
    """The evaluation config of one system, sharing the experiment's suite (and its overrides). ``name``: its row's
    label (default: the run's method; a variant's run needs its own, e.g. ``ours_adv`` beside ``ours``)."""
    return OmegaConf.create(dict(run=str(run) if run else None, system=system, out=str(out), name=name,
                                 data_dir=cfg.data_dir, cache_dir=cfg.cache_dir, device=cfg.device, force=cfg.force,
                                 suite=OmegaConf.to_container(cfg.suite, resolve=False)))


def evaluate_table(cfg: DictConfig, root: Path, methods: list[str], title: str) -> dict:
    """One Table 1 in ``root``: base model, ``root/runs/<method>`` and reference evaluated, the report written."""
    start = time.perf_counter()
    runs = [root / "runs" / m for m in methods]
    systems = [("base", runs[0], root / "base"), *[("run", r, r) for r in runs], ("reference", None, root / "reference")]
    timings = {}
    for system, run, folder in systems:
        t0 = time.perf_counter()
        evaluate(system_cfg(cfg, system, run, folder, name=run.name if system == "run" else None))
        timings[f"eval/{folder.name}"] = round(time.perf_counter() - t0, 1)
    result = report([folder for _, _, folder in systems], root, title, bool(cfg.rank_oracles), str(cfg.logger),
                    str(cfg.wandb_project))
    return dict(markdown=result["markdown"], records=result["records"], timings=timings,
                total_s=round(time.perf_counter() - start, 1))


def _table_in_worker(args: tuple) -> dict:
    container, root, methods, title = args
    return evaluate_table(OmegaConf.create(container), Path(root), methods, title)


def _worker_logging(queue, level: int) -> None:
    """A worker's log records go to the parent's handlers."""
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(queue)]
    root.setLevel(level)


def evaluate_tables(cfg: DictConfig, todo: dict, titles: dict) -> dict:
    """{key: evaluate_table(...)} for ``todo`` = {key: (root, methods)}; with ``jobs`` > 1, that many tables at once
    in worker processes. The tables share the base model's images (the image cache), so the first table's base model
    is evaluated here first: the workers then find its images made, instead of generating them side by side."""
    workers = min(max(1, int(cfg.jobs or 1)), len(todo))
    if workers <= 1:
        return {k: evaluate_table(cfg, root, methods, titles[k]) for k, (root, methods) in todo.items()}
    root, methods = next(iter(todo.values()))
    evaluate(system_cfg(cfg, "base", root / "runs" / methods[0], root / "base"))
    log.info("evaluating %d tables, %d at a time", len(todo), workers)
    container = OmegaConf.to_container(cfg, resolve=False)
    args = [(container, str(root), methods, titles[k]) for k, (root, methods) in todo.items()]
    return dict(zip(todo, map_in_workers(_table_in_worker, args, workers)))


def map_in_workers(fn, args: list, workers: int) -> list:
    """``[fn(a) for a in args]`` in ``workers`` spawned processes whose log records go to this process's handlers."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    listener = logging.handlers.QueueListener(queue, *logging.getLogger().handlers, respect_handler_level=True)
    listener.start()
    try:
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_logging,
                                 initargs=(queue, logging.getLogger().getEffectiveLevel())) as pool:
            return list(pool.map(fn, args))
    finally:
        listener.stop()


# ------------------------------------------------------------------------------------------------- experiments
def check_jobs(cfg: DictConfig) -> None:
    """``jobs`` (processes at once) is a whole number of at least 1 (0 or -2 used to be taken as 1 without a word);
    ``checkpoint_every`` a whole number of at least 0, or null."""
    schema.check_keys(cfg, {"jobs": schema.at_least(1), "checkpoint_every": schema.or_null(schema.at_least(0))},
                      "experiment")


def run(cfg: DictConfig, command: str) -> dict:
    """Table 1 (``seeds: null``: one table in ``out``), or Table 1 over ``seeds`` with the λ sweep and the frontier.
    ``command`` is recorded in the meta files."""
    start = time.perf_counter()
    check_jobs(cfg)
    if cfg.logger not in ("none", "wandb"):
        raise UserError(f"unknown logger '{cfg.logger}': choose none or wandb")
    out = resolve_path(cfg.out)
    methods = chosen_methods(cfg)
    seeds = None if cfg.seeds is None else [int(s) for s in cfg.seeds]
    if seeds == []:
        raise UserError("seeds is empty: give at least one training seed, e.g. seeds=[0,1,2]")
    if cfg.lambdas and seeds is None:
        raise UserError("lambdas needs seeds (the λ runs are trained for every seed): e.g. seeds=[0]")
    roots = {None: out} if seeds is None else {s: out / "table1" / f"seed{s}" for s in seeds}
    probe = [f"trainer.{k}={int(cfg[k])}" for k in ("probe_points", "probe_seeds") if cfg.get(k) is not None]
    jobs = {s: [train_job(cfg, m, root / "runs" / m, m if s is None else f"{m} seed={s}",
                          [] if s is None else [f"trainer.seed={s}", *probe]) for m in methods]
            for s, root in roots.items()}
    m = str(cfg.lambda_method)
    lambda_jobs = [train_job(cfg, m, out / "lambda" / f"lambda{lam}_seed{s}", f"{m} lambda={lam} seed={s}",
                             [f"lambda={lam}", f"trainer.seed={s}"])  # folder names without '=': Hydra's grammar
                   for lam in cfg.lambdas for s in seeds or []]
    t0 = time.perf_counter()
    every = [j for js in jobs.values() for j in js] + lambda_jobs
    missing = {}
    if not cfg.get("train", True):  # report the finished runs only; list the others as missing
        missing = {j.name: f"{j.name} (not trained: train=false)" for j in every if needs_training(j, True)}
    train_times, failed = run_training([j for j in every if j.name not in missing], max(1, int(cfg.jobs or 1)),
                                       bool(cfg.reuse))
    failed.update(missing)
    timings = {"training_s": round(time.perf_counter() - t0, 1)}
    todo = {}
    for s, js in jobs.items():
        ok = [j.run_dir.name for j in js if j.name not in failed]
        if ok:
            todo[s] = (roots[s], ok)
        elif s is None:
            raise UserError("no method trained successfully: " + "; ".join(failed.values()))
        else:
            log.error("seed %d: no method trained, no table", s)
    suffix = f"model={cfg.model}, concept={cfg.concept}, suite={cfg.suite.name}"
    titles = {s: (cfg.title or f"Table 1 analogue: {suffix}") if s is None else f"Table 1 analogue, seed {s}: {suffix}"
              for s in todo}
    t0 = time.perf_counter()
    done = evaluate_tables(cfg, todo, titles)
    timings["evaluation_s"] = round(time.perf_counter() - t0, 1)
    meta = dict(command=command, date=datetime.datetime.now().isoformat(timespec="seconds"), failed=failed)
    for s, result in done.items():
        trained = {f"train/{j.run_dir.name}": train_times[j.name] for j in jobs[s] if j.name in train_times}
        write_text_atomic(roots[s] / "table1_meta.json", to_json(dict(
            meta, total_s=result["total_s"], methods=todo[s][1], timings={**trained, **result["timings"]}), indent=2) + "\n")
    if seeds is None:
        md = done[None]["markdown"]
        if failed:
            md += f"\nmissing (training failed): {', '.join(failed)}; see {out}/runs/<method>/train_stdout.log\n"
        log.info("table 1 done in %.0f s -> %s", time.perf_counter() - start, out)
        return dict(markdown=md)
    timings.update({f"eval_seed{s}_s": done[s]["total_s"] for s in seeds if s in done})
    meta.update(machine=machine(), torch_threads=os.environ.get("OMP_NUM_THREADS"), seeds=seeds, methods=methods,
                lambdas=list(cfg.lambdas), timings=timings, train_times=train_times)
    return summarise_seeds(cfg, out, {s: done[s]["records"] for s in seeds if s in done}, lambda_jobs, meta, start)


def summarise_seeds(cfg: DictConfig, out: Path, per_seed: dict, lambda_jobs: list[TrainJob], meta: dict,
                    start: float) -> dict:
    """Table 1 over seeds, the λ sweep, the frontier, results.md and results_meta.json in ``out``."""
    seeds, timings = meta["seeds"], meta["timings"]
    data = tables.over_seeds(per_seed)
    table = tables.over_seeds_table(data, f"Toy Table 1 over {len(seeds)} seeds: model={cfg.model}, "
                                          f"concept={cfg.concept}, suite={cfg.suite.name}")
    render.write(table, out, "table1")
    write_text_atomic(out / "table1.json", to_json(data, indent=2) + "\n")
    sweep_md = None
    runs = tables.find_runs(out / "lambda") if lambda_jobs else []
    if runs:
        if cfg.lambda_evaluate or (cfg.lambda_evaluate is None and not lambda_jobs[0].config.model.get("probe")):
            t0 = time.perf_counter()  # models without a probe (SD v1.4): the suite measures every λ run
            for run_dir in runs:
                evaluate(system_cfg(cfg, "run", run_dir, run_dir))
            timings["lambda_evaluation_s"] = round(time.perf_counter() - t0, 1)
        sweep_md, _ = write_sweep(out / "lambda", tables.sweep(out / "lambda", runs), x="lambda")
    rows = tables.frontier({s: out / "table1" / f"seed{s}" / "runs" for s in seeds}, meta["methods"])
    frontier = tables.frontier_table(rows)
    render.write(frontier, out, "frontier")
    write_text_atomic(out / "frontier.json", to_json(rows, indent=2) + "\n")
    png = plots.frontier(rows, out / "frontier.png", f"Erasure vs preservation along training ({cfg.model}, "
                         f"concept {cfg.concept}; {len(seeds)} seeds)")
    timings["total_s"] = round(time.perf_counter() - start, 1)
    write_text_atomic(out / "results_meta.json", to_json(meta, indent=2) + "\n")
    md = [f"# Results: {cfg.model}, concept {cfg.concept}", "",
          f"Made by `{meta['command']}` on {meta['date']} ({meta['machine']}); {timings['total_s']:.0f} s this time "
          f"(training {timings['training_s']:.0f} s, evaluation {timings['evaluation_s']:.0f} s; reused runs cost nothing).",
          "", "## Table 1 over seeds", "", render.to_markdown(table)]
    if sweep_md:
        md += [f"## λ sweep of {cfg.lambda_method}", "", sweep_md, "![λ sweep](lambda/sweep.png)", ""]
    md += ["## Erasure-vs-preservation frontier (each run's erasure curve)", "", render.to_markdown(frontier)]
    if png:
        md += ["", "![frontier](frontier.png)"]
    if meta["failed"]:
        md += ["", "Missing runs (training failed, or train=false): " + "; ".join(meta["failed"].values())]
    write_text_atomic(out / "results.md", "\n".join(md) + "\n")
    log.info("results done in %.0f s -> %s/results.md", timings["total_s"], out)
    return dict(markdown="\n".join(md) + "\n", table=data, frontier=rows, meta=meta)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def write_sweep(folder: Path, data: dict, x: str | None = None) -> tuple[str, Path | None]:
    """sweep.{json,md,csv,tex} and sweep.png into ``folder``; returns the markdown and the plot's path."""
    write_text_atomic(folder / "sweep.json", to_json(data, indent=2, default=str) + "\n")
    table = tables.sweep_table(data)
    render.write(table, folder, "sweep")
    return render.to_markdown(table), plots.sweep(data, folder / "sweep.png", x)


def sweep(cfg: DictConfig) -> dict:
    """The sweep summary of ``cfg.folder`` (conf/experiment/sweep.yaml)."""
    folder = Path(str(cfg.folder))
    if not folder.is_dir():
        raise UserError(f"sweep folder '{folder}' does not exist")
    runs = tables.find_runs(folder)
    if cfg.evaluate:
        for run_dir in runs:
            evaluate(compose("run", [f"run={run_dir}", *cfg.evaluation]))
    data = tables.sweep(folder, runs)
    md, png = write_sweep(folder, data, cfg.x)
    if cfg.wandb:
        log_sweep(data, folder, png)
    log.info("%d settings from %d runs (varied: %s) -> %s/sweep.{md,csv,tex,json}%s", len(data["rows"]),
             sum(r["n"] for r in data["rows"]), ", ".join(data["varied"]) or "nothing", folder, ", sweep.png" if png else "")
    return dict(data, markdown=md)


def report(folders: list, out: str | Path, title: str | None = None, rank_oracles: bool = False,
           logger: str = "none", wandb_project: str = "concept-erasure") -> dict:
    """Table 1 from finished evaluations (folders holding eval.json, or eval.json files): table1.{md,csv,tex}, and
    nudenet_classes.{md,csv} when a row has NudeNet's per-class counts."""
    records = tables.load_records(folders)
    table = tables.table1(records, title, rank_oracles)
    paths = render.write(table, out, "table1")
    classes = tables.nudenet_classes(records)
    if classes:
        render.write(classes, out, "nudenet_classes", ("md", "csv"))
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    if logger == "wandb":
        log_table(records, table, Path(out), wandb_project, title)
    return dict(table=table, paths=paths, records=records, markdown=render.to_markdown(table))


# ---------------------------------------------------------------------------------------------- across concepts
def chosen_concepts(cfg: DictConfig) -> list[str]:
    """``concepts`` (null = every concept of the world), each checked; the generated files checked to be what the
    rule makes (a stale or hand-edited file would make the table answer another question)."""
    from erasure.toyworld import concepts as toy

    if str(cfg.model) != "toyworld":
        raise UserError(f"the concepts experiment runs on the toy world, whose probe judges every concept: model=toyworld, "
                        f"got model={cfg.model}")
    every = toy.names()
    chosen = [str(c) for c in cfg.concepts] if cfg.concepts else every
    unknown = [c for c in chosen if c not in every]
    if unknown:
        raise UserError(f"unknown concept(s) {', '.join(unknown)}: choose from {', '.join(every)}")
    stale = toy.write(toy.ROOT / toy.OUT, toy.ROOT / toy.MACE_OUT, check=True)
    if stale:
        raise UserError(f"{len(stale)} generated concept file(s) differ from the rule ({stale[0]}): run "
                        "python -m erasure.toyworld.write_concepts")
    return chosen


def _with_concept(cfg: DictConfig, concept: str) -> DictConfig:
    """The experiment config with ``concept`` set, as train_job reads it (``concept=toy/<name>``)."""
    node = OmegaConf.to_container(cfg, resolve=False)
    node["concept"] = f"toy/{concept}"
    return OmegaConf.create(node)


def run_concepts(cfg: DictConfig, command: str) -> dict:
    """The concepts experiment (``conf/experiment/concepts.yaml``): every method on every toy concept, one seed each,
    trained by :func:`run_training` into ``<out>/runs/<concept>/<method>``; the report from the runs' own probes."""
    start = time.perf_counter()
    check_jobs(cfg)
    out = resolve_path(cfg.out)
    concepts = chosen_concepts(cfg)
    methods = chosen_methods(cfg)
    jobs = [train_job(_with_concept(cfg, c), m, out / "runs" / c / m, f"{m} on {c}",
                      [f"trainer.seed={int(cfg.seed)}"]) for c in concepts for m in methods]
    records = resolve_path(cfg.record) if cfg.get("record") else None
    for j in jobs:
        j.record = records / j.run_dir.relative_to(out / "runs") if records else None
        if j.record is not None and finished(j.run_dir):  # runs finished before recording was on, or by hand
            record_run(j.run_dir, j.record)
    missing = {}
    if not cfg.train:
        missing = {j.name: f"{j.name} (not trained: train=false)" for j in jobs if needs_training(j, True)}
    t0 = time.perf_counter()
    times, failed = run_training([j for j in jobs if j.name not in missing], max(1, int(cfg.jobs or 1)), bool(cfg.reuse))
    failed.update(missing)
    training_s = time.perf_counter() - t0
    from . import concept_tables  # after training: its report needs only the finished runs

    data = concept_tables.collect(out / "runs", concepts, methods, records)
    meta = dict(command=command, date=datetime.datetime.now().isoformat(timespec="seconds"), machine=machine(),
                torch_threads=os.environ.get("OMP_NUM_THREADS"), concepts=concepts, methods=methods,
                record=str(records) if records else None, from_records=data["from_records"],
                seed=int(cfg.seed), training_s=round(training_s, 1), trained=times, failed=failed,
                total_s=round(time.perf_counter() - start, 1))
    write_text_atomic(out / "concepts_meta.json", to_json(meta, indent=2) + "\n")
    title = f"Across concepts: {len(methods)} methods x {len(concepts)} toy-world concepts (seed {int(cfg.seed)})"
    md = concept_tables.report(data, out, title)
    head, _, rest = md.partition("\n")  # the title line, then the command, date and machine that made the report
    md = f"{head}\n\nMade by `{command}` on {meta['date']} ({meta['machine']}).\n{rest}"
    write_text_atomic(out / "concepts.md", md)
    if failed:
        log.error("%d run(s) missing: %s", len(failed), "; ".join(failed.values()))
    log.info("concepts done in %.0f s (training %.0f s) -> %s/concepts.md", meta["total_s"], training_s, out)
    return dict(markdown=md, data=data, meta=meta)


# ---------------------------------------------------------------------------------------------------- W&B
def log_table(records: list[dict], table: render.Table, out: Path, project: str, title: str | None = None) -> None:
    """The table as a W&B Table and each system's metrics as run summaries (offline without an API key)."""
    import wandb

    from erasure.loggers import wandb_mode

    run = wandb.init(project=project, name=title or "table1", job_type="eval", dir=str(out), mode=wandb_mode("auto", out),
                     reinit="finish_previous")
    columns, data = render.flat(table, missing=None)
    run.log({"table1": wandb.Table(columns=columns, data=data)})
    for rec in records:
        for m, v in rec["metrics"].items():
            run.summary[f"{rec['system']}/{m}"] = v
    run.finish()


def log_sweep(data: dict, folder: Path, png: Path | None) -> None:
    """The sweep table (W&B Table), the plot (image) and the concept rate against the swept key (line chart)."""
    import wandb

    from erasure.loggers import sweep_group, wandb_mode

    from .metrics import heading

    first = OmegaConf.load(Path(data["rows"][0]["runs"][0]) / "config.yaml")
    lg = first.get("logger") or {}
    run = wandb.init(project=lg.get("project", "concept-erasure"), entity=lg.get("entity"), job_type="sweep-summary",
                     group=sweep_group(folder), name=f"sweep {folder}", mode=wandb_mode(lg.get("mode"), folder),
                     dir=str(folder), reinit="finish_previous")
    columns, rows = render.flat(tables.sweep_table(data), missing=None)
    table = wandb.Table(columns=columns, data=rows)
    logged = {"sweep/table": table}
    x = plots.choose_x(data, None)
    m = next((k for k in plots.ERASURE if k in data["metrics"]), None)
    if x and m:
        logged["sweep/concept_rate_vs_" + x.replace(".", "_")] = wandb.plot.line(table, x, m, title=f"{heading(m)} vs {x}")
    if png is not None:
        logged["sweep/plot"] = wandb.Image(str(png))
    run.log(logged)
    run.finish()
