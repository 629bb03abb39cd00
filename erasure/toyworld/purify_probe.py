"""Toy-world purification probe (the paper's Fig. 1b / Fig. 10, measured): does DDIM inversion under the erased
model remove the erased concept from *real* images, while the base model merely reconstructs them?

    python -m erasure.toyworld.purify_probe run=<run folder> [n=20] [seed=0] [prompts='["", "a circle"]']
                                            [steps=] [guidance=1.0] [device=auto] [out=<folder for a grid PNG>]
    python -m erasure.toyworld.purify_probe model=toyworld ...     # base model only (no run)

Renders ``n`` images of the run's probe concept with :mod:`erasure.toyworld.world` (``concept.probe``: e.g.
circles, colours cycled through every colour of the world; or, for a colour concept, that colour cycled
through every shape), from a fixed seed. Each image is purified (:func:`erasure.allbutone.purify.purify_images`) with the
base model and with the erased model, under each prompt (default: the null text and the concept's first
target, the paper's two conditions). Reports the detector's concept rate (share of purified images in which
:mod:`erasure.toyworld.detector` still sees the concept) and the mean SSIM to the input (:mod:`erasure.measures.ssim`: colour-channel mean, data range 255, the paper's 25/512 window scaled to the side). Printed as one JSON
line and returned as a dict. When the model is not built (``erasure/toyworld/model/`` missing), the probe
skips: it logs why and returns ``{"skipped": "<reason>"}`` (exit code 0 from the command line).
"""
from __future__ import annotations

import collections
import json
import logging
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from ..cli import parse_options, setup_logging
from ..config import CONF_DIR
from ..errors import UserError, exit_on_user_error
from . import world

log = logging.getLogger("erasure.toyworld.purify_probe")
USAGE = ("usage: python -m erasure.toyworld.purify_probe run=<run folder> | model=<name or yaml> [n=20] [seed=0] "
         "[prompts='[\"\", \"a circle\"]'] [steps=] [guidance=1.0] [device=auto] [out=]")
OPTIONS = {"run", "model", "n", "seed", "prompts", "steps", "guidance", "device", "out", "batch_size"}


def render_concept(n: int, seed: int, attribute: str = "shape", concept: str = "circle") -> np.ndarray:
    """uint8 N×32×32×3 renders showing ``concept``: a shape in every colour in turn, or a colour on every shape."""
    if attribute == "shape" and concept in world.SHAPES:
        fixed = [dict(shape=concept, color=world.COLORS[i % len(world.COLORS)]) for i in range(n)]
    elif attribute == "color" and concept in world.COLORS:
        fixed = [dict(color=concept, shape=world.SHAPES[i % len(world.SHAPES)]) for i in range(n)]
    else:
        raise UserError(f"the purification probe renders a world shape ({', '.join(world.SHAPES)}) or colour "
                        f"({', '.join(world.COLORS)}), got {attribute}={concept!r}")
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng, **f) for f in fixed]
    return world.to_uint8([world.render(s) for s in scenes]).transpose(0, 2, 3, 1).copy()


def model_absent(model_cfg) -> str | None:
    """Why the model cannot be loaded because it is not built (a ``pkg://`` folder missing), else None."""
    from ..models import _pretrained_location

    if str(model_cfg.get("kind")) == "pretrained" and str(model_cfg.get("path", "")).startswith("pkg://"):
        location = _pretrained_location(model_cfg)
        if not Path(location).is_dir():
            return f"model '{model_cfg.get('name')}' is not built at {location} (run `make {model_cfg.get('name')}`)"
    return None


def resolve_model_cfg(model: str):
    """A model config from a ``conf/model`` name or a YAML file."""
    path = Path(str(model))
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return OmegaConf.load(path)
    named = CONF_DIR / "model" / f"{model}.yaml"
    if named.is_file():
        return OmegaConf.load(named)
    options = ", ".join(sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))
    raise UserError(f"unknown model '{model}': pass a model config file or one of {options}")


def _ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from ..measures.ssim import ssim_pairs, ssim_window

    return ssim_pairs(a, b, ssim_window(a.shape[1]))


def _judge(detector, attribute: str, concept: str, images: np.ndarray, inputs: np.ndarray) -> dict:
    pred = detector.predict(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))[attribute]
    ssim = _ssim(images, inputs)
    return dict(concept_rate=float(np.mean([p == concept for p in pred])), ssim=float(ssim.mean()),
                ssim_std=float(ssim.std()), distribution=dict(collections.Counter(pred).most_common()))


