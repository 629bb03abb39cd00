"""Quality gates of the toy world (the library of ``python -m erasure.toyworld.check`` and of the build).

Samples as the paper does (DDIM, 35 steps, guidance 7.5; also 3.0) from the prompts
"a <colour> <shape>" for every shape x colour, and reports

* shape and colour accuracy judged by the detector (averaged over shapes; gates: >= 90%),
* FID (TF-FID InceptionV3, torchmetrics) between generated and rendered images, and between two
  rendered sets as the floor,
* the tiny CLIP's score (torchmetrics CLIPScore / 100) of generated images with their own prompt
  vs. a mismatched prompt (other shape and colour).

Ends with one JSON line (``shape_accuracy``/``color_accuracy`` at guidance 7.5 and the rest).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..generation import Sampler, generate
from . import world

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
GATE = 0.90


def prompt_grid(per_combo: int, seed: int) -> tuple[list[str], list[str], list[str], list[int]]:
    """(prompts, shapes, colours, seeds): per_combo images for every shape x colour."""
    shapes, colors = [], []
    for s in world.SHAPES:
        for c in world.COLORS:
            shapes += [s] * per_combo
            colors += [c] * per_combo
    prompts = [world.prompt(s, c) for s, c in zip(shapes, colors)]
    return prompts, shapes, colors, [seed + i for i in range(len(prompts))]


def accuracies(pred: dict, shapes: list[str], colors: list[str]) -> dict:
    per_shape = {s: float(np.mean([p == s for p, t in zip(pred["shape"], shapes) if t == s])) for s in world.SHAPES}
    return {"shape_accuracy": float(np.mean(list(per_shape.values()))),
            "color_accuracy": float(np.mean([p == c for p, c in zip(pred["color"], colors)])),
            "per_shape": per_shape}


def renders_like(shapes: list[str], colors: list[str], seed: int) -> torch.Tensor:
    """Renders with the same shape/colour labels as a generated set (random background, size, place)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(world.to_uint8([world.render(world.sample_scene(rng, shape=s, color=c))
                                            for s, c in zip(shapes, colors)]))


def run_check(model_dir=HERE / "model", clip_dir=HERE / "clip", detector_path=HERE / "detector.safetensors",
              per_combo: int = 10, seed: int = 1000, fid: bool = True) -> dict:
    from omegaconf import OmegaConf

    from ..models import load_models
    from .detector import load_detector

    models = load_models(OmegaConf.create({"name": "toyworld", "kind": "pretrained", "path": str(model_dir)}), "cpu")
    det = load_detector(detector_path)
    prompts, shapes, colors, seeds = prompt_grid(per_combo, seed)
    result: dict = {"n_images_per_guidance": len(prompts), "sample_steps": 35}
    images = {}
    for g in (7.5, 3.0):
        sampler = Sampler(models.generation_scheduler, steps=35, guidance=g, resolution=models.resolution, batch_size=128)
        images[g] = generate(models, prompts, sampler, seeds=seeds, desc=f"sampling (g={g})")
        acc = accuracies(det.predict(images[g]), shapes, colors)
        suffix = "" if g == 7.5 else "_g3"
        result[f"shape_accuracy{suffix}"] = acc["shape_accuracy"]
        result[f"color_accuracy{suffix}"] = acc["color_accuracy"]
        result[f"per_shape_accuracy{suffix}"] = acc["per_shape"]
        log.info("guidance %.1f: shape accuracy %.4f, colour accuracy %.4f; per shape %s", g, acc["shape_accuracy"],
                 acc["color_accuracy"], {k: round(v, 3) for k, v in acc["per_shape"].items()})
    real_a = renders_like(shapes, colors, seed + 1)
    real_b = renders_like(shapes, colors, seed + 2)
    result["detector_accuracy_on_renders"] = accuracies(det.predict(real_a), shapes, colors)["shape_accuracy"]
    if fid:
        from ..measures.fid import fid_kid_from_features, inception_features

        feats_a, feats_b = inception_features(real_a), inception_features(real_b)
        for g in (7.5, 3.0):
            r = fid_kid_from_features(feats_a, inception_features(images[g]))
            suffix = "" if g == 7.5 else "_g3"
            result[f"fid{suffix}"], result[f"kid{suffix}"] = r["fid"], r["kid"]
        floor = fid_kid_from_features(feats_a, feats_b)
        result["fid_floor_renders"], result["kid_floor_renders"] = floor["fid"], floor["kid"]
        log.info("FID generated vs rendered %.2f (g 7.5), %.2f (g 3.0); rendered vs rendered (floor) %.2f",
                 result["fid"], result["fid_g3"], result["fid_floor_renders"])
    from ..measures.clip import clip_score

    k = len(world.COLORS) * per_combo + per_combo  # shifts both the shape and the colour of every prompt
    mismatched = prompts[k:] + prompts[:k]
    result["clip_score_matching"] = clip_score(images[7.5], prompts, clip_dir)
    result["clip_score_mismatched"] = clip_score(images[7.5], mismatched, clip_dir)
    result["clip_score_renders_matching"] = clip_score(real_a, prompts, clip_dir)
    result["clip_score_renders_mismatched"] = clip_score(real_a, mismatched, clip_dir)
    log.info("tiny-CLIP score on generated images: matching captions %.4f, mismatched %.4f (renders: %.4f vs %.4f)",
             result["clip_score_matching"], result["clip_score_mismatched"], result["clip_score_renders_matching"],
             result["clip_score_renders_mismatched"])
    result["gates_passed"] = bool(result["shape_accuracy"] >= GATE and result["color_accuracy"] >= GATE
                                  and result["clip_score_matching"] > result["clip_score_mismatched"])
    return result
