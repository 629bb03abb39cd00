"""Every figure, with titles and axis labels from the metric registry (:func:`eval.metrics.heading`).

- :func:`sweep`: the sweep's erasure and preservation numbers against the swept key, one line per other setting, seeds
  as error bars (the paper's Fig. 6/9 for λ);
- :func:`frontier`: concept rate against SSIM to the base model along each method's training;
- :func:`timelines` (Fig. 2, 5, 11-14) and :func:`erasure_curve` (Fig. 4) from run folders, and :func:`figures`, the
  paper's figures from ``make table1`` / ``make sweep`` (``python -m eval.figures``).

A figure whose inputs are missing is skipped with a line saying what would make it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from erasure.errors import UserError

from .metrics import heading

log = logging.getLogger(__name__)
# the sweep plot's panels: the first erasure number present, the first preservation number present, shape accuracy
ERASURE = ("concept_rate_after", "eval.concept_rate", "eval.nudenet")
PRESERVATION = ("ssim_preserved", "eval.ssim")
ACCURACY = ("preserved_accuracy_after",)


def panels(data: dict) -> list[str]:
    present = data["metrics"]
    return [*[m for m in ERASURE if m in present][:1], *[m for m in PRESERVATION if m in present][:1],
            *[m for m in ACCURACY if m in present]]


def choose_x(data: dict, x: str | None) -> str | None:
    if x:
        if x not in data["varied"]:
            raise UserError(f"x={x} is not a key this sweep varied: choose one of {', '.join(data['varied']) or '(none)'}")
        return x
    numeric = [k for k in data["varied"] if all(isinstance(r["setting"][k], (int, float)) for r in data["rows"])]
    return "lambda" if "lambda" in numeric else (numeric[0] if numeric else None)


def sweep(data: dict, path: Path, x: str | None = None) -> Path | None:
    """Erasure and preservation against the swept key ``x``, one line per other setting, seeds as error bars."""
    x = choose_x(data, x)
    if x is None:
        log.info("no numeric swept key: no plot")
        return None
    keys = panels(data)
    if not keys:
        log.info("no erasure or SSIM numbers in the runs: no plot")
        return None
    from erasure.images import pyplot, save_figure

    plt = pyplot()
    others = [k for k in data["varied"] if k != x]
    lines: dict[tuple, list[dict]] = {}
    for row in data["rows"]:
        lines.setdefault(tuple(row["setting"][k] for k in others), []).append(row)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, m in zip(axes[0], keys):
        for key, rows in lines.items():
            rows = sorted((r for r in rows if m in r), key=lambda r: r["setting"][x])
            label = ", ".join(f"{k}={v}" for k, v in zip(others, key)) or None
            ax.errorbar([r["setting"][x] for r in rows], [r[m] for r in rows], yerr=[r[m + "_std"] for r in rows],
                        marker="o", capsize=3, label=label)
        ax.set_xlabel(x)
        ax.set_title(heading(m))
        ax.grid(alpha=0.3)
    if others:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def frontier(rows: list[dict], path: Path, title: str) -> Path | None:
    """Concept rate (y) against SSIM to the base model (x) along each method's training, seeds as error bars in both
    directions. Iteration 0 (the base model, shared) is drawn once."""
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
        label = f"s={last['edit_strength']:g}" if "edit_strength" in last else f"{last['step']}"  # closed form: strength
        ax.annotate(label, (last["ssim_preserved"], last["concept_rate"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7, color=line[0].get_color())
    if base:
        ax.plot([base["ssim_preserved"]], [base["concept_rate"]], marker="*", ms=12, color="k", ls="", label="base model")
    ax.set_xlabel(heading("ssim_preserved"))
    ax.set_ylabel(heading("concept_rate"))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def robustness(rows: list[dict], attacks: list[str], path: Path, title: str) -> Path | None:
    """Post-attack success rate (y) against SSIM to the base model (x), one panel per attack (no attack first), one
    marker per method, seeds as error bars; the base model as a star at the right edge."""
    import numpy as np

    runs = [r for r in rows if r["kind"] == "run" and "ssim_preserved" in r["values"]]
    if not runs:
        log.info("robustness plot: no run has the probe's SSIM (train on a model with a probe)")
        return None
    from erasure.images import pyplot, save_figure

    plt = pyplot()
    keys = ["asr_pre", *[f"asr_post@{a}" for a in attacks if a != "no_attack"]]
    keys = [k for k in keys if any(k in r["values"] for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.3 * len(keys), 3.4), squeeze=False, sharey=True)
    base = next((r for r in rows if r["kind"] == "base"), None)
    for ax, k in zip(axes[0], keys):
        for i, r in enumerate(runs):
            if k not in r["values"]:
                continue
            x, y = np.asarray(r["values"]["ssim_preserved"]), np.asarray(r["values"][k])
            ax.errorbar([x.mean()], [y.mean()], xerr=[x.std()], yerr=[y.std()], marker="os^Dv<>p"[i % 8], capsize=3,
                        ls="", label=r["system"])
        if base and k in base["values"]:
            ax.plot([1.0], [base["values"][k][0]], marker="*", ms=12, color="k", ls="", label=base["system"])
        ax.set_title(heading(k), fontsize=9)
        ax.set_xlabel(heading("ssim_preserved"), fontsize=8)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("attack success rate ↓")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def method_runs(runs: Path) -> dict[str, Path]:
    """Finished run folders below ``runs`` (summary.json), keyed by their method (summary's ``method``)."""
    out = {}
    for summary in sorted(runs.glob("*/summary.json")):
        out[json.loads(summary.read_text()).get("method", summary.parent.name)] = summary.parent
    return out


def timelines(runs: dict[str, Path], path: Path) -> Path | None:
    """Each method's iteration timeline (its run's timeline.png), stacked under the method's name."""
    from PIL import Image, ImageDraw

    from erasure.images import save_png

    items = [(name, Image.open(run / "timeline.png").convert("RGB")) for name, run in runs.items()
             if (run / "timeline.png").is_file()]
    if not items:
        log.info("timelines: no run has timeline.png (train with trainer.preview_every > 0)")
        return None
    pad, head = 6, 16
    canvas = Image.new("RGB", (max(im.width for _, im in items), sum(im.height + head + pad for _, im in items)), "white")
    draw, y = ImageDraw.Draw(canvas), 0
    for name, im in items:
        draw.text((4, y + 2), name, fill="black")
        canvas.paste(im, (0, y + head))
        y += im.height + head + pad
    return save_png(canvas, path)


def erasure_curve(runs: dict[str, Path], path: Path) -> Path | None:
    """The probe's numbers over iterations (each run's probe.jsonl), one line per method."""
    curves = {name: [json.loads(line) for line in (run / "probe.jsonl").read_text().splitlines() if line.strip()]
              for name, run in runs.items() if (run / "probe.jsonl").is_file()}
    if not curves:
        log.info("erasure curve: no run has probe.jsonl (train with trainer.probe_points=<n> on a model with a probe)")
        return None
    from erasure.images import pyplot, save_figure

    plt = pyplot()
    keys = [k for k in ("concept_rate", "preserved_accuracy", "preserved_color_accuracy")
            if any(k in p for c in curves.values() for p in c)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, points in curves.items():
            ax.plot([p["step"] for p in points if key in p], [p[key] for p in points if key in p], marker="o", label=name)
        ax.set_xscale("symlog", linthresh=10)  # methods run from 35 (FMN) to 1,500 (SDD) iterations
        ax.set_xlabel("iteration")
        ax.set_title(heading(key))
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def figures(runs_dir: Path, sweep_dir: Path | None, out: Path) -> dict[str, str]:
    """timelines.png and erasure_curve.png from the method runs in ``runs_dir``, lambda.png from a sweep folder."""
    from .tables import find_runs, sweep as sweep_data

    out.mkdir(parents=True, exist_ok=True)
    runs = method_runs(runs_dir) if runs_dir.is_dir() else {}
    if not runs:
        log.info("no finished runs in %s (make table1 trains them)", runs_dir)
    made = {"timelines": timelines(runs, out / "timelines.png"), "erasure_curve": erasure_curve(runs, out / "erasure_curve.png")}
    if sweep_dir is None or not sweep_dir.is_dir():
        log.info("lambda plot: no sweep folder (make sweep, or sweep=<multirun folder>)")
    else:
        data = sweep_data(sweep_dir, find_runs(sweep_dir))
        if "lambda" in data["varied"]:
            made["lambda"] = sweep(data, out / "lambda.png", "lambda")
        else:
            log.info("lambda plot: the sweep in %s does not vary lambda", sweep_dir)
    made = {k: str(v) for k, v in made.items() if v is not None}
    if not made:
        raise UserError(f"no figure could be made from runs={runs_dir} sweep={sweep_dir}: run make table1 and make sweep first")
    for k, v in made.items():
        log.info("%s -> %s", k, v)
    return made
