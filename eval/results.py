"""The evidence (issue 9): ``python -m eval.results [model=toyworld] [concept=circle] [seeds=[0,1,2]] [out=...]``.

``make results`` drives it; ``make results-smoke`` runs the same code at tiny sizes. Three steps, each resumable
(a finished run folder of the current base model is reused, and evaluations come from the image cache):

1. training, ``jobs`` subprocesses at a time, longest first: every method at its default config for every seed
   (``<out>/table1/seed<s>/runs/<method>``, with its erasure curve: ``trainer.probe_points``), and the λ sweep of
   ``lambda_method`` for every seed (``<out>/lambda/lambda<λ>_seed<s>``);
2. each seed's Table 1 with the evaluation suite (:func:`eval.table1.table1`; same prompts and seeds for every
   method and seed), ``jobs`` seeds at a time in worker processes;
3. the summaries in ``<out>``: ``table1.{md,csv,json}`` (mean ± std over seeds), ``lambda/sweep.*``
   (:mod:`eval.sweep`), ``frontier.{png,csv,json}`` (each method's concept rate against SSIM to the base model at
   its erasure curve's iterations, seeds as error bars) and ``results.md`` (all of it, with date and machine).
"""
from __future__ import annotations

import csv
import datetime
import functools
import io
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from erasure.io import write_text_atomic
from erasure.errors import UserError, exit_on_user_error

from . import sweep as sweep_mod
from .sweep import mean_std
from .prompts import resolve_path
from .metrics import available_metrics, get_metric
from .report import fmt_value, header, load_records
from .run import evaluate_system
from .table1 import (TrainJob, _configured_iterations, _overrides, base_fingerprint, chosen_methods, cli, method_jobs,
                     run_training, system_cfg, table1, train_overrides)

log = logging.getLogger("eval.results")
FRONTIER_KEYS = ("concept_rate", "ssim_preserved", "preserved_accuracy", "ssim_target")


def seed_cfg(cfg: DictConfig, seed: int, out: Path) -> DictConfig:
    """The Table-1 config of one seed: its own folder, ``trainer.seed`` and the erasure curve for the frontier."""
    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    c.out = str(out / "table1" / f"seed{seed}")
    c.train_overrides = _overrides(cfg.train_overrides) + [
        f"trainer.seed={seed}", f"trainer.probe_points={int(cfg.probe_points)}", f"trainer.probe_seeds={int(cfg.probe_seeds)}"]
    c.title = f"Table 1 analogue, seed {seed}: model={cfg.model}, concept={cfg.concept}, suite={cfg.suite.name}"
    return c


def lambda_jobs(cfg: DictConfig, out: Path) -> list[TrainJob]:
    m = str(cfg.lambda_method)
    jobs = []
    for lam in cfg.lambdas:
        for seed in cfg.seeds:
            run_dir = out / "lambda" / f"lambda{lam}_seed{seed}"  # no '=': Hydra's override grammar
            cmd = [sys.executable, "-m", "erasure.train", f"method={m}", f"model={cfg.model}", f"concept={cfg.concept}",
                   f"hydra.run.dir={run_dir}", f"lambda={lam}", f"trainer.seed={seed}", *train_overrides(cfg, m)]
            jobs.append(TrainJob(f"{m} lambda={lam} seed={seed}", run_dir, cmd, _configured_iterations(m)))
    return jobs


# ------------------------------------------------------------------------------------------- Table 1 over seeds
def aggregate_table(per_seed: dict[int, list[dict]]) -> dict:
    """{system: {metric: (mean, std, n)}} over the seeds' eval records, in the order of the first seed's table."""
    order: list[tuple[str, str]] = []
    values: dict[str, dict[str, list[float]]] = {}
    for records in per_seed.values():
        for r in records:
            if (r["system"], r.get("kind", "run")) not in order:
                order.append((r["system"], r.get("kind", "run")))
            for m, v in r.get("metrics", {}).items():
                if isinstance(v, (int, float)):
                    values.setdefault(r["system"], {}).setdefault(m, []).append(float(v))
    present = {m for per in values.values() for m in per}
    columns = [m for m in available_metrics() if m in present]
    rows = [dict(system=s, kind=k, values={m: (*mean_std(values[s][m]), len(values[s][m]))
                                             for m in columns if m in values.get(s, {})}) for s, k in order]
    return dict(columns=columns, rows=rows, seeds=sorted(per_seed))


