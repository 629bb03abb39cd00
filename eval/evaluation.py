"""Evaluate one system and write its ``eval.json``: ``python -m eval.run run=<run folder>``.

Systems: ``system=run`` (an erased model: the run's base model with its delta), ``system=base`` (the
run's base model alone) and ``system=reference`` (the suite's real images: the paper's "COCO" row).
The suite (``conf/eval/suite/<name>.yaml``; by default the one named like the run's model) lists
the prompt sets, the sampler and the metrics with their settings; any key can be overridden,
e.g. ``suite.prompt_sets.captions.n=50``. Images come from the cache (:mod:`eval.generate`), so a
second evaluation generates nothing; ``eval.json`` is rewritten only when its inputs changed
(``force=true`` recomputes).
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from omegaconf import DictConfig, OmegaConf

from erasure.errors import UserError, exit_on_user_error

from . import metrics as metric_registry
from .generate import cache_folder, generate, load_images, make_sampler, model_key, sha256_file
from .prompts import ROOT, load_prompt_set, resolve_path

log = logging.getLogger("eval.run")
CONF_DIR = ROOT / "conf" / "eval"
SYSTEMS = ("run", "base", "reference")


def suite_options() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "suite").glob("*.yaml"))


def compose_eval_cfg(overrides: list[str], config_name: str = "run") -> DictConfig:
    """Compose ``conf/eval/<config_name>.yaml`` with overrides; the suite defaults to the run's model name."""
    from hydra import compose, initialize_config_dir

    overrides = list(overrides)
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    suite = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "suite"), None)
    if suite is None and "run" in keys and config_name == "run":
        run = next(o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "run")
        cfg_path = Path(run) / "config.yaml"
        if not cfg_path.is_file():
            raise UserError(f"'{run}' is not a run folder (no config.yaml): pass the folder that erasure.train wrote")
        suite = str(OmegaConf.load(cfg_path).model.name)
        if suite not in suite_options():
            raise UserError(f"no evaluation suite for model '{suite}': pass suite=<one of {', '.join(suite_options())}>")
        overrides.append(f"suite={suite}")
    elif suite is not None and suite not in suite_options():
        raise UserError(f"unknown suite '{suite}': choose one of {', '.join(suite_options())}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            return compose(config_name=config_name, overrides=overrides)
        except Exception as exc:  # hydra's override/compose errors: one line for the user
            raise UserError(f"bad evaluation option: {str(exc).splitlines()[0]}") from None


class Evaluation:
    """One system under evaluation: its images (cached), the base model's, the reference images."""

    def __init__(self, cfg: DictConfig, system: str, run_dir: Path | None):
        if system not in SYSTEMS:
            raise UserError(f"unknown system '{system}': choose one of {', '.join(SYSTEMS)}")
        if system != "reference" and run_dir is None:
            raise UserError(f"system={system} needs run=<run folder> (the base model is read from the run's config)")
        self.cfg = cfg
        self.suite = cfg.suite
        self.kind = system
        self.run_dir = Path(run_dir) if run_dir is not None else None
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

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> "Evaluation":
        return cls(cfg, str(cfg.system), Path(cfg.run) if cfg.get("run") else None)

    # ---------------------------------------------------------------- models and images
    @property
    def models(self):
        if self._models is None:
            from erasure.models import load_models

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
        from erasure.delta import apply_delta, read_delta

        if self._delta is None:
            tensors, _ = read_delta(self.run_dir / "delta.safetensors")
            named = dict(self.models.unet.named_parameters())
            base_values = {k: named[k].detach().clone() for k in tensors if k in named}
            apply_delta(self.models.unet, self.models.fingerprint, self.run_dir / "delta.safetensors")  # checks the base
            with torch.no_grad():  # keep the UNet at the base weights outside erased generation
                for k, v in base_values.items():
                    named[k].copy_(v)
            self._delta = tensors
        return generate(self.models, rows, folder, sampler, desc=f"{self.label}: {name}", params=self._delta)

    def images(self, name: str):
        """uint8 N×H×W×3 images of this system for prompt set ``name``, and the rows."""
        return load_images(self._paths(name, base=False)), self.rows(name)

    def base_images(self, name: str):
        """The base model's images of the same prompts and seeds (shared by every run on this base)."""
        return load_images(self._paths(name, base=True)), self.rows(name)

    # --------------------------------------------------------------------- features
    def _cached_features(self, paths: list[Path]) -> torch.Tensor:
        from erasure.measures.fid import INCEPTION_SHA1, inception_features

        h = hashlib.sha256(INCEPTION_SHA1.encode())
        for p in paths:
            st = p.stat()
            h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        cache = self.cache_dir / "features" / f"{h.hexdigest()[:20]}.safetensors"
        if cache.is_file():
            return load_file(str(cache))["features"]  # safetensors: loading never executes code
        feats = []
        for size, idx in _group_by_size(paths).items():
            stack = torch.from_numpy(np.stack([np.asarray(_open_rgb(paths[i])) for i in idx])).permute(0, 3, 1, 2)
            feats.append((idx, inception_features(stack.contiguous())))
        out = torch.zeros(len(paths), feats[0][1].shape[1])
        for idx, f in feats:
            out[idx] = f
        from erasure.io import atomic_write

        atomic_write(cache, lambda tmp: save_file({"features": out.contiguous()}, str(tmp)))
        return out

    def features(self, name: str) -> torch.Tensor:
        return self._cached_features(self._paths(name, base=False))

    def reference_features(self) -> torch.Tensor:
        from .reference import reference_files

        return self._cached_features(reference_files(self.suite.reference))

    def reference_images_and_captions(self):
        from .reference import reference_captions, reference_files

        files = reference_files(self.suite.reference)
        captions = reference_captions(self.suite.reference, files)
        sizes = _group_by_size(files)
        if len(sizes) > 1:  # CLIP's processor resizes each image; a stack needs one size
            side = int(self.suite.reference.get("clip_side", 224))
            images = np.stack([np.asarray(_open_rgb(p).resize((side, side))) for p in files])
        else:
            images = np.stack([np.asarray(_open_rgb(p)) for p in files])
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
        names = list(self.suite.metrics)
        specs = [metric_registry.get_metric(n) for n in names]  # unknown names fail before any work
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


def _open_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _group_by_size(paths: list[Path]) -> dict:
    from PIL import Image

    groups: dict = {}
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            groups.setdefault(im.size, []).append(i)
    return groups


def out_dir(cfg: DictConfig) -> Path:
    if cfg.get("out"):
        return resolve_path(cfg.out)
    if cfg.system == "run":
        return Path(cfg.run)
    if cfg.get("run"):
        return Path(cfg.run).parent / str(cfg.system)
    raise UserError(f"system={cfg.system} needs out=<folder for eval.json>")


def evaluate_system(cfg: DictConfig) -> Path:
    """Evaluate (or reuse an up-to-date eval.json) and return the path of eval.json."""
    from erasure.io import write_text_atomic

    ev = Evaluation.from_cfg(cfg)
    target = out_dir(cfg) / "eval.json"
    if target.is_file() and not cfg.get("force"):
        old = json.loads(target.read_text())
        if old.get("eval_key") == ev.eval_key() and old.get("system") == ev.label:
            log.info("%s: eval.json is up to date (%s)", ev.label, target)
            return target
    record = ev.evaluate()
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, json.dumps(record, indent=2) + "\n")
    log.info("wrote %s", target)
    return target


@exit_on_user_error
def main(argv: list[str]) -> Path:
    from erasure.cli import setup_logging

    setup_logging()
    return evaluate_system(compose_eval_cfg(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
