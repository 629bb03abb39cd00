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

Several concepts erased at once (``conf/concept/circle_red_triangle.yaml``) list one entry per concept, each with its
own detector head, label and target prompts; the preserved prompts (containing none of the concepts) are shared:

    probe:
      concepts:
        - {attribute: shape, concept: circle, target_prompts: [...]}
        - {attribute: color, concept: red, target_prompts: [...], replacement: null}
      preserve_prompts: [...]
      seeds: 10

Each concept's numbers are then reported under its name, ``<metric>@<concept>`` (``concept_rate@circle`` at a curve
point, ``concept_rate_before@circle`` / ``concept_rate_after@circle`` and ``ssim_target@circle`` in ``summary.json``:
the qualifier form :func:`eval.metrics.resolve` reads), each rate measured on that concept's own target prompts with
that concept's detector head. The unqualified ``concept_rate`` is then the share of all target images that still show
their own concept (the per-concept rates pooled over images), so tools that read one rate keep working. The
single-concept form above reports exactly the keys it always did, unqualified.
"""
from __future__ import annotations

import collections
import dataclasses
import logging

import numpy as np

from ..errors import UserError
from ..generation import default_sampler, generate
from ..measures.ssim import ssim_pairs, ssim_window
from ..registry import register_probe
from . import world
from .detector import load_detector

log = logging.getLogger(__name__)
BATCH = 32  # images per pipeline call, as the toy world's evaluation suite (conf/eval/suite/toyworld.yaml)
LABELS = {"shape": world.SHAPES, "color": world.COLORS}  # what each detector head can answer
ENTRY_KEYS = {"attribute", "concept", "replacement", "target_prompts"}


@dataclasses.dataclass(frozen=True)
class ProbeEntry:
    """One erased concept of the probe: the detector head (``attribute``) and label (``concept``) that judge it, an
    optional ``replacement`` label, its target prompts, and the qualifier of its keys (None: the single-concept form,
    unqualified keys)."""

    attribute: str
    concept: str
    target_prompts: tuple[str, ...]
    replacement: str | None = None
    qualifier: str | None = None

    def key(self, name: str) -> str:
        return f"{name}@{self.qualifier}" if self.qualifier else name


def staged(key: str, stage: str) -> str:
    """``concept_rate`` -> ``concept_rate_before``; ``concept_rate@circle`` -> ``concept_rate_before@circle``."""
    name, at, qualifier = key.partition("@")
    return f"{name}_{stage}{at}{qualifier}"


def _entry(node, where: str, qualified: bool) -> ProbeEntry:
    unknown = sorted(set(node) - ENTRY_KEYS - ({"preserve_prompts", "seeds", "concepts"} if not qualified else set()))
    if unknown:
        raise UserError(f"{where} has unknown key(s) {', '.join(unknown)}: give attribute, concept, target_prompts "
                        "and optionally replacement")
    missing = [k for k in ("attribute", "concept", "target_prompts") if not node.get(k)]
    if missing:
        raise UserError(f"{where} needs {', '.join(missing)} (attribute: shape | color, concept: the label whose rate "
                        "is measured, target_prompts: prompts that name it)")
    attribute, concept = str(node["attribute"]), str(node["concept"])
    if attribute not in LABELS:
        raise UserError(f"{where}.attribute must be 'shape' or 'color', got '{attribute}'")
    replacement = node.get("replacement")
    for label in [concept] + ([str(replacement)] if replacement else []):
        if label not in LABELS[attribute]:
            raise UserError(f"{where}: '{label}' is no {attribute} of the toy world (the detector's labels: "
                            f"{', '.join(LABELS[attribute])})")
    return ProbeEntry(attribute, concept, tuple(str(p) for p in node["target_prompts"]),
                      str(replacement) if replacement else None, concept if qualified else None)


def probe_entries(concept) -> tuple[list[ProbeEntry], list[dict]]:
    """The concept's ``probe`` section as (one entry per erased concept, the preserved prompts)."""
    probe = concept.get("probe")
    if not probe:
        raise UserError(f"concept '{concept.get('name')}' has no `probe` section: the toy-world probe needs "
                        "probe.attribute, probe.concept, probe.target_prompts and probe.preserve_prompts "
                        "(or probe.concepts: one {attribute, concept, target_prompts} per erased concept)")
    if probe.get("concepts") is not None:
        single = sorted(ENTRY_KEYS & set(probe))
        if single:
            raise UserError(f"probe.concepts lists the erased concepts: move probe.{single[0]} into its entries")
        nodes = list(probe.concepts)
        if not nodes:
            raise UserError("probe.concepts is empty: give one {attribute, concept, target_prompts} per erased concept")
        entries = [_entry(n, f"probe.concepts[{i}]", True) for i, n in enumerate(nodes)]
        names = [e.concept for e in entries]
        if len(set(names)) != len(names):
            raise UserError(f"probe.concepts names a concept twice ({names}): each entry's numbers are reported under "
                            "its concept's name")
    else:
        entries = [_entry(probe, "probe", False)]
    preserve = [dict(p) for p in probe.get("preserve_prompts") or []]
    for p in preserve:
        if "prompt" not in p or "shape" not in p:
            raise UserError(f"probe.preserve_prompts: each entry needs prompt and shape (and optionally color), got {p}")
        for e in entries:
            if p.get(e.attribute) == e.concept:
                raise UserError(f"probe.preserve_prompts: '{p['prompt']}' is labelled {e.attribute} {e.concept}, the "
                                "erased concept: a preserved prompt must show none of the erased concepts")
    return entries, preserve