def table_markdown(table: dict, title: str) -> str:
    cols = table["columns"]
    best = {}
    for m in cols:
        hib = get_metric(m).higher_is_better
        means = [r["values"][m][0] for r in table["rows"] if r["kind"] == "run" and m in r["values"]]
        if hib is not None and means:
            best[m] = max(means) if hib else min(means)
    lines = [f"**{title}**", "", "| System | " + " | ".join(header(m) for m in cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in table["rows"]:
        cells = []
        for m in cols:
            if m not in r["values"]:
                cells.append("–")
                continue
            mean, std, n = r["values"][m]
            s = f"{fmt_value(m, mean)} ± {fmt_value(m, std)}" if n > 1 else fmt_value(m, mean)
            cells.append(f"**{s}**" if r["kind"] == "run" and best.get(m) == mean else s)
        lines.append(f"| {r['system']} | " + " | ".join(cells) + " |")
    lines += ["", f"Mean ± standard deviation over seeds {', '.join(map(str, table['seeds']))} (training seed; the "
              "evaluation prompts and seeds are the same for every row). Best method mean in **bold**. The base model "
              "and reference rows do not depend on the training seed."]
    return "\n".join(lines) + "\n"


def table_csv(table: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["system", "kind"] + [f"{m}{s}" for m in table["columns"] for s in ("", "_std", "_n")])
    for r in table["rows"]:
        w.writerow([r["system"], r["kind"]] + [x for m in table["columns"] for x in (r["values"].get(m) or ("", "", ""))])
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------- the frontier
def frontier(runs_by_seed: dict[int, Path], methods: list[str]) -> list[dict]:
    """Each method's erasure curve averaged over seeds: one row per (method, iteration) with mean/std/n of the
    probe's numbers (``probe.jsonl`` written by ``trainer.probe_points``)."""
    rows = []
    for m in methods:
        by_step: dict[int, list[dict]] = {}
        for root in runs_by_seed.values():
            f = root / m / "probe.jsonl"
            if f.is_file():
                for line in f.read_text().splitlines():
                    if line.strip():
                        p = json.loads(line)
                        by_step.setdefault(int(p["step"]), []).append(p)
        for step in sorted(by_step):
            points = by_step[step]
            row = dict(method=m, step=step, n=len(points))
            for k in FRONTIER_KEYS:
                vals = [float(p[k]) for p in points if k in p]
                if vals:
                    row[k], row[f"{k}_std"] = mean_std(vals)
            rows.append(row)
    return rows


def frontier_csv(rows: list[dict]) -> str:
    cols = ["method", "step", "n"] + [f"{k}{s}" for k in FRONTIER_KEYS for s in ("", "_std")]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def frontier_markdown(rows: list[dict]) -> str:
    lines = ["| method | iteration | seeds | concept rate ↓ | SSIM to base (other prompts) ↑ | shape acc. (other prompts) ↑ |",
             "|---|---:|---:|---:|---:|---:|"]

    def cell(r, k):
        return f"{r[k]:.3f} ± {r[k + '_std']:.3f}" if k in r else "–"

    for r in rows:
        lines.append(f"| {r['method']} | {r['step']} | {r['n']} | {cell(r, 'concept_rate')} | {cell(r, 'ssim_preserved')} "
                     f"| {cell(r, 'preserved_accuracy')} |")
    return "\n".join(lines) + "\n"


def plot_frontier(rows: list[dict], path: Path, title: str) -> Path | None:
    """Concept rate (↓) against SSIM to the base model (↑) along each method's training, seeds as error bars in
    both directions; the best corner is bottom right. Iteration 0 (the base model, shared) is drawn once."""
    rows = [r for r in rows if "concept_rate" in r and "ssim_preserved" in r]
    if not rows:
        log.info("frontier: no run has probe points with SSIM (train with trainer.probe_points on a model with a probe)")
        return None
    from erasure.images import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.6))
    base = next((r for r in rows if r["step"] == 0), None)
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == m and r["step"] > 0]
        if not pts:
            continue
        line = ax.errorbar([r["ssim_preserved"] for r in pts], [r["concept_rate"] for r in pts],
                           xerr=[r["ssim_preserved_std"] for r in pts], yerr=[r["concept_rate_std"] for r in pts],
                           marker="o", capsize=3, label=m)
        if base:  # the curve starts at the base model
            ax.plot([base["ssim_preserved"], pts[0]["ssim_preserved"]], [base["concept_rate"], pts[0]["concept_rate"]],
                    ls=":", color=line[0].get_color())
        last = pts[-1]
        ax.annotate(f"{last['step']}", (last["ssim_preserved"], last["concept_rate"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7, color=line[0].get_color())
    if base:
        ax.plot([base["ssim_preserved"]], [base["concept_rate"]], marker="*", ms=12, color="k", ls="", label="base model")
    ax.set_xlabel("SSIM to the base model's images, other prompts ↑")
    ax.set_ylabel("concept rate on target prompts ↓")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------------ driver
def evaluate_lambda_runs(cfg: DictConfig) -> bool:
    """``lambda_evaluate``: true/false, or null = only where the model has no probe of its own (the toy world's
    detector probe already measures every run's concept rate and SSIM to the base model)."""
    if cfg.get("lambda_evaluate") is not None:
        return bool(cfg.lambda_evaluate)
    from hydra import compose, initialize_config_dir

    from .prompts import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        model = compose(config_name="train", overrides=[f"model={cfg.model}"]).model
    return not model.get("probe")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def _seed_table(container: dict) -> float:
    """One seed's Table 1 in a worker process; returns its wall time in seconds."""
    from erasure.cli import setup_logging

    setup_logging()
    return table1(OmegaConf.create(container))["meta"]["total_s"]


def evaluate_seeds(seed_cfgs: dict[int, DictConfig], jobs: int) -> dict[int, float]:
    """Each seed's Table 1 ({seed: seconds}); with ``jobs`` > 1, that many seeds at once in worker processes.

    The seeds share the base model's images (the image cache), so the first seed's base model is evaluated here
    first: the workers then find its images made, instead of generating them side by side."""
    workers = min(jobs, len(seed_cfgs))
    if workers <= 1:
        return {s: table1(c)["meta"]["total_s"] for s, c in seed_cfgs.items()}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    first = next(iter(seed_cfgs.values()))
    out = resolve_path(first.out)
    evaluate_system(system_cfg(first, "base", out / "runs" / first.methods[0], out / "base"))
    log.info("evaluating seeds %s, %d at a time", ", ".join(map(str, seed_cfgs)), workers)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        totals = pool.map(_seed_table, [OmegaConf.to_container(c, resolve=False) for c in seed_cfgs.values()])
        return dict(zip(seed_cfgs, totals))


def results(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    out = resolve_path(cfg.out)
    methods = chosen_methods(cfg)
    seeds = [int(s) for s in cfg.seeds]
    if not seeds:
        raise UserError("seeds is empty: give at least one training seed, e.g. seeds=[0,1,2]")
    seed_cfgs = {s: seed_cfg(cfg, s, out) for s in seeds}
    for c in seed_cfgs.values():
        c.methods = methods
    jobs = [j for s, c in seed_cfgs.items() for j in method_jobs(methods, c, resolve_path(c.out), tag=f" seed={s}")]
    if cfg.lambdas:
        jobs += lambda_jobs(cfg, out)
    base = functools.cache(lambda: base_fingerprint(cfg))
    t0 = time.perf_counter()
    train_times, failed = run_training(jobs, max(1, int(cfg.jobs or 1)), bool(cfg.reuse), base)
    timings = {"training_s": round(time.perf_counter() - t0, 1)}
    per_seed = {}
    t0 = time.perf_counter()
    ready = {}
    for s, c in seed_cfgs.items():
        c.methods = [m for m in methods if f"{m} seed={s}" not in failed]
        if c.methods:
            ready[s] = c
        else:
            log.error("seed %d: no method trained, no table", s)
    for s, total in evaluate_seeds(ready, max(1, int(cfg.jobs or 1))).items():
        root = resolve_path(ready[s].out)
        folders = [root / "base", *[root / "runs" / m for m in ready[s].methods], root / "reference"]
        per_seed[s] = load_records([f for f in folders if (f / "eval.json").is_file()])
        timings[f"eval_seed{s}_s"] = total
    timings["evaluation_s"] = round(time.perf_counter() - t0, 1)
    title = f"Toy Table 1 over {len(seeds)} seeds: model={cfg.model}, concept={cfg.concept}, suite={cfg.suite.name}"
    table = aggregate_table(per_seed)
    write_text_atomic(out / "table1.md", table_markdown(table, title))
    write_text_atomic(out / "table1.csv", table_csv(table))
    write_text_atomic(out / "table1.json", json.dumps(table, indent=2) + "\n")
    sweep = None
    if cfg.lambdas and sweep_mod.find_runs(out / "lambda"):
        if evaluate_lambda_runs(cfg):  # models without a probe (SD v1.4): the suite measures every λ run
            t0 = time.perf_counter()
            for run in sweep_mod.find_runs(out / "lambda"):
                evaluate_system(system_cfg(cfg, "run", run, run))
            timings["lambda_evaluation_s"] = round(time.perf_counter() - t0, 1)
        sweep = sweep_mod.summarise(out / "lambda")
        sweep_mod.write_summary(out / "lambda", sweep, x="lambda")
    rows = frontier({s: resolve_path(c.out) / "runs" for s, c in seed_cfgs.items()}, methods)
    write_text_atomic(out / "frontier.csv", frontier_csv(rows))
    write_text_atomic(out / "frontier.json", json.dumps(rows, indent=2) + "\n")
    png = plot_frontier(rows, out / "frontier.png", f"Erasure vs preservation along training ({cfg.model}, "
                        f"concept {cfg.concept}; {len(seeds)} seeds)")
    timings["total_s"] = round(time.perf_counter() - start, 1)
    meta = dict(command="python -m eval.results " + " ".join(sys.argv[1:]), date=datetime.datetime.now().isoformat(timespec="seconds"),
                machine=machine(), torch_threads=os.environ.get("OMP_NUM_THREADS"), seeds=seeds, methods=methods,
                lambdas=list(cfg.lambdas), timings=timings, train_times=train_times, failed=failed)
    write_text_atomic(out / "results_meta.json", json.dumps(meta, indent=2) + "\n")
    md = [f"# Results: {cfg.model}, concept {cfg.concept}", "",
          f"Made by `{meta['command']}` on {meta['date']} ({meta['machine']}); {timings['total_s']:.0f} s this time "
          f"(training {timings['training_s']:.0f} s, evaluation {timings['evaluation_s']:.0f} s; reused runs cost nothing).",
          "", "## Table 1 over seeds", "", table_markdown(table, title)]
    if sweep:
        md += ["## λ sweep of " + str(cfg.lambda_method), "", sweep_mod.to_markdown(sweep), "![λ sweep](lambda/sweep.png)", ""]
    md += ["## Erasure-vs-preservation frontier (each run's erasure curve)", "", frontier_markdown(rows)]
    if png:
        md += ["", "![frontier](frontier.png)"]
    if failed:
        md += ["", "Missing (training failed): " + "; ".join(failed.values())]
    write_text_atomic(out / "results.md", "\n".join(md) + "\n")
    print("\n".join(md))
    log.info("results done in %.0f s -> %s/results.md", timings["total_s"], out)
    return dict(table=table, sweep=sweep, frontier=rows, meta=meta)


@exit_on_user_error
def main(argv: list[str]) -> dict:
    return cli(argv, "results", results)


if __name__ == "__main__":
    main(sys.argv[1:])
