"""Summarise a sweep: ``python -m eval.sweep <multirun folder> [evaluate=true] [wandb=true] [x=lambda] [eval overrides]``.

After ``python -m erasure.train -m lambda=0,0.5,1,1.5,5 trainer.seed=0,1,2`` this reads every finished run below
the folder (``config.yaml`` + ``summary.json`` [+ ``eval.json``]), finds the config keys the sweep varied,
averages the replicate axis (``trainer.seed``) and writes into the folder:

* ``sweep.csv`` / ``sweep.md`` / ``sweep.json``: one row per setting, mean and std over seeds of every number the
  runs report: the toy world's probe (``concept_rate_after``, ``preserved_accuracy_after``, ``ssim_preserved``,
  ...), the evaluation suite's metrics when ``eval.json`` exists (``evaluate=true`` makes it first, through
  :mod:`eval.run`, cached), and the training time;
* ``sweep.png``: concept rate and SSIM to the base model against the swept key (the paper's Fig. 6/9 for λ),
  seeds as error bars, one line per other varied setting (e.g. per method).

``wandb=true`` also logs the table (a W&B Table) and the plot (an image and a line chart) to one W&B run in the
sweep's group (offline without an API key).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
from pathlib import Path

from omegaconf import OmegaConf

from erasure.errors import UserError

log = logging.getLogger(__name__)

REPLICATE_KEYS = ("trainer.seed",)
IGNORED_PREFIXES = ("hydra", "resume", "logger", "method.lam")  # method.lam mirrors the top-level lambda
# (metric, label, higher is better) in the order the table and the plot show them
PREFERRED = [
    ("concept_rate_after", "concept rate", False),
    ("eval.concept_rate", "concept rate (eval)", False),
    ("eval.nudenet", "NudeNet", False),
    ("ssim_preserved", "SSIM preserved", True),
    ("eval.ssim", "SSIM (eval)", True),
    ("preserved_accuracy_after", "preserved shape acc.", True),
    ("preserved_color_accuracy_after", "preserved colour acc.", True),
    ("ssim_target", "SSIM target", True),
    ("eval.fid", "FID", False),
    ("eval.kid", "KID", False),
    ("eval.clip", "CLIP", True),
    ("train_time_s", "train time (s)", False),
]


def find_runs(folder: Path) -> list[Path]:
    """Run folders below ``folder`` (any depth up to 4) that hold config.yaml and summary.json."""
    runs = sorted({p.parent for depth in range(0, 5) for p in folder.glob("/".join(["*"] * depth + ["summary.json"]))
                   if (p.parent / "config.yaml").is_file()})
    unfinished = sorted({p.parent for p in folder.rglob("config.yaml") if p.parent.name != ".hydra"} - set(runs))
    if unfinished:
        log.warning("%d run folder(s) without summary.json (unfinished) are left out, e.g. %s", len(unfinished),
                    unfinished[0])
    return runs


def flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif not isinstance(v, list):
            out[key] = v
    return out


def varied_keys(configs: list[dict]) -> list[str]:
    """Config keys whose value differs between runs (one key per group of keys that always vary together)."""
    keys = sorted({k for c in configs for k in c})
    varied = [k for k in keys if not k.startswith(IGNORED_PREFIXES) and len({json.dumps(c.get(k)) for c in configs}) > 1]
    kept, seen = [], {}
    for k in sorted(varied, key=lambda k: (k.count("."), len(k))):  # prefer top-level, short names (lambda, method.name)
        sig = tuple(json.dumps(c.get(k)) for c in configs)
        if sig not in seen and tuple(reversed(sig)) not in seen:
            seen[sig] = k
            kept.append(k)
    return kept


def run_numbers(run: Path) -> dict:
    """The numbers a run reports: summary.json's top-level numbers, and eval.json's metrics as ``eval.<name>``."""
    summary = json.loads((run / "summary.json").read_text())
    out = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if (run / "eval.json").is_file():
        ev = json.loads((run / "eval.json").read_text())
        out.update({f"eval.{k}": float(v) for k, v in ev.get("metrics", {}).items() if isinstance(v, (int, float))})
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    m = sum(values) / len(values)
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0)


def summarise(folder: Path, evaluate: bool = False, eval_overrides: list[str] | None = None) -> dict:
    runs = find_runs(folder)
    if not runs:
        raise UserError(f"no finished runs (config.yaml + summary.json) below '{folder}': pass the folder of a "
                        "multirun (outputs/multirun/<date>/<time>)")
    if evaluate:
        from .run import compose_eval_cfg, evaluate_system

        for run in runs:
            evaluate_system(compose_eval_cfg([f"run={run}", *(eval_overrides or [])]))
    configs = [flatten(OmegaConf.to_container(OmegaConf.load(r / "config.yaml"), resolve=False)) for r in runs]
    keys = varied_keys(configs)
    settings = [k for k in keys if k not in REPLICATE_KEYS]
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(tuple(c.get(k) for k in settings), []).append(i)
    numbers = [run_numbers(r) for r in runs]
    metric_names = [m for m, _, _ in PREFERRED if any(m in n for n in numbers)]
    rows = []
    for values, idx in sorted(groups.items(), key=lambda kv: tuple(str(v) if not isinstance(v, (int, float)) else
                                                                      f"{v:020.6f}" for v in kv[0])):
        row = {"setting": dict(zip(settings, values)), "runs": [str(runs[i]) for i in idx], "n": len(idx),
               "seeds": sorted({configs[i].get("trainer.seed") for i in idx}, key=str)}
        for m in metric_names:
            vals = [numbers[i][m] for i in idx if m in numbers[i]]
            if vals:
                row[m], row[f"{m}_std"] = mean_std(vals)
        rows.append(row)
    return {"folder": str(folder), "varied": settings, "replicates": [k for k in keys if k in REPLICATE_KEYS],
            "metrics": metric_names, "rows": rows}


def _label(metric: str) -> str:
    return next((lab for m, lab, _ in PREFERRED if m == metric), metric)


def _arrow(metric: str) -> str:
    hib = next((h for m, _, h in PREFERRED if m == metric), None)
    return "" if hib is None else (" ↑" if hib else " ↓")


def to_markdown(result: dict) -> str:
    head = [*result["varied"], "seeds", *[_label(m) + _arrow(m) for m in result["metrics"]]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        cells = [str(row["setting"][k]) for k in result["varied"]] + [str(row["n"])]
        for m in result["metrics"]:
            cells.append("–" if m not in row else (f"{row[m]:.3f} ± {row[m + '_std']:.3f}" if row["n"] > 1
                                                   else f"{row[m]:.3f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def columns(result: dict) -> list[str]:
    """The flat table's header: the varied keys, the number of seeds, then each metric's mean and std."""
    return [*result["varied"], "n", *[c for m in result["metrics"] for c in (m, m + "_std")]]


def cells(result: dict, row: dict, missing=None) -> list:
    """One row of the flat table, in the order of :func:`columns`."""
    return [row["setting"][k] for k in result["varied"]] + [row["n"]] + \
        [row.get(c, missing) for m in result["metrics"] for c in (m, m + "_std")]


def to_csv(result: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns(result))
    for row in result["rows"]:
        w.writerow(cells(result, row, missing=""))
    return buf.getvalue()


def choose_x(result: dict, x: str | None) -> str | None:
    if x:
        if x not in result["varied"]:
            raise UserError(f"x={x} is not a key this sweep varied: choose one of {', '.join(result['varied']) or '(none)'}")
        return x
    numeric = [k for k in result["varied"] if all(isinstance(r["setting"][k], (int, float)) for r in result["rows"])]
    return "lambda" if "lambda" in numeric else (numeric[0] if numeric else None)


def plot(result: dict, path: Path, x: str | None = None) -> Path | None:
    """Concept rate and SSIM against the swept key, one line per other setting, seeds as error bars."""
    x = choose_x(result, x)
    if x is None:
        log.info("no numeric swept key: no plot")
        return None
    from erasure.images import pyplot, save_figure

    plt = pyplot()
    panels = [m for m in ("concept_rate_after", "eval.concept_rate", "eval.nudenet") if m in result["metrics"]][:1]
    panels += [m for m in ("ssim_preserved", "eval.ssim") if m in result["metrics"]][:1]
    panels += [m for m in ("preserved_accuracy_after",) if m in result["metrics"]]
    if not panels:
        log.info("no erasure or SSIM numbers in the runs: no plot")
        return None
    others = [k for k in result["varied"] if k != x]
    lines: dict[tuple, list[dict]] = {}
    for row in result["rows"]:
        lines.setdefault(tuple(row["setting"][k] for k in others), []).append(row)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, m in zip(axes[0], panels):
        for key, rows in lines.items():
            rows = sorted(rows, key=lambda r: r["setting"][x])
            xs = [r["setting"][x] for r in rows if m in r]
            ys = [r[m] for r in rows if m in r]
            es = [r[m + "_std"] for r in rows if m in r]
            label = ", ".join(f"{k}={v}" for k, v in zip(others, key)) or None
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
        ax.set_xlabel(x)
        ax.set_title(_label(m) + _arrow(m))
        ax.grid(alpha=0.3)
    if others:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def log_wandb(result: dict, folder: Path, png: Path | None) -> None:
    """The sweep table (W&B Table), the plot (image) and concept rate vs the swept key (line chart)."""
    import wandb

    from erasure.loggers import sweep_group, wandb_mode

    first = OmegaConf.load(Path(result["rows"][0]["runs"][0]) / "config.yaml")
    lg = first.get("logger") or {}
    run = wandb.init(project=lg.get("project", "concept-erasure"), entity=lg.get("entity"), job_type="sweep-summary",
                     group=sweep_group(folder), name=f"sweep {folder}", mode=wandb_mode(lg.get("mode"), folder),
                     dir=str(folder), reinit="finish_previous")
    table = wandb.Table(columns=columns(result), data=[cells(result, r) for r in result["rows"]])
    logged = {"sweep/table": table}
    x = choose_x(result, None)
    m = next((m for m in ("concept_rate_after", "eval.concept_rate", "eval.nudenet") if m in result["metrics"]), None)
    if x and m:
        logged["sweep/concept_rate_vs_" + x.replace(".", "_")] = wandb.plot.line(table, x, m, title=f"{_label(m)} vs {x}")
    if png is not None:
        logged["sweep/plot"] = wandb.Image(str(png))
    run.log(logged)
    run.finish()


def write_summary(folder: Path, result: dict, x: str | None = None) -> tuple[str, Path | None]:
    """sweep.{json,csv,md} and sweep.png into ``folder``; returns the markdown and the plot's path."""
    from erasure.io import write_text_atomic

    write_text_atomic(folder / "sweep.json", json.dumps(result, indent=2, default=str) + "\n")
    write_text_atomic(folder / "sweep.csv", to_csv(result))
    md = to_markdown(result)
    write_text_atomic(folder / "sweep.md", md)
    return md, plot(result, folder / "sweep.png", x)


