"""Several concepts erased at once (conf/concept/circle_red_triangle.yaml): the toy probe's per-concept bookkeeping
checked by hand on known renders of the world's renderer (the detector sees exactly what was drawn), the single-concept
probe's keys unchanged, the probe's and MACE's per-concept settings refused when wrong, and MACE's toy data for the
new concepts reproduced from the renderer."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from erasure.config import validate
from erasure.errors import UserError
from erasure.toyworld import probe, world
from tests.conftest import ROOT, build_session, compose_cfg

N = 4  # seeds per probe prompt in these tests
WORDS = {**{w: ("shape", s) for s, ws in world.SHAPE_NOUNS.items() for w in ws},
         **{w: ("shape", s) for s, w in world.SHAPE_ADJECTIVES.items()},
         **{w: ("color", c) for c, ws in world.COLOR_WORDS.items() for w in ws}}


def labels(prompt: str) -> dict[str, str]:
    """The shape and colour a toy prompt names ("a round green shape" -> circle, green)."""
    out = dict(WORDS[w] for w in prompt.split() if w in WORDS)
    assert set(out) == {"shape", "color"}, prompt
    return out


def erased_scene(prompt: str, seed: int) -> dict[str, str]:
    """What the pretend erased model draws: circles become squares except at seed 0, red becomes blue except at seeds
    0 and 1, triangles stay, and the purple oval drifts to a purple circle at seed 3 (one preserved miss)."""
    lab = labels(prompt)
    if lab["shape"] == "circle" and seed != 0:
        lab["shape"] = "square"
    if lab["color"] == "red" and seed > 1:
        lab["color"] = "blue"
    if prompt == "a purple oval" and seed == 3:
        lab["shape"] = "circle"
    return lab


def fake_generate(models, prompts, sampler, *, seeds, params, desc=None):
    """Renders instead of a diffusion model: the base draws what each prompt names, the erased one erased_scene."""
    out = []
    for prompt, seed in zip(prompts, seeds):
        lab = labels(prompt) if params["which"] == "base" else erased_scene(prompt, seed)
        scene = world.sample_scene(np.random.default_rng(1000 + seed), shape=lab["shape"], color=lab["color"])
        out.append(np.asarray(world.render(scene)))
    return np.stack(out)


@pytest.fixture()
def rendered(monkeypatch):
    monkeypatch.setattr(probe, "generate", fake_generate)
    monkeypatch.setattr(probe, "default_sampler", lambda *a, **k: None)
    return {"which": "base"}, {"which": "erased"}


def test_each_concept_rate_is_counted_on_its_own_prompts(rendered):
    base, erased = rendered
    cfg = compose_cfg(["model=toyworld", "concept=circle_red_triangle", f"concept.probe.seeds={N}"])
    out = probe.erasure_summary(None, cfg, base, erased)
    # 5 target prompts x 4 seeds per concept: circle kept at seed 0 only, red at seeds 0-1, triangle everywhere
    for concept, after in (("circle", 0.25), ("red", 0.5), ("triangle", 1.0)):
        assert out[f"concept_rate_before@{concept}"] == 1.0
        assert out[f"concept_rate_after@{concept}"] == after
    assert out["target_distribution_after@circle"] == {"square": 15, "circle": 5}
    assert out["target_distribution_after@red"] == {"blue": 10, "red": 10}  # the colour head, not the shape head
    assert out["target_distribution_after@triangle"] == {"triangle": 20}
    assert out["target_distribution_before@red"] == {"red": 20}
    # pooled: 5 + 10 + 20 of the 60 target images still show their own concept
    assert out["concept_rate_before"] == 1.0 and out["concept_rate_after"] == pytest.approx(35 / 60)
    # preserved: 8 prompts x 4 seeds, one purple oval drawn as a circle; colours all kept
    assert out["preserved_accuracy_before"] == 1.0 and out["preserved_accuracy_after"] == 31 / 32
    assert out["preserved_color_accuracy_after"] == 1.0
    assert out["preserved_per_prompt_after"]["a purple oval"] == 0.75
    # ... and what it became: 1 of its 4 images read as a circle, its colour kept
    assert out["preserved_predictions_after"]["a purple oval"] == {"shape": {"oval": 3, "circle": 1}, "color": {"purple": 4}}
    # SSIM to the base, per concept: triangles are redrawn identically, the others are not
    assert out["ssim_target@triangle"] == pytest.approx(1.0)
    assert out["ssim_target@circle"] < 0.99 and out["ssim_target@red"] < 0.99
    assert out["ssim_target"] == pytest.approx(np.mean([out[f"ssim_target@{c}"] for c in ("circle", "red", "triangle")]))
    assert 0.9 < out["ssim_preserved"] < 1.0
    # the erasure curve's points carry the same per-concept numbers, unstaged
    point = probe.curve_point(None, cfg, erased, N, base_params=base)
    assert point["concept_rate@circle"] == 0.25 and point["concept_rate@red"] == 0.5
    assert point["concept_rate"] == pytest.approx(35 / 60) and point["ssim_target@triangle"] == pytest.approx(1.0)


def test_per_concept_keys_resolve_to_the_registered_metric():
    from eval.metrics import heading, resolve

    assert resolve("concept_rate_after@red").name == "concept_rate"
    assert resolve("ssim_target@circle").name == "ssim_target"
    assert heading("concept_rate_after@red").endswith("(red) ↓")


@pytest.mark.parametrize("concept,replacement", [("circle", False), ("circle_to_square", True), ("red", False)])
def test_single_concept_probe_reports_the_keys_it_always_did(rendered, concept, replacement):
    base, erased = rendered
    cfg = compose_cfg(["model=toyworld", f"concept={concept}", f"concept.probe.seeds={N}"])
    out = probe.erasure_summary(None, cfg, base, erased)
    per_stage = ["concept_rate", "target_distribution"] + (["replacement_rate"] if replacement else []) + \
        ["preserved_accuracy", "preserved_color_accuracy", "preserved_per_prompt", "preserved_predictions"]
    assert list(out) == [f"{k}_before" for k in per_stage] + [f"{k}_after" for k in per_stage] + \
        ["ssim_preserved", "ssim_target"]
    rate = {"circle": 0.25, "circle_to_square": 0.25, "red": 0.5}[concept]  # its target prompts, as erased_scene draws
    assert out["concept_rate_before"] == 1.0 and out["concept_rate_after"] == rate
    # preserved prompts: a red one turns blue at seeds 2 and 3 (circle: 2 red of 7 prompts, circle_to_square: 1 of 5,
    # red: none); red.yaml preserves "a blue circle" of 6 prompts, drawn as a square at seeds 1-3
    colour = {"circle": 1 - 4 / 28, "circle_to_square": 1 - 2 / 20, "red": 1.0}[concept]
    shape = {"circle": 1.0, "circle_to_square": 1.0, "red": 1 - 3 / 24}[concept]
    assert out["preserved_accuracy_before"] == 1.0 and out["preserved_accuracy_after"] == pytest.approx(shape)
    assert out["preserved_color_accuracy_before"] == 1.0 and out["preserved_color_accuracy_after"] == pytest.approx(colour)
    if replacement:
        assert out["replacement_rate_after"] == 0.75


@pytest.mark.parametrize("override,match", [
    ("concept.probe.concepts.1.concept=crimson", "'crimson' is no color of the toy world"),
    ("concept.probe.concepts.2.concept=circle", "names a concept twice"),
    ("concept.probe.concepts.0.attribute=size", "must be 'shape' or 'color'"),
    ("+concept.probe.concept=circle", "move probe.concept into its entries"),
    ("concept.probe.preserve_prompts.0.color=red", "'a green square' is labelled color red, the erased concept"),
])
def test_bad_probe_entries_are_refused_in_one_sentence(override, match):
    cfg = compose_cfg(["model=toyworld", "concept=circle_red_triangle", override])
    with pytest.raises(UserError, match=match) as err:
        probe.probe_entries(cfg.concept)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method", ["ours", "uce", "mace"])
def test_the_three_concept_config_validates(method):
    cfg = compose_cfg(["model=toyworld", "concept=circle_red_triangle", f"method={method}"])
    validate(cfg)
    entries, preserve = probe.probe_entries(cfg.concept)
    assert [(e.attribute, e.concept) for e in entries] == [("shape", "circle"), ("color", "red"), ("shape", "triangle")]
    for e in entries:  # each target prompt names its concept and neither of the other two
        for p in e.target_prompts:
            lab = labels(p)
            assert lab[e.attribute] == e.concept
            assert all(lab[o.attribute] != o.concept for o in entries if o is not e), p
    for p in preserve:  # preserved prompts show none of the three
        assert all(p[e.attribute] != e.concept for e in entries) and labels(p["prompt"]) == {"shape": p["shape"],
                                                                                           "color": p["color"]}


@pytest.mark.parametrize("override,match", [
    ("+concept.mace.concept_templates={blue: ['a {} square']}", "names 'blue', which is none of the concepts"),
    ("+concept.mace.concept_templates={red: ['a red square']}", "concept_templates.red: 'a red square' must hold"),
])
def test_mace_concept_templates_are_checked(override, match):
    cfg = compose_cfg(["model=toyworld", "concept=circle_red_triangle", "method=mace",
                       "~concept.mace.concept_templates", override])
    with pytest.raises(UserError, match=match):
        validate(cfg)


def test_mace_uses_each_concept_its_own_templates(tmp_path):
    from tests.test_mace import write_folder

    write_folder(tmp_path, ["nudity", "naked"], n=1)
    m = build_session(["model=tiny", "concept=nudity", "method=mace", "trainer.preview_every=0",
                       "concept.mace.concepts=[nudity,naked]", "trainer.iterations=2", f"method.data_dir={tmp_path}",
                       "+concept.mace.concept_templates={naked: ['a {} person', 'a {} body']}"])[0].method
    assert m.templates[1] == ["a {} person", "a {} body"] and len(m.templates[0]) == 31  # the official object ones
    assert m.prompt_emb[1].shape[0] == 2 and m.positions[1].shape[0] == 2 and m.prompt_emb[0].shape[0] == 31


@pytest.mark.parametrize("name,shape,color", [("triangle", "triangle", None), ("red", None, "red")])
def test_the_shipped_mace_data_of_the_new_concepts_is_reproduced(tmp_path, name, shape, color):
    from erasure.toyworld.mace_data import write_concept_data

    result = write_concept_data(tmp_path, shape, 8, 0, color=color)
    assert result["name"] == name
    shipped = ROOT / "data" / "mace" / "toyworld"
    for sub in (name, f"{name} mask"):
        names = sorted(p.name for p in (shipped / sub).iterdir())
        assert names == sorted(p.name for p in (tmp_path / sub).iterdir()) and len(names) == 8
        for f in names:
            assert np.array_equal(np.asarray(Image.open(shipped / sub / f)), np.asarray(Image.open(tmp_path / sub / f)))
    scenes = result["scenes"]
    assert all(s["color"] == "red" for s in scenes) if color else all(s["shape"] == "triangle" for s in scenes)
    if color:  # a colour concept: every shape may appear
        assert len({s["shape"] for s in scenes}) > 1
