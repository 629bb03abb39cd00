"""What runs beside the training loop: previews, the erasure curve, checkpoints and the model's probe.

A callback is a class with three hooks; :func:`erasure.trainer.train` calls them and knows nothing else about
what they do. Each registers itself with :func:`callback` and builds itself from the config in ``create`` (or
returns None when the config switches it off). Time spent in ``on_step`` is not counted as training time.

    on_start(run)                before the first step of this process (a resumed run: before its next step)
    on_step(run, step, record)   after optimizer step ``step`` (``record``: its loss terms and learning rate)
    on_end(run, summary)         after the delta is saved; may add numbers to ``summary.json``
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from . import registry
from .checkpoint import save_checkpoint
from .generation import default_sampler, generate
from .images import grid, save_png
from .io import to_json, write_text_atomic

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    """What a callback may look at: the config, the run folder, the models, the session and the logger."""

    cfg: DictConfig
    run_dir: Path
    models: object
    session: object  # erasure.session.Session
    logger: object
    start_step: int  # 1, or the step after a resumed checkpoint's
    iterations: int
    train_time_s: float | None = 0.0  # training seconds up to the end of the current step, a resumed checkpoint's
    # included (None: continued from a checkpoint that did not keep its time)

    def params(self) -> dict[str, torch.Tensor]:
        """The weights that make the erased model now (as saved in the delta)."""
        return self.session.method.export_params()


class Callback:
    @classmethod
    def create(cls, run: Run) -> "Callback | None":
        return cls()

    def on_start(self, run: Run) -> None:
        pass

    def on_step(self, run: Run, step: int, record: dict) -> None:
        pass

    def on_end(self, run: Run, summary: dict) -> None:
        pass


CALLBACKS: list[type[Callback]] = []


def callback(cls: type[Callback]) -> type[Callback]:
    """Class decorator: add a callback to every run, in registration order."""
    CALLBACKS.append(cls)
    return cls


def create_callbacks(run: Run) -> list[Callback]:
    return [cb for cls in CALLBACKS if (cb := cls.create(run)) is not None]


def drop_after(path: Path, start_step: int) -> None:
    """Keep the JSON lines of ``path`` whose step a resumed checkpoint covers (``step < start_step``)."""
    if path.is_file():
        kept, torn = [], 0
        for line in path.read_text().splitlines():
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):  # a line cut by a kill mid-write: the step is redone anyway
                torn += 1
                continue
            if step < start_step:
                kept.append(line)
        if torn:
            log.warning("dropped %d torn line(s) of %s (a kill mid-write); the steps after the checkpoint are redone",
                        torn, path)
        write_text_atomic(path, "".join(line + "\n" for line in kept))


@callback
class Previews(Callback):
    """Fixed prompts x seeds sampled every ``trainer.preview_every`` iterations and at the end: the run's iteration
    timeline (the paper's Fig. 2, 11-14), as ``samples/step_*.png`` and ``timeline.png``."""

    def __init__(self, run: Run, every: int):
        cfg = run.cfg
        self.every = every
        self.prompts = list(cfg.concept.get("preview_prompts") or cfg.concept.targets)
        self.seeds = list(cfg.trainer.preview_seeds)
        self.sampler = default_sampler(run.models, cfg.model)  # the model's own sampler, as evaluation's default
        self.labels = [f"{p[:24]} #{s}" for p in self.prompts for s in self.seeds]
        self.columns: list[tuple[int, list]] = []

    @classmethod
    def create(cls, run: Run):
        every = int(run.cfg.trainer.preview_every or 0)
        return cls(run, every) if every else None

    def draw(self, run: Run, step: int) -> None:
        from PIL import Image

        prompts = [p for p in self.prompts for _ in self.seeds]
        seeds = [s for _ in self.prompts for s in self.seeds]
        with run.session.autocast():
            images = [Image.fromarray(a) for a in generate(run.models, prompts, self.sampler, seeds=seeds,
                                                           params=run.params())]
        self.columns.append((step, images))
        path = save_png(grid([[im] for im in images], row_labels=self.labels, col_labels=[f"it {step}"]),
                        run.run_dir / "samples" / f"step_{step:06d}.png")
        run.logger.log_image("preview", path, step)

    def on_start(self, run: Run) -> None:
        if run.start_step == 1:
            self.draw(run, 0)

    def on_step(self, run: Run, step: int, record: dict) -> None:
        if step % self.every == 0 or step == run.iterations:
            self.draw(run, step)

    def on_end(self, run: Run, summary: dict) -> None:
        if not self.columns:
            return
        rows = [[col[1][i] for col in self.columns] for i in range(len(self.columns[0][1]))]
        path = save_png(grid(rows, row_labels=self.labels, col_labels=[f"it {s}" for s, _ in self.columns]),
                        run.run_dir / "timeline.png")
        run.logger.log_image("timeline", path, run.iterations, caption="rows: preview prompts; columns: iterations")
        log.info("timeline: %s", path)


def model_probe(run: Run):
    """The probe the model tier names (``model.probe``, a registered name), built for this run, or None."""
    name = run.cfg.model.get("probe")
    return registry.get_probe(str(name))(run.models, run.cfg) if name else None


@callback
class ProbeCurve(Callback):
    """The model's probe at ``trainer.probe_points`` evenly spaced iterations (and iteration 0), appended to
    ``probe.jsonl`` and logged as ``probe/<name>``: the erasure curve of the paper's Fig. 4.

    A closed-form method with ``strength_keys`` (:class:`erasure.method.ClosedFormMethod`) has one step; its curve is
    over edit strength instead: after the edit, the probe at fractions 1/P, ..., 1 of the configured strength, each
    point recorded with ``edit_strength`` (the fraction) and the step, 1."""

    def __init__(self, run: Run, probe, points: int):
        self.probe = probe
        self.steps = {max(1, round(run.iterations * k / points)) for k in range(1, points + 1)}
        method = run.session.method
        self.strengths = [k / points for k in range(1, points + 1)] \
            if method.shape == "closed_form" and getattr(method, "strength_keys", ()) else None
        self.seeds = int(run.cfg.trainer.probe_seeds)
        self.path = run.run_dir / "probe.jsonl"

    @classmethod
    def create(cls, run: Run):
        points = int(run.cfg.trainer.probe_points or 0)
        if points <= 0:
            return None
        probe = model_probe(run)
        if probe is None:
            log.warning("trainer.probe_points=%d is ignored: model '%s' has no probe", points, run.cfg.model.name)
            return None
        return cls(run, probe, points)

    def point(self, run: Run, step: int, params, strength: float | None = None) -> None:
        with run.session.autocast():
            point = self.probe.point(params, self.seeds, base_params=run.session.teacher.base_params)
        where = {"step": step} if strength is None else {"step": step, "edit_strength": strength}
        with open(self.path, "a") as f:
            f.write(to_json({**where, **point}) + "\n")
        if strength is None or strength == 1:  # one logged point per step
            run.logger.log({f"probe/{k}": v for k, v in point.items()}, step)
        log.info("probe at iteration %d%s: %s", step, "" if strength is None else f", edit strength {strength:g}",
                 ", ".join(f"{k} {v:.3f}" for k, v in point.items()))

    def on_start(self, run: Run) -> None:
        if run.start_step == 1:
            self.path.unlink(missing_ok=True)
            self.point(run, 0, run.session.teacher.base_params)
        else:  # resumed: drop curve points written after the checkpoint
            drop_after(self.path, run.start_step)

    def on_step(self, run: Run, step: int, record: dict) -> None:
        if self.strengths is not None:  # a closed-form edit: the curve over its strength
            edited = run.params()
            for fraction in self.strengths:
                with torch.no_grad():
                    params = edited if fraction == 1 else {**edited, **run.session.method.closed_form_at(fraction)}
                self.point(run, step, params, fraction)
        elif step in self.steps:
            self.point(run, step, run.params())


@callback
class Checkpoints(Callback):
    """A checkpoint every ``trainer.checkpoint_every`` iterations (``trainer.keep_checkpoints`` kept): a killed run
    continues bit for bit with ``resume=<run folder>``."""

    def __init__(self, every: int, keep: int):
        self.every, self.keep = every, keep

    @classmethod
    def create(cls, run: Run):
        every = int(run.cfg.trainer.checkpoint_every or 0)
        return cls(every, int(run.cfg.trainer.keep_checkpoints)) if every else None

    def on_step(self, run: Run, step: int, record: dict) -> None:
        if step % self.every == 0 and step < run.iterations:
            # the time so far travels with the state, so a resumed run's summary counts every step's training time
            save_checkpoint(run.run_dir, step, {**run.session.state(step), "train_time_s": run.train_time_s}, self.keep)


@callback
class FinalProbe(Callback):
    """The model's probe after training (e.g. the toy world's detector rates before and after erasure); its
    numbers join ``summary.json``."""

    def __init__(self, probe):
        self.probe = probe

    @classmethod
    def create(cls, run: Run):
        probe = model_probe(run)
        return cls(probe) if probe is not None else None

    def on_end(self, run: Run, summary: dict) -> None:
        with run.session.autocast():
            summary.update(self.probe.summary(run.session.teacher.base_params, run.params()))