def main(argv: list[str]) -> dict:
    from erasure.cli import setup_logging
    from erasure.errors import exit_on_user_error

    @exit_on_user_error
    def body():
        setup_logging()
        positional = [a for a in argv if "=" not in a]
        options = dict(a.split("=", 1) for a in argv if "=" in a)
        if len(positional) != 1:
            raise UserError("usage: python -m eval.sweep <multirun folder> [evaluate=true] [wandb=true] [x=<key>] "
                            "[evaluation overrides, e.g. suite=toyworld]")
        folder = Path(positional[0])
        if not folder.is_dir():
            raise UserError(f"sweep folder '{folder}' does not exist")
        flag = lambda k: str(options.pop(k, "false")).lower() in ("1", "true", "yes")  # noqa: E731
        evaluate, use_wandb, x = flag("evaluate"), flag("wandb"), options.pop("x", None)
        result = summarise(folder, evaluate, [f"{k}={v}" for k, v in options.items()])
        md, png = write_summary(folder, result, x)
        if use_wandb:
            log_wandb(result, folder, png)
        print(md, end="", flush=True)
        log.info("%d settings from %d runs (varied: %s) -> %s/sweep.{md,csv,json}%s", len(result["rows"]),
                 sum(r["n"] for r in result["rows"]), ", ".join(result["varied"]) or "nothing", folder,
                 ", sweep.png" if png else "")
        return result

    return body()


if __name__ == "__main__":
    main(sys.argv[1:])
