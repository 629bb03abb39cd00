"""Erasure probe of the toy world, registered as the probe ``toyworld`` (``model.probe: toyworld``): the trainer
calls it after training (``summary.json``) and at the points of the erasure curve (``trainer.probe_points``).

Generates the concept's probe prompts with the base and the erased UNet (same seeds, the model's
sampler settings) and asks the detector: how often the erased concept still appears on target
prompts (``concept_rate_before``/``_after``) and whether the other prompts keep their shape and
colour (``preserved_accuracy_*``). The prompt sets live in the concept config under ``probe``:

    probe:
      attribute: shape            # detector head judging the concept: shape | color
      concept: circle             # the label whose rate is measured on target prompts
      replacement: null           # optional label the target should turn into (replacement runs)
      target_prompts: [...]
      preserve_prompts: [{prompt: a red square, shape: square, color: red}, ...]
      seeds: 12                   # images per prompt (seeds 0..seeds-1)
"""
from __future__ import annotations

import collections
import logging

import numpy as np

from ..errors import UserError
from ..generation import default_sampler, generate
from ..measures.ssim import ssim_pairs, ssim_window
from ..registry import register_probe
from .detector import load_detector

log = logging.getLogger(__name__)
BATCH = 32  # images per pipeline call, as the toy world's evaluation suite (conf/eval/suite/toyworld.yaml)


def measure(models, cfg, params, images_out: list | None = None, seeds: int | None = None) -> dict:
    """Detector figures for the UNet with ``params`` swapped in (its images are appended to ``images_out``)."""
    probe = cfg.concept.get("probe")
    if not probe:
        raise UserError(f"concept '{cfg.concept.name}' has no `probe` section: the toy-world probe needs "
                        "probe.attribute, probe.concept, probe.target_prompts and probe.preserve_prompts")
    attribute = str(probe.attribute)
    if attribute not in ("shape", "color"):
        raise UserError(f"probe.attribute must be 'shape' or 'color', got '{attribute}'")
    n = int(seeds if seeds is not None else probe.get("seeds", 12))
    targets = [str(p) for p in probe.target_prompts]
    preserve = [dict(p) for p in probe.preserve_prompts]
    prompts = [p for p in targets for _ in range(n)] + [p["prompt"] for p in preserve for _ in range(n)]
    seeds = [s for _ in range(len(targets) + len(preserve)) for s in range(n)]
    # the model's own sampler (model.sample_steps, model.guidance), as the evaluation suite's default
    images = generate(models, prompts, default_sampler(models, cfg.model, batch_size=BATCH), seeds=seeds, params=params,
                      desc="probe")
    if images_out is not None:
        images_out.append(images)
    pred = load_detector().predict(images)
    k = len(targets) * n
    on_target = pred[attribute][:k]
    out = {"concept_rate": float(np.mean([p == str(probe.concept) for p in on_target])),
           "target_distribution": dict(collections.Counter(on_target).most_common())}
    if probe.get("replacement"):
        out["replacement_rate"] = float(np.mean([p == str(probe.replacement) for p in on_target]))
    labels = [p for p in preserve for _ in range(n)]
    out["preserved_accuracy"] = float(np.mean([s == lab["shape"] for s, lab in zip(pred["shape"][k:], labels)]))
    with_color = [(c, lab["color"]) for c, lab in zip(pred["color"][k:], labels) if lab.get("color")]
    if with_color:
        out["preserved_color_accuracy"] = float(np.mean([c == t for c, t in with_color]))
    out["preserved_per_prompt"] = {
        p["prompt"]: float(np.mean([s == p["shape"] for s, lab in zip(pred["shape"][k:], labels) if lab is p]))
        for p in preserve}
    return out


def _ssim_to_base(cfg, images, base_images, seeds: int) -> dict:
    """SSIM of each image to the base model's image of the same prompt and seed (the paper's SSIM, with its 25/512
    window fraction: 3x3 at 32x32), averaged on the preserved prompts and on the target prompts."""
    k = len(cfg.concept.probe.target_prompts) * seeds
    values = ssim_pairs(images, base_images, ssim_window(base_images.shape[1]))  # N x H x W x 3 uint8
    return {"ssim_preserved": float(values[k:].mean()), "ssim_target": float(values[:k].mean())}


def erasure_summary(models, cfg, base_params, erased_params) -> dict:
    """``concept_rate_before``/``_after`` and ``preserved_accuracy_before``/``_after`` (+ colour, distributions)."""
    images: list = []
    before, after = measure(models, cfg, base_params, images), measure(models, cfg, erased_params, images)
    summary = {f"{k}_before": v for k, v in before.items()}
    summary.update({f"{k}_after": v for k, v in after.items()})
    summary.update(_ssim_to_base(cfg, images[1], images[0], int(cfg.concept.probe.get("seeds", 12))))
    concept = cfg.concept.probe.concept
    log.info("toy-world probe (%s): rate of '%s' on target prompts %.3f -> %.3f; shape accuracy on other prompts "
             "%.3f -> %.3f; colour accuracy %.3f -> %.3f; target prompts now show %s", cfg.concept.name, concept,
             before["concept_rate"], after["concept_rate"], before["preserved_accuracy"], after["preserved_accuracy"],
             before.get("preserved_color_accuracy", float("nan")), after.get("preserved_color_accuracy", float("nan")),
             after["target_distribution"])
    log.info("toy-world probe: SSIM to the base model's images %.3f on the other prompts, %.3f on target prompts",
             summary["ssim_preserved"], summary["ssim_target"])
    return summary


def curve_point(models, cfg, params, seeds: int, base_params=None, cache: dict | None = None) -> dict:
    """One point of the erasure curve (``trainer.probe_points``): concept rate and preserved accuracies, and with
    ``base_params`` the SSIM to the base model's images (generated once and kept in ``cache``): with the concept
    rate, one point of the method's erasure-vs-preservation frontier."""
    images: list = []
    out = measure(models, cfg, params, images, seeds=seeds)
    point = {k: v for k, v in out.items() if isinstance(v, float)}
    if base_params is not None:
        cache = {} if cache is None else cache
        if "base_images" not in cache:
            base: list = []
            measure(models, cfg, base_params, base, seeds=seeds)
            cache["base_images"] = base[0]
        point.update(_ssim_to_base(cfg, images[0], cache["base_images"], seeds))
    return point


@register_probe("toyworld")
class ToyWorldProbe:
    """The trainer's view of this module: ``summary`` after training, ``point`` along it (base images cached)."""

    def __init__(self, models, cfg):
        self.models, self.cfg = models, cfg
        self.cache: dict = {}

    def summary(self, base_params, erased_params) -> dict:
        return erasure_summary(self.models, self.cfg, base_params, erased_params)

    def point(self, params, seeds: int, base_params=None) -> dict:
        return curve_point(self.models, self.cfg, params, seeds, base_params=base_params, cache=self.cache)