def purify_probe(run: str | Path | None = None, model=None, n: int = 20, seed: int = 0,
                 prompts: list[str] | None = None, steps: int | None = None, guidance: float = 1.0,
                 device: str = "auto", out: str | Path | None = None, batch_size: int = 64) -> dict:
    """Concept rate and SSIM to the input of purified toy-world renders, base vs erased (see the module doc).

    ``run``: a run folder (its model, concept probe and delta); or ``model``: a model config node, a
    ``conf/model`` name or a YAML path, for the base model alone. Returns ``{"skipped": reason}`` when the
    model is not built.
    """
    from ..allbutone.purify import DEFAULT_STEPS, as_uint8_images, purify_images
    from ..delta import apply_delta, check_run_folder
    from ..models import load_models
    from .detector import load_detector

    if run is None and model is None:
        raise UserError(f"the purification probe needs a run folder or a model; {USAGE}")
    cfg = check_run_folder(run, base=False) if run is not None else None
    model_cfg = cfg.model if cfg is not None else (resolve_model_cfg(model) if isinstance(model, (str, Path)) else model)
    reason = model_absent(model_cfg)
    if reason:
        log.warning("purification probe skipped: %s", reason)
        return {"skipped": reason}
    probe = (cfg.concept.get("probe") or {}) if cfg is not None and cfg.get("concept") else {}
    attribute, concept = str(probe.get("attribute", "shape")), str(probe.get("concept", "circle"))
    if prompts is None:
        # the concept's own target text when it has a probe section (e.g. "a circle"), else the world's prompt
        targets = list(cfg.concept.get("targets") or []) if probe else []
        prompts = ["", str(targets[0]) if targets else world.prompt(concept)]
    steps = int(steps or model_cfg.get("sample_steps") or DEFAULT_STEPS)

    models = load_models(model_cfg, device)
    inputs = as_uint8_images(render_concept(int(n), int(seed), attribute, concept), models.resolution)
    detector = load_detector()
    result: dict = dict(n=int(n), seed=int(seed), attribute=attribute, concept=concept, steps=steps,
                        guidance=float(guidance), prompts=list(prompts), run=str(run) if run is not None else None,
                        input_concept_rate=_judge(detector, attribute, concept, inputs, inputs)["concept_rate"])
    purified: dict[str, dict[str, np.ndarray]] = {}
    systems = ["base"] + (["erased"] if run is not None else [])
    for system in systems:
        if system == "erased":
            apply_delta(models, Path(run) / "delta.safetensors")
        result[system], purified[system] = {}, {}
        for prompt in prompts:
            images = purify_images(models, inputs, prompt, steps, guidance, batch_size=batch_size)
            key = prompt or "null"
            purified[system][key] = images
            result[system][key] = _judge(detector, attribute, concept, images, inputs)
            log.info("%s model, condition %r: '%s' seen in %.3f of %d purified images (input: %.3f), SSIM to the "
                     "input %.3f", system, prompt, concept, result[system][key]["concept_rate"], len(images),
                     result["input_concept_rate"], result[system][key]["ssim"])
    if out is not None:
        result["grid"] = str(_save_grid(Path(out), inputs, purified))
    return result


def _save_grid(out: Path, inputs: np.ndarray, purified: dict) -> Path:
    from PIL import Image

    from ..images import grid, save_png

    k = min(len(inputs), 10)
    rows = [[Image.fromarray(im) for im in inputs[:k]]]
    labels = ["input"]
    for system, by_prompt in purified.items():
        for prompt, images in by_prompt.items():
            rows.append([Image.fromarray(im) for im in images[:k]])
            labels.append(f"{system}: {prompt}"[:28])
    return save_png(grid(rows, row_labels=labels), out / "purify_probe.png")


@exit_on_user_error
def main(argv: list[str]) -> dict:
    setup_logging()
    args = parse_options(argv, OPTIONS, USAGE, lambda a: "run" in a or "model" in a)
    prompts = args.get("prompts")
    if prompts is not None:
        prompts = [str(p) if p is not None else "" for p in (prompts if OmegaConf.is_list(prompts) else [prompts])]
    try:
        kw = dict(n=int(args.get("n", 20)), seed=int(args.get("seed", 0)),
                  steps=int(args.steps) if args.get("steps") else None, guidance=float(args.get("guidance", 1.0)),
                  batch_size=int(args.get("batch_size", 64)))
    except (TypeError, ValueError):
        raise UserError(f"n=, seed=, steps=, batch_size= take integers and guidance= a number; {USAGE}") from None
    result = purify_probe(run=args.get("run"), model=args.get("model"), prompts=prompts,
                          device=str(args.get("device", "auto")), out=args.get("out"), **kw)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
