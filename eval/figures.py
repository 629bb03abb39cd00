"""The paper's figures from finished runs: ``python -m eval.figures [runs=outputs/table1/runs] [sweep=<folder>] [out=outputs/figures]``.

* ``timelines.png`` (Fig. 2, 5, 11-14): each method's iteration timeline (its run's ``timeline.png``: preview prompts
  x seeds as rows, iterations as columns), stacked with the method's name.
* ``erasure_curve.png`` (Fig. 4): the probe's concept rate (and preserved accuracy) over iterations, one line per
  method, from each run's ``probe.jsonl`` (train with ``trainer.probe_points=<n>``; ``make table1`` does).
* ``lambda.png`` (Fig. 6, 9): concept rate and SSIM against λ from a sweep folder (``python -m eval.sweep``; ``make sweep``).

A figure whose inputs are missing is skipped with a line saying what would make it.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from erasure.errors import UserError

log = logging.getLogger(__name__)


def method_runs(runs: Path) -> dict[str, Path]:
    """Finished run folders below ``runs`` (summary.json), keyed by their method (summary's ``method``)."""
    out = {}
    for summary in sorted(runs.glob("*/summary.json")):
        out[json.loads(summary.read_text()).get("method", summary.parent.name)] = summary.parent
    return out


def timelines(runs: dict[str, Path], path: Path) -> Path | None:
    from erasure.images import save_png

    items = [(name, Image.open(run / "timeline.png").convert("RGB")) for name, run in runs.items()
             if (run / "timeline.png").is_file()]
    if not items:
        log.info("timelines: no run has timeline.png (train with trainer.preview_every > 0)")
        return None
    pad, head = 6, 16
    width = max(im.width for _, im in items)
    canvas = Image.new("RGB", (width, sum(im.height + head + pad for _, im in items)), "white")
    draw, y = ImageDraw.Draw(canvas), 0
    for name, im in items:
        draw.text((4, y + 2), name, fill="black")
        canvas.paste(im, (0, y + head))
        y += im.height + head + pad
    return save_png(canvas, path)


def erasure_curve(runs: dict[str, Path], path: Path) -> Path | None:
    curves = {}
    for name, run in runs.items():
        f = run / "probe.jsonl"
        if f.is_file():
            curves[name] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
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
            xs = [p["step"] for p in points if key in p]
            ax.plot(xs, [p[key] for p in points if key in p], marker="o", label=name)
        ax.set_xscale("symlog", linthresh=10)  # methods run from 35 (FMN) to 1,500 (SDD) iterations
        ax.set_xlabel("iteration")
        ax.set_title(key.replace("_", " ") + (" ↓" if key == "concept_rate" else " ↑"))
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def lambda_plot(sweep: Path | None, path: Path) -> Path | None:
    from .sweep import plot, summarise

    if sweep is None or not sweep.is_dir():
        log.info("lambda plot: no sweep folder (make sweep, or sweep=<multirun folder>)")
        return None
    result = summarise(sweep)
    if "lambda" not in result["varied"]:
        log.info("lambda plot: the sweep in %s does not vary lambda", sweep)
        return None
    return plot(result, path, "lambda")


def main(argv: list[str]) -> dict:
    from erasure.cli import setup_logging
    from erasure.errors import exit_on_user_error

    @exit_on_user_error
    def body():
        setup_logging()
        opts = dict(a.split("=", 1) for a in argv if "=" in a)
        unknown = set(opts) - {"runs", "sweep", "out"}
        if unknown or any("=" not in a for a in argv):
            raise UserError("usage: python -m eval.figures [runs=<folder of method runs>] [sweep=<multirun folder>] [out=<folder>]")
        runs_dir = Path(opts.get("runs", "outputs/table1/runs"))
        out = Path(opts.get("out", "outputs/figures"))
        out.mkdir(parents=True, exist_ok=True)
        runs = method_runs(runs_dir) if runs_dir.is_dir() else {}
        if not runs:
            log.info("no finished runs in %s (make table1 trains them)", runs_dir)
        made = {"timelines": timelines(runs, out / "timelines.png"),
                "erasure_curve": erasure_curve(runs, out / "erasure_curve.png"),
                "lambda": lambda_plot(Path(opts["sweep"]) if "sweep" in opts else None, out / "lambda.png")}
        made = {k: str(v) for k, v in made.items() if v is not None}
        if not made:
            raise UserError(f"no figure could be made from runs={runs_dir} sweep={opts.get('sweep')}: run make table1 "
                            "and make sweep first")
        for k, v in made.items():
            log.info("%s -> %s", k, v)
        return made

    return body()


if __name__ == "__main__":
    main(sys.argv[1:])
