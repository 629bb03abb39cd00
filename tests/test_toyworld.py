"""The toy world: generator, detector, tiny CLIP and the shipped diffusers folder (erasure/toyworld/)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from erasure.toyworld import world
from tests.conftest import compose_cfg

TOY = Path(world.__file__).parent
MODEL = TOY / "model"
# The trained diffusers folder, tiny CLIP and detector are committed: a checkout without them is broken, so the tests
# below require them (a lost asset fails here instead of silently skipping every test that needs it).


def test_the_committed_toy_world_assets_are_present():
    from erasure.toyworld.detector import WEIGHTS

    for path in (MODEL / "model_index.json", TOY / "clip" / "config.json", WEIGHTS):
        assert path.is_file(), f"{path} is missing: restore it from git (or rebuild with `make toyworld`)"


def test_world_is_a_pure_function_of_the_seed():
    s1, im1, c1 = world.sample(24, seed=7)
    s2, im2, c2 = world.sample(24, seed=7)
    assert s1 == s2 and c1 == c2
    assert np.array_equal(world.to_uint8(im1), world.to_uint8(im2))
    s3, im3, _ = world.sample(24, seed=8)
    assert s3 != s1 and not np.array_equal(world.to_uint8(im3), world.to_uint8(im1))


def test_renders_show_their_labels():
    rng = np.random.default_rng(0)
    for shape in ("circle", "square", "oval"):
        for color in world.COLORS:
            scene = world.sample_scene(rng, shape=shape, color=color, background="gray")
            img = np.asarray(world.render(scene)).astype(int)
            centre = img[int(scene.cy), int(scene.cx)]
            assert np.abs(centre - np.array(world.RGB[color])).max() <= 13, (shape, color, centre)
            assert np.abs(img[0, 0] - 128).max() <= 2 or np.abs(img[-1, -1] - 128).max() <= 2  # a background corner
    # a circle covers about pi r^2 of the image, an oval 1/OVAL_ASPECT of that (its short axis is r / OVAL_ASPECT)
    area = {}
    for shape in ("circle", "oval"):
        scene = world.Scene(shape, "red", "white", 0.6, 16.0, 16.0, 0.0, (0, 0, 0))
        img = np.asarray(world.render(scene)).astype(int)
        area[shape] = float((np.abs(img - np.array(world.RGB["white"])).sum(-1) > 100).sum())
    r = 0.6 * 32 / 2
    assert abs(area["circle"] - np.pi * r * r) < 0.08 * np.pi * r * r
    assert abs(area["circle"] / area["oval"] - world.OVAL_ASPECT) < 0.25 and world.OVAL_ASPECT == 2.4


def test_captions_state_true_facts():
    rng = np.random.default_rng(1)
    for _ in range(200):
        scene = world.sample_scene(rng)
        text, facts = world.caption_with_facts(scene, rng)
        assert world.consistent(facts, scene)
        assert any(w in text for w in world.SHAPE_NOUNS[scene.shape] + (world.SHAPE_ADJECTIVES[scene.shape],))
        assert any(w in text for w in world.COLOR_WORDS[scene.color])


def test_detector_is_accurate_on_fresh_renders():
    from erasure.toyworld.detector import load_detector

    det = load_detector()
    scenes, images, _ = world.sample(400, seed=424242, with_captions=False)
    pred = det.predict(images)
    shape_acc = np.mean([p == s.shape for p, s in zip(pred["shape"], scenes)])
    color_acc = np.mean([p == s.color for p, s in zip(pred["color"], scenes)])
    assert shape_acc >= 0.98 and color_acc >= 0.98, (shape_acc, color_acc)
    # the same answers from a uint8 tensor; an empty background is "none"
    again = det.predict(torch.from_numpy(world.to_uint8(images[:20])))
    assert again["shape"] == pred["shape"][:20]
    blank = torch.full((4, 3, 32, 32), 250, dtype=torch.uint8)
    assert det.predict(blank)["shape"].count("none") >= 3


def test_pipeline_folder_loads_with_sd_scheduler_and_unit_latents():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from erasure.models import SD_SCHEDULER_CONFIG

    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL), safety_checker=None, requires_safety_checker=False)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and type(pipe.vae).__name__ == "AutoencoderKL"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel" and isinstance(pipe.scheduler, DDIMScheduler)
    for key, value in SD_SCHEDULER_CONFIG.items():
        assert pipe.scheduler.config[key] == value, key
    assert pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    # the VAE's scaling factor brings latents of renders to about unit variance
    x = torch.from_numpy(world.to_uint8(world.sample(64, seed=99, with_captions=False)[1])).float() / 127.5 - 1
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(0)) * pipe.vae.config.scaling_factor
    assert 0.8 < float(z.std()) < 1.25
    record = json.loads((MODEL / "training.json").read_text())
    assert record["unet"]["parameters"] == sum(p.numel() for p in pipe.unet.parameters())


def test_load_models_reads_the_packaged_folder():
    from erasure.models import load_models

    cfg = compose_cfg(["model=toyworld", "concept=circle"])
    m = load_models(cfg.model, "cpu")
    assert m.resolution == 32 and m.latent_shape == (4, 8, 8)
    assert m.unet.config.cross_attention_dim == m.text_encoder.config.hidden_size
    assert m.scheduler.config.clip_sample is False


@pytest.mark.parametrize("concept", ["circle", "red", "circle_to_square"])
def test_toy_concepts_compose_and_validate(concept):
    from erasure.config import validate

    cfg = compose_cfg(["model=toyworld", f"concept={concept}", "method=ours"])
    validate(cfg)
    probe = cfg.concept.probe
    label_words = world.SHAPE_NOUNS.get(str(probe.concept), ()) + world.COLOR_WORDS.get(str(probe.concept), ())
    for p in probe.target_prompts:  # every target prompt names the concept (or a synonym / its adjective)
        assert any(w in p for w in label_words) or world.SHAPE_ADJECTIVES.get(str(probe.concept), "?") in p \
            or "crimson" in p, p
    for p in probe.preserve_prompts:
        assert p.shape in world.SHAPES and p.shape != probe.concept and p.get("color") != probe.concept


def test_tiny_clip_prefers_matching_captions():
    from erasure.measures.clip import clip_score

    scenes, images, _ = world.sample(40, seed=5, with_captions=False)
    x = torch.from_numpy(world.to_uint8(images))
    right = [world.prompt(s.shape, s.color) for s in scenes]
    wrong = [world.prompt(world.SHAPES[(world.SHAPES.index(s.shape) + 2) % len(world.SHAPES)],
                          world.COLORS[(world.COLORS.index(s.color) + 1) % len(world.COLORS)]) for s in scenes]
    assert clip_score(x, right, TOY / "clip") > clip_score(x, wrong, TOY / "clip") + 0.05


@pytest.mark.slow
def test_base_model_meets_the_shape_gate_on_a_small_sample():
    from omegaconf import OmegaConf

    from erasure.generation import Sampler, generate
    from erasure.models import load_models
    from erasure.toyworld.quality import accuracies, prompt_grid
    from erasure.toyworld.detector import load_detector

    models = load_models(OmegaConf.create({"name": "toyworld", "kind": "pretrained", "path": str(MODEL)}), "cpu")
    prompts, shapes, colors, seeds = prompt_grid(per_combo=2, seed=777)
    images = generate(models, prompts, Sampler(models.generation_scheduler, 35, 7.5, models.resolution, 128), seeds=seeds)
    acc = accuracies(load_detector().predict(images), shapes, colors)
    assert acc["shape_accuracy"] >= 0.90 and acc["color_accuracy"] >= 0.90, acc


@pytest.mark.slow
def test_probe_with_unchanged_weights_reports_no_change():
    from erasure.models import load_models
    from erasure.toyworld.probe import erasure_summary

    cfg = compose_cfg(["model=toyworld", "concept=circle", "concept.probe.seeds=2", "model.sample_steps=10"])
    m = load_models(cfg.model, "cpu")
    params = {k: v.detach().clone() for k, v in m.unet.named_parameters() if ".attn2.to_out." in k}
    out = erasure_summary(models=m, cfg=cfg, base_params=params, erased_params=params)
    assert out["concept_rate_before"] == out["concept_rate_after"]
    assert out["preserved_accuracy_before"] == out["preserved_accuracy_after"]


@pytest.mark.parametrize("method", [["method.T=6"],
                                    # a text-encoder method: its base images need the frozen encoder copies too
                                    ["method=advunlearn", "method.attack_step=2", "method.ddim_steps=4"]])
def test_training_records_the_erasure_curve_and_scales_the_lr(tmp_path, method):
    """trainer.probe_points writes probe.jsonl (iteration 0 = the base model, measured again by the final probe's
    "before" on the same prompts and seeds: two routes, one number), and model.lr_scale multiplies the method's lr."""
    import json

    from erasure.trainer import train
    from tests.conftest import compose_cfg

    cfg = compose_cfg(["model=toyworld", "concept=circle", *method, "trainer.iterations=2",
                       "trainer.preview_every=0", "trainer.probe_points=2", "trainer.probe_seeds=1",
                       "concept.probe.seeds=1", "model.sample_steps=8"])  # 8 sampling steps: the routes agree at any
    train(cfg, tmp_path)
    points = [json.loads(line) for line in (tmp_path / "probe.jsonl").read_text().splitlines()]
    assert [p["step"] for p in points] == [0, 1, 2]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert points[0]["concept_rate"] == summary["concept_rate_before"]
    assert points[0]["preserved_accuracy"] == summary["preserved_accuracy_before"]
    assert points[-1]["concept_rate"] == summary["concept_rate_after"]
    # the frontier's SSIM to the base: 1 at iteration 0 (the base itself), and at the end the final probe's number
    assert points[0]["ssim_preserved"] == pytest.approx(1.0) and points[0]["ssim_target"] == pytest.approx(1.0)
    assert points[-1]["ssim_preserved"] == pytest.approx(summary["ssim_preserved"], abs=1e-6)
    assert points[-1]["ssim_target"] == pytest.approx(summary["ssim_target"], abs=1e-6)
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["lr"] == pytest.approx(cfg.method.lr * cfg.model.lr_scale) and cfg.model.lr_scale == 100