def probe_prompts(entries: list[ProbeEntry], preserve: list[dict], n: int) -> tuple[list[str], list[int]]:
    """Every prompt ``n`` times (seeds 0..n-1): each entry's target prompts in order, then the preserved prompts."""
    texts = [p for e in entries for p in e.target_prompts] + [p["prompt"] for p in preserve]
    return [p for p in texts for _ in range(n)], [s for _ in texts for s in range(n)]


def score(pred: dict, entries: list[ProbeEntry], preserve: list[dict], n: int) -> dict:
    """The probe's numbers from the detector's predictions (``pred["shape"]``, ``pred["color"]``: one label per image,
    in the order of :func:`probe_prompts`)."""
    out: dict = {}
    start, hits = 0, []
    for e in entries:
        k = len(e.target_prompts) * n
        on_target = list(pred[e.attribute][start: start + k])
        shown = [p == e.concept for p in on_target]
        hits += shown
        out[e.key("concept_rate")] = float(np.mean(shown))
        out[e.key("target_distribution")] = dict(collections.Counter(on_target).most_common())
        if e.replacement:
            out[e.key("replacement_rate")] = float(np.mean([p == e.replacement for p in on_target]))
        start += k
    if entries[0].qualifier:  # several concepts: the pooled rate (each image judged against its own concept)
        out = {"concept_rate": float(np.mean(hits)), **out}
    k = start
    labels = [p for p in preserve for _ in range(n)]
    shapes, colors = list(pred["shape"][k:]), list(pred["color"][k:])
    out["preserved_accuracy"] = float(np.mean([s == lab["shape"] for s, lab in zip(shapes, labels)]))
    with_color = [(c, lab["color"]) for c, lab in zip(colors, labels) if lab.get("color")]
    if with_color:
        out["preserved_color_accuracy"] = float(np.mean([c == t for c, t in with_color]))
    out["preserved_per_prompt"] = {
        p["prompt"]: float(np.mean([s == p["shape"] for s, lab in zip(shapes, labels) if lab is p])) for p in preserve}
    # what each preserved prompt's images were read as (shape and colour counts): where a prompt breaks, what it became
    out["preserved_predictions"] = {
        p["prompt"]: {head: dict(collections.Counter(v for v, lab in zip(values, labels) if lab is p).most_common())
                      for head, values in (("shape", shapes), ("color", colors))} for p in preserve}
    return out


def measure(models, cfg, params, images_out: list | None = None, seeds: int | None = None) -> dict:
    """Detector figures for the UNet with ``params`` swapped in (its images are appended to ``images_out``)."""
    entries, preserve = probe_entries(cfg.concept)
    n = int(seeds if seeds is not None else cfg.concept.probe.get("seeds", 12))
    prompts, seed_list = probe_prompts(entries, preserve, n)
    # the model's own sampler (model.sample_steps, model.guidance), as the evaluation suite's default
    images = generate(models, prompts, default_sampler(models, cfg.model, batch_size=BATCH), seeds=seed_list,
                      params=params, desc="probe")
    if images_out is not None:
        images_out.append(images)
    return score(load_detector().predict(images), entries, preserve, n)


def _ssim_to_base(cfg, images, base_images, seeds: int) -> dict:
    """SSIM of each image to the base model's image of the same prompt and seed (the paper's SSIM, with its 25/512
    window fraction: 3x3 at 32x32), averaged on the preserved prompts and on the target prompts (and, with several
    concepts, on each concept's target prompts)."""
    entries, _ = probe_entries(cfg.concept)
    values = ssim_pairs(images, base_images, ssim_window(base_images.shape[1]))  # N x H x W x 3 uint8
    k = sum(len(e.target_prompts) for e in entries) * seeds
    out = {"ssim_preserved": float(values[k:].mean()), "ssim_target": float(values[:k].mean())}
    start = 0
    for e in entries:
        end = start + len(e.target_prompts) * seeds
        if e.qualifier:
            out[e.key("ssim_target")] = float(values[start:end].mean())
        start = end
    return out


def erasure_summary(models, cfg, base_params, erased_params) -> dict:
    """``concept_rate_before``/``_after`` and ``preserved_accuracy_before``/``_after`` (+ colour, distributions; with
    several concepts, each concept's under ``@<concept>``)."""
    images: list = []
    before, after = measure(models, cfg, base_params, images), measure(models, cfg, erased_params, images)
    summary = {staged(k, "before"): v for k, v in before.items()}
    summary.update({staged(k, "after"): v for k, v in after.items()})
    summary.update(_ssim_to_base(cfg, images[1], images[0], int(cfg.concept.probe.get("seeds", 12))))
    entries, _ = probe_entries(cfg.concept)
    for e in entries:
        log.info("toy-world probe (%s): rate of '%s' (%s) on its target prompts %.3f -> %.3f; they now show %s",
                 cfg.concept.name, e.concept, e.attribute, before[e.key("concept_rate")], after[e.key("concept_rate")],
                 after[e.key("target_distribution")])
    log.info("toy-world probe (%s): shape accuracy on other prompts %.3f -> %.3f; colour accuracy %.3f -> %.3f",
             cfg.concept.name, before["preserved_accuracy"], after["preserved_accuracy"],
             before.get("preserved_color_accuracy", float("nan")), after.get("preserved_color_accuracy", float("nan")))
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
