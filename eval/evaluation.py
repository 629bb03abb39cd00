"""The evaluation of one system: its images (cached), the metrics of its suite, its ``eval.json``.

Systems: ``run`` (an erased model: the run's base model with its delta), ``base`` (the run's base model alone) and
``reference`` (the suite's real images: the paper's "COCO" row). The config (``conf/eval/run.yaml`` composed by
:func:`eval.config.compose`, or one system of an experiment) names the system, the run folder and the suite: the
prompt sets, the sampler and the metrics with their settings. Images come from the cache (:mod:`eval.cache`), so a
second evaluation generates nothing; :func:`evaluate` rewrites ``eval.json`` only when its inputs changed
(``force=true`` recomputes).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from erasure import schema
from erasure.errors import UserError
from erasure.io import to_json, write_text_atomic

from . import metrics as metric_registry
from .cache import (cache_folder, generate, group_by_size, inception_features, launch_state, load_images, make_sampler,
                    model_key, open_rgb, sha256_file)
from .prompts import load_prompt_set, resolve_path

log = logging.getLogger(__name__)
SYSTEMS = ("run", "base", "reference")


# the suite's numeric settings and their ranges (erasure/schema.py's rules): checked before any model loads
SUITE_RULES = {
    "sampler.steps": schema.or_null(schema.at_least(1)),
    "sampler.guidance": schema.or_null(schema.FINITE),
    "sampler.resolution": schema.RESOLUTION,
    "sampler.batch_size": schema.at_least(1),
    "metrics.kid.subset_size": schema.or_null(schema.at_least(2)),  # KID's unbiased MMD needs 2 images per subset
    "metrics.kid.subsets": schema.at_least(1),
}


def check_suite(suite) -> None:
    """Every numeric setting of the suite within its range, and every prompt set's ``n`` null or at least 1."""
    schema.check_keys(suite, SUITE_RULES, "suite")
    for name, spec in (suite.get("prompt_sets") or {}).items():
        schema.check_keys(spec, {"n": schema.or_null(schema.at_least(1))}, f"suite.prompt_sets.{name}")


class Evaluation:
    """One system under evaluation: its images (cached), the base model's, the reference images."""

    def __init__(self, cfg: DictConfig):
        system, run_dir = str(cfg.system), (Path(cfg.run) if cfg.get("run") else None)
        if system not in SYSTEMS:
            raise UserError(f"unknown system '{system}': choose one of {', '.join(SYSTEMS)}")
        if system != "reference" and run_dir is None:
            raise UserError(f"system={system} needs run=<run folder> (the base model is read from the run's config)")
        check_suite(cfg.suite)
        self.cfg = cfg
        self.suite = cfg.suite
        self.kind = system
        self.run_dir = run_dir
        self.run_cfg = OmegaConf.load(self.run_dir / "config.yaml") if self.run_dir else None
        summary = self.run_dir / "summary.json" if self.run_dir else None
        self.summary = json.loads(summary.read_text()) if summary and summary.is_file() else {}
        if system == "run" and not (self.run_dir / "delta.safetensors").is_file():
            raise UserError(f"run folder '{self.run_dir}' has no delta.safetensors: its training did not finish")
        self.cache_dir = resolve_path(cfg.cache_dir)
        self.memo: dict = {}
        self._models = None
        self._delta = None  # (delta tensors, base values of those parameters)
        self._rows: dict[str, list] = {}
        self.stats = {"generated": 0, "cached": 0}

    # ---------------------------------------------------------------- models and images
    @property
    def models(self):
        if self._models is None:
            from erasure.models import load_models

            launch_state()  # under a multi-GPU launch: each process on its own device before the models load
            self._models = load_models(self.run_cfg.model, str(self.cfg.device))
        return self._models

    @property
    def sampler(self):
        return make_sampler(self.models, self.run_cfg.model, self.suite.sampler)

    def rows(self, name: str):
        if name not in self._rows:
            sets = self.suite.prompt_sets
            if name not in sets:
                raise UserError(f"suite '{self.suite.name}' has no prompt set '{name}': choose one of {', '.join(sets)}")
            if self.suite.reference.get("build"):  # a prompt set may read the built reference's captions.csv
                from .reference import ensure_reference

                ensure_reference(self.suite.reference)
            self._rows[name] = load_prompt_set(sets[name], name)
        return self._rows[name]

    def model_key(self, base: bool) -> str:
        return model_key(self.models.fingerprint, None if base else self.run_dir / "delta.safetensors")

    def _paths(self, name: str, base: bool) -> list[Path]:
        if self.kind == "reference":
            raise UserError("the reference system has real images only, no generated ones")
        base = base or self.kind == "base"
        sampler = self.sampler
        folder = cache_folder(self.cache_dir, self.model_key(base), sampler)
        rows = self.rows(name)
        if base:
            result = generate(self.models, rows, folder, sampler, desc=f"base model: {name}")
        else:
            result = self._generate_erased(rows, folder, sampler, name)
        self.stats["generated"] += result["generated"]
        self.stats["cached"] += result["cached"]
        return result["paths"]

    def _generate_erased(self, rows, folder, sampler, name):
        from erasure.delta import load_delta

        if self._delta is None:  # checks the base and attaches the delta's adapter sets (the identity until swapped in);
            # the UNet keeps the base weights outside erased generation
            self._delta, _ = load_delta(self.models, self.run_dir / "delta.safetensors")
        return generate(self.models, rows, folder, sampler, desc=f"{self.label}: {name}", params=self._delta)

    def images(self, name: str):
        """uint8 N×H×W×3 images of this system for prompt set ``name``, and the rows."""
        return load_images(self._paths(name, base=False)), self.rows(name)

    def base_images(self, name: str):
        """The base model's images of the same prompts and seeds (shared by every run on this base)."""
        return load_images(self._paths(name, base=True)), self.rows(name)

    # --------------------------------------------------------------------- features
    def features(self, name: str) -> torch.Tensor:
        return inception_features(self._paths(name, base=False), self.cache_dir)

    def reference_features(self) -> torch.Tensor:
        from .reference import reference_files

        return inception_features(reference_files(self.suite.reference), self.cache_dir)

    def reference_images_and_captions(self):
        from .reference import reference_captions, reference_files

        files = reference_files(self.suite.reference)
        captions = reference_captions(self.suite.reference, files)
        sizes = group_by_size(files)
        if len(sizes) > 1:  # CLIP's processor resizes each image; a stack needs one size
            side = int(self.suite.reference.get("clip_side", 224))
            images = np.stack([np.asarray(open_rgb(p).resize((side, side))) for p in files])
        else:
            images = np.stack([np.asarray(open_rgb(p)) for p in files])
        return images, captions

    # ------------------------------------------------------------------------ results
    @property
    def label(self) -> str:
        if self.cfg.get("name"):
            return str(self.cfg.name)
        if self.kind == "base":
            return f"{self.run_cfg.model.name} (base)"
        if self.kind == "reference":
            return str(self.suite.reference.get("label", "reference"))
        return str(self.run_cfg.method.name)

    def eval_key(self) -> str:
        parts = {"suite": OmegaConf.to_container(self.suite, resolve=True), "system": self.kind}
        if self.kind == "run":
            parts["delta"] = sha256_file(self.run_dir / "delta.safetensors")
            parts["summary"] = self.summary.get("train_time_s")
        if self.kind != "reference":
            parts["model"] = OmegaConf.to_container(self.run_cfg.model, resolve=True)
            parts["fingerprint"] = self.models.fingerprint  # the weights, not just the config, name the model
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def evaluate(self) -> dict:
        start = time.perf_counter()
        results, extras = {}, {}
        specs = [metric_registry.get_metric(n) for n in self.suite.metrics]  # unknown names fail before any work
        probes = [s.name for s in specs if s.fn is None]
        if probes:
            raise UserError(f"suite '{self.suite.name}' lists {', '.join(probes)}: measured by the trainer's probe "
                            "(summary.json) or the robustness evaluation (python -m eval.attack), not by a suite")
        for spec in specs:
            mcfg = self.suite.metrics[spec.name] or OmegaConf.create({})
            t0 = time.perf_counter()
            out = spec.fn(self, mcfg)
            if out is None:
                continue
            results[spec.name] = out.pop("value")
            extras[spec.name] = out
            log.info("%s %s = %s (%.1f s)", self.label, spec.name, results[spec.name], time.perf_counter() - t0)
        record = dict(system=self.label, kind=self.kind, run=str(self.run_dir) if self.run_dir else None,
                      model=str(self.run_cfg.model.name) if self.run_cfg else None,
                      method=str(self.run_cfg.method.name) if self.run_cfg and self.kind == "run" else None,
                      concept=str(self.run_cfg.concept.name) if self.run_cfg else None,
                      suite=str(self.suite.name), eval_key=self.eval_key(), metrics=results, details=extras,
                      images=dict(self.stats), eval_time_s=round(time.perf_counter() - start, 2))
        return record


def out_dir(cfg: DictConfig) -> Path:
    if cfg.get("out"):
        return resolve_path(cfg.out)
    if cfg.system == "run":
        return Path(cfg.run)
    if cfg.get("run"):
        return Path(cfg.run).parent / str(cfg.system)
    raise UserError(f"system={cfg.system} needs out=<folder for eval.json>")


def evaluate(cfg: DictConfig) -> Path:
    """Evaluate the system of ``cfg`` (or reuse an up-to-date eval.json) and return the path of eval.json."""
    ev = Evaluation(cfg)
    target = out_dir(cfg) / "eval.json"
    if target.is_file() and not cfg.get("force"):
        old = json.loads(target.read_text())
        if old.get("eval_key") == ev.eval_key() and old.get("system") == ev.label:
            log.info("%s: eval.json is up to date (%s)", ev.label, target)
            return target
    record = ev.evaluate()
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, to_json(record, indent=2) + "\n")
    log.info("wrote %s", target)
    return target
