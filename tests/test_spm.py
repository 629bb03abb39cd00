"""SPM (baselines/spm.py): the membrane against a direct matmul, the latent-anchoring loss against the official batch
arithmetic, the facilitated-transport scale by hand, the learning-rate schedule against diffusers', and a short run
on the tiny model whose delta loads with its transport."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baselines.spm import (SPM, anchor_conditions, anchoring_loss, code_timestep, cosine_restarts_factor,
                           erase_loss, sample_anchors, token_sets, transport_strength)
from erasure.adapters import attach, attached
from erasure.delta import load_run, read_delta
from erasure.generation import default_sampler, generate
from erasure.trainer import train
from tests.conftest import assert_precheck, build_session, compose_cfg, shared_scope


# ---------------------------------------------------------------------------------------------- the membrane

def test_membrane_is_a_rank_one_update_of_the_layer():
    layer = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        layer[0].weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]]))
        layer[0].bias.copy_(torch.tensor([0.5, -0.5]))
    membrane = attach(layer, "spm", ["0"], rank=1, alpha=1.0).modules["0"]  # spm.py l.33-37, l.57-58: scale 1/1
    with torch.no_grad():
        membrane.down.weight.copy_(torch.tensor([[1.0, 2.0, -1.0]]))  # d
        membrane.up.weight.copy_(torch.tensor([[3.0], [-2.0]]))  # u
    x = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, -1.0]])
    # W x + b + u (d . x): d . x = 2 and 3
    expected = torch.tensor([[3.0 + 0.5 + 3 * 2, 0.0 - 0.5 - 2 * 2], [0.0 + 0.5 + 3 * 3, -1.0 - 0.5 - 2 * 3]])
    torch.testing.assert_close(layer(x), expected)
    direct = x @ (layer[0].weight + membrane.up.weight @ membrane.down.weight).T + layer[0].bias
    torch.testing.assert_close(layer(x), direct)


def test_membrane_sits_on_every_linear_and_conv_of_the_transformer_blocks(tiny_models):
    blocks = [m for m in tiny_models.unet.modules() if type(m).__name__ == "Transformer2DModel"]
    per_block = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in blocks[0].modules())  # 12 on SD's blocks
    s = SPM.build_adapters(SPM.Config(), tiny_models, compose_cfg(["concept=nudity"]).concept,
                           torch.Generator().manual_seed(0))[0]
    assert len(s.targets) == len(blocks) * per_block
    assert any(t.endswith("proj_in") for t in s.targets) and any(t.endswith("ff.net.2") for t in s.targets)
    assert all(a.rank == 1 and a.scale == 1.0 for a in s.modules.values())
    assert s.is_identity() and s.gate == dict(method="spm", concepts=["nudity"], metric="clipcos_tokenuni", power=2.0)


# ---------------------------------------------------------------------------------------------- losses

def test_erase_loss_by_hand():
    student = torch.tensor([1.0, 2.0])
    positive, neutral = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    # g = 1: goal = n - (p - n) = [-2, 2]; errors [3, 0]; mean square 9/2
    assert erase_loss(student, positive, neutral, 1.0).item() == pytest.approx(4.5)
    # g = 2: goal = n - 2 (p - n) = [-4, 3]; errors [5, -1]; (25 + 1) / 2
    assert erase_loss(student, positive, neutral, 2.0).item() == pytest.approx(13.0)
    # the goal is a constant: the gradient reaches the student only, (student - goal) per element
    s = student.clone().requires_grad_(True)
    p, n = positive.clone().requires_grad_(True), neutral.clone().requires_grad_(True)
    erase_loss(s, p, n, 1.0).backward()
    torch.testing.assert_close(s.grad, torch.tensor([3.0, 0.0]))
    assert p.grad is None and n.grad is None


def fake_eps(weight: float):
    """A stand-in UNet: ε(x, e) depends on both the latent and the condition, row by row."""
    def eps(x, e):
        return weight * x * e.mean(dim=(1, 2))[:, None, None, None] + e[:, :1, :1].reshape(-1, 1, 1, 1)
    return eps


def official_anchoring(student, base, z, anchors, uncond):
    """train_spm.py l.242-262 with train_util.py l.161-176: the interleaved anchors through predict_noise at
    guidance 1, the two halves of the batch recombined as unconditional + 1 * (conditional - unconditional)."""
    n = anchors.shape[0]
    embeds = torch.cat([torch.cat([uncond, a[None]]) for a in anchors])  # sampling.py l.24-25
    latents = torch.cat([z.repeat(n, 1, 1, 1)] * 2)  # l.249, train_util.py l.161
    outs = []
    for eps in (student, base):
        u, c = eps(latents, embeds).chunk(2)
        outs.append(u + 1.0 * (c - u))
    return F.mse_loss(outs[0], outs[1])  # prompt.py l.171


def test_anchoring_loss_matches_the_official_batch_arithmetic():
    g = torch.Generator().manual_seed(0)
    z, uncond = torch.randn(1, 2, 2, 2, generator=g), torch.randn(1, 3, 5, generator=g)
    anchors = torch.randn(4, 3, 5, generator=g)
    student, base = fake_eps(1.3), fake_eps(0.7)
    conds = anchor_conditions(anchors, uncond, "code")
    for got, want in zip(conds, [uncond[0], anchors[2], uncond[0], anchors[3]]):  # [∅, a_3, ∅, a_4]
        assert torch.equal(got, want)
    zs = z.expand(len(conds), -1, -1, -1)
    ours = anchoring_loss(student(zs, conds), base(zs, conds))
    torch.testing.assert_close(ours, official_anchoring(student, base, z, anchors, uncond))
    # every anchor (anchor_rows=all): the mean over a_1..a_4 only
    za = z.expand(4, -1, -1, -1)
    by_hand = sum(((student(za, anchors)[i] - base(za, anchors)[i]) ** 2).mean() for i in range(4)) / 4
    torch.testing.assert_close(anchoring_loss(student(za, anchors), base(za, anchors)), by_hand)


def test_anchors_are_random_directions_at_the_targets_scale():
    target = torch.randn(1, 7, 4)
    a = sample_anchors(target, 6, torch.Generator().manual_seed(0))
    b = sample_anchors(target, 6, torch.Generator().manual_seed(0))
    assert a.shape == (6, 7, 4) and torch.equal(a, b)
    ratio = a.flatten(1).norm(dim=1) / target.norm()
    assert bool(((ratio >= 0.8 - 1e-6) & (ratio <= 1.2 + 1e-6)).all())
    # a target along one axis: a direction too close to it is rejected with probability cos (sampling.py l.18)
    spike = torch.zeros(1, 1, 2)
    spike[0, 0, 0] = 1.0
    kept = sample_anchors(spike, 400, torch.Generator().manual_seed(1))[:, 0]
    torch.manual_seed(123)  # every draw, the acceptance ones too, comes from the generator: the global RNG changes nothing
    assert torch.equal(sample_anchors(spike, 40, torch.Generator().manual_seed(1))[:, 0], kept[:40])
    cos = F.cosine_similarity(kept, spike[0], dim=-1)
    assert cos.mean() < -0.1  # drawn uniformly on the circle the mean would be 0


def test_timestep_and_schedule_follow_the_code():
    assert code_timestep(1, 30) == 966 and code_timestep(29, 30) == 33 and code_timestep(15, 30) == 499
    from diffusers.optimization import get_cosine_with_hard_restarts_schedule_with_warmup

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_cosine_with_hard_restarts_schedule_with_warmup(opt, num_warmup_steps=500, num_training_steps=3000,
                                                               num_cycles=3)
    for index in range(0, 3001, 7):
        assert cosine_restarts_factor(index, 500, 3000, 3) == pytest.approx(sched.lr_lambdas[0](index), abs=1e-12)
    assert cosine_restarts_factor(0, 500, 3000, 3) == 0.0  # the first step has learning rate 0 (LambdaLR at 0)


# ---------------------------------------------------------------------------------------------- facilitated transport

def test_transport_strength_by_hand():
    prompts = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])  # 2 prompts, L = 2, d = 2
    concepts = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 2.0], [0.0, 0.0]]])  # 2 concepts
    # cos of the flattened outputs, p0 = (1,0,0,1), p1 = (0,1,1,0) against c0 = (1,0,1,0), c1 = (0,2,0,0):
    #   p0: 1/2 with c0, 0 with c1;  p1: 1/2 with c0, 2/(sqrt(2)*2) = 1/sqrt(2) with c1
    p_tokens, c_tokens = [{10, 20, 12}, {13}], [{10, 20}, {13, 14, 15, 16}]
    # token overlap |P & C| / |C|: p0: 2/2 = 1 with c0, 0 with c1;  p1: 0 with c0, 1/4 with c1
    r = 1 / math.sqrt(2)
    # per concept the larger metric, then the largest concept: p0 max(1/2, 1) = 1 (the tokens decide),
    # p1 max(max(1/2, 0), max(1/sqrt(2), 1/4)) = 1/sqrt(2) (the embeddings decide)
    torch.testing.assert_close(transport_strength(prompts, p_tokens, concepts, c_tokens, "clipcos_tokenuni"),
                               torch.tensor([1.0, r]))
    torch.testing.assert_close(transport_strength(prompts, p_tokens, concepts, c_tokens, "tokenuni"),
                               torch.tensor([1.0, 0.25]))
    torch.testing.assert_close(transport_strength(prompts, p_tokens, concepts, c_tokens, "clipcos"),
                               torch.tensor([0.5, r]))
    # a concept without tokens (an empty prompt) has no overlap to measure: 0, not a division by zero
    torch.testing.assert_close(transport_strength(prompts, p_tokens, concepts, [set(), c_tokens[1]], "tokenuni"),
                               torch.tensor([0.0, 0.25]))


def test_token_sets_see_what_the_encoder_sees(tiny_models):
    """The ids of each prompt without <|startoftext|>, <|endoftext|> (also the padding), cut at 77 tokens as the
    text encoder's input is: a word after the 77th token is not in the set."""
    tok = tiny_models.tokenizer
    word = set(tok("nudity", add_special_tokens=False).input_ids)
    short, long_ = token_sets(tok, ["nudity", "a " * 80 + "nudity"])
    assert short == word and tok("a", add_special_tokens=False).input_ids[0] not in word
    assert long_ == set(tok("a", add_special_tokens=False).input_ids)


def test_gate_on_the_tiny_model_is_gamma_squared(tiny_models):
    settings = dict(method="spm", concepts=["nudity"], metric="clipcos_tokenuni", power=2.0)
    prompts = ["nudity", "a photo of nudity", "a photo of a cat"]
    embeds = tiny_models.encode_text(prompts)
    assert token_sets(tiny_models.tokenizer, ["a cat"]) == [{320, 2368}]  # no <|startoftext|>, <|endoftext|>, padding
    got = SPM.gate(tiny_models, prompts, embeds, settings)
    cos = F.cosine_similarity(embeds.flatten(1), tiny_models.encode_text(["nudity"]).flatten(1), dim=-1)
    overlap = torch.tensor([1.0, 1.0, 0.0])  # "nudity" is one token (infer_spm.py l.44-50)
    torch.testing.assert_close(got, torch.maximum(cos, overlap) ** 2)
    assert got[0].item() == pytest.approx(1.0) and got[2].item() < 1.0


# ---------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope=shared_scope)
def spm_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("spm")
    cfg = compose_cfg(["model=tiny", "concept=nudity", "method=spm", "trainer.iterations=3", "method.ddim_steps=3",
                       "method.lr_warmup_steps=1", "method.lr=1e-2", "method.anchors=2", "trainer.preview_every=0"])
    train(cfg, run)
    return run


def test_spm_run_trains_the_membrane_and_its_delta_generates_with_transport(spm_run):
    rows = [json.loads(line) for line in (spm_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["loss"] == pytest.approx(r["erase"] + 1000.0 * r["anchor"], rel=1e-5)
    # the schedule: warm-up of 1 step (lr 0 at the first), then cosine with 3 restarts over the 3 steps
    assert [r["lr"] for r in rows] == pytest.approx([1e-2 * cosine_restarts_factor(i, 1, 3, 3) for i in range(3)])
    tensors, meta = read_delta(spm_run)
    assert meta["method"] == "spm" and meta["params"] == "none" and meta["format"] == "erasure-delta/2"
    (desc,) = meta["adapters"]
    assert desc["name"] == "spm" and desc["rank"] == 1 and desc["gate"]["concepts"] == ["nudity"]
    assert set(tensors) == {f"{t}.erasure_adapters.spm.{w}.weight" for t in desc["targets"] for w in ("down", "up")}
    assert any(tensors[f"{t}.erasure_adapters.spm.up.weight"].any() for t in desc["targets"])  # trained

    _, models = load_run(spm_run, "cpu")  # erasure.generate's loader
    membrane = attached(models.unet)["spm"]
    sampler = default_sampler(models, compose_cfg(["model=tiny"]).model, steps=2)
    prompts = ["nudity", "a photo of a cat"]
    with_transport = generate(models, prompts, sampler, seeds=[0, 0])
    gamma2 = SPM.gate(models, prompts, models.encode_text(prompts), desc["gate"])
    assert gamma2[0].item() == pytest.approx(1.0) and gamma2[1].item() < 1.0
    membrane.gate = None  # the same membrane at fixed multipliers: γ² reproduces the transport, 1 does not
    by_hand = []
    for prompt, g in zip(prompts, gamma2):
        membrane.set_multiplier(torch.tensor([g.item()]))
        by_hand.append(generate(models, [prompt], sampler, seeds=[0])[0])
    # one prompt per batch vs two: float rounding may move a pixel by one level (measured: 1 of 6,144 values)
    off_by_hand = np.abs(np.stack(by_hand).astype(int) - with_transport.astype(int))
    assert off_by_hand.max() <= 1
    membrane.set_multiplier(1.0)
    full = generate(models, prompts[1:], sampler, seeds=[0])
    off_full = np.abs(full[0].astype(int) - with_transport[1].astype(int))
    assert (off_full > 0).sum() > 10 * max(1, (off_by_hand[1] > 0).sum())  # measured: 74 values vs 0


# ------------------------------------------------------------------------------------------- settings and prompts

@pytest.mark.parametrize("override, words", [
    # every allowed value of each choice is accepted (the defaults are the first ones)
    ("method.sampler=teacher", None), ("method.query_timestep=ddim", None), ("method.anchor_rows=all", None),
    ("method.lr_scheduler=constant", None), ("method.sampler=ema", "method.sampler must be one of"),
    # each number at its edge is accepted and one step beyond it refused, one key at a time (SPM checks ddim_steps
    # itself; the other ranges are erasure/schema.py's)
    ("method.ddim_steps=2", None), ("method.ddim_steps=1", "method.ddim_steps must be at least 2"),
    ("method.anchors=1", None), ("method.anchors=0", "method.anchors must be at least 1"),
    ("method.rank=0", "method.rank must be at least 1"),
    ("method.la_strength=0", None), ("method.la_strength=-0.5", "method.la_strength must be a finite number >= 0"),
    ("method.lr_warmup_steps=0", None), ("method.lr_warmup_steps=-1", "method.lr_warmup_steps must be at least 0"),
    ("method.lr_scheduler_num_cycles=1", None), ("method.lr_scheduler_num_cycles=0", "method.lr_scheduler_num_cycles must be at least 1"),
    ("method.anchor_scale=[0.5,0.5]", None), ("method.anchor_scale=[0,1]", "method.anchor_scale"),
    ("method.anchor_scale=[2,1]", "method.anchor_scale"), ("method.anchor_scale=[0.5]", "method.anchor_scale"),
    ("method.transport_power=0.5", None), ("method.transport_power=0", "method.transport_power must be a positive")])
def test_spm_range_edges(override, words):
    assert_precheck(["model=tiny", "concept=nudity", "method=spm", override], words)


def test_anchor_rows_and_the_learning_rate_schedule():
    """anchor_rows all: every anchor; the schedule against diffusers' own cosine-with-hard-restarts lambda (the one
    train_util.py l.619-626 builds) at every step, warm-up 0, 1 and 3, one and three cycles, past the end too;
    lr_scheduler constant: 1 at every step."""
    from types import SimpleNamespace

    from diffusers.optimization import get_cosine_with_hard_restarts_schedule_with_warmup

    anchors, uncond = torch.randn(4, 3, 2), torch.zeros(1, 3, 2)
    assert torch.equal(anchor_conditions(anchors, uncond, "all"), anchors)
    for total, warmup, cycles in [(t, w, c) for t in (2, 7) for w in (0, 1, 3) for c in (1, 3)]:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        (reference,) = get_cosine_with_hard_restarts_schedule_with_warmup(opt, warmup, total, cycles).lr_lambdas
        ours = [cosine_restarts_factor(i, warmup, total, cycles) for i in range(total + 2)]
        assert ours == pytest.approx([reference(i) for i in range(total + 2)], abs=1e-12)
        method = SimpleNamespace(cfg=SimpleNamespace(lr_scheduler="cosine_with_restarts", lr_warmup_steps=warmup,
                                                     lr_scheduler_num_cycles=cycles),
                                 ctx=SimpleNamespace(cfg=SimpleNamespace(trainer=SimpleNamespace(iterations=total))))
        assert [SPM.lr_factor(method, i + 1) for i in range(total)] == ours[:total]  # step 1 = index 0
    constant = SimpleNamespace(cfg=SimpleNamespace(lr_scheduler="constant", lr_warmup_steps=3))
    assert [SPM.lr_factor(constant, s) for s in (1, 2, 50)] == [1.0, 1.0, 1.0]


def test_dynamic_resolution_needs_latent_sides_in_eighths():
    """A 24-pixel tiny model has 12 x 12 latents: dynamic resolution (k/8 of each side) is refused before training,
    naming the switch; without it the method builds."""
    from erasure.config import validate
    from erasure.errors import UserError
    from erasure.models import load_models
    from erasure.session import Session

    for dynamic in (True, False):
        cfg = compose_cfg(["model=tiny", "model.resolution=24", "concept=nudity", "method=spm",
                           f"method.dynamic_resolution={str(dynamic).lower()}"])
        method_cls, mcfg = validate(cfg)
        models = load_models(cfg.model, "cpu")
        if dynamic:
            with pytest.raises(UserError, match="are 12 x 12: set method.dynamic_resolution=false"):
                Session.create(cfg, models, method_cls, mcfg)
        else:
            assert Session.create(cfg, models, method_cls, mcfg).method.latent_shape() == (4, 12, 12)


def test_the_membrane_carries_rank_alpha_and_the_transport_gate():
    """spm.py l.57-58: scale alpha / rank (rank 2, alpha 1: 0.5); the gate names the concept's targets, the metric
    and the power; transport=false: no gate."""
    from erasure.config import validate
    from erasure.models import load_models
    from erasure.session import Session

    for transport in (True, False):
        cfg = compose_cfg(["model=tiny", "concept=nudity", "concept.targets=[nudity,naked person]", "method=spm",
                           "method.rank=2", "method.alpha=1.0", "method.transport_power=3.0",
                           f"method.transport={str(transport).lower()}"])
        method_cls, mcfg = validate(cfg)
        sess = Session.create(cfg, load_models(cfg.model, "cpu"), method_cls, mcfg)
        membrane = sess.method.ctx.adapters["spm"]
        assert membrane.rank == 2 and {a.scale for a in membrane.modules.values()} == {0.5}
        expected = dict(method="spm", concepts=["nudity", "naked person"], metric=mcfg.matching_metric, power=3.0)
        assert membrane.gate == (expected if transport else None)


def test_prompt_pairs_per_target_from_the_concepts_spm_section():
    """One positive/neutral prompt for all targets is repeated; one per target is kept; none: the target itself and
    the unconditional prompt (prompt.py's defaults); another count is refused naming the section."""
    from omegaconf import OmegaConf

    from erasure.errors import UserError

    def concept(**spm):
        return OmegaConf.create({"name": "pets", "targets": ["a cat", "a dog"], **({"spm": spm} if spm else {})})

    assert SPM.per_target(concept()) == (["a cat", "a dog"], ["a cat", "a dog"], ["", ""])
    assert SPM.per_target(concept(positive=["an animal"], neutral=["a tree", "a car"])) == \
        (["a cat", "a dog"], ["an animal", "an animal"], ["a tree", "a car"])
    for ok in ({"neutral": ["a tree"]}, {"neutral": ["a tree", "a car"]}, {"positive": ["x"]}, {}):
        SPM.validate_concept(concept(**ok))
    for key in ("neutral", "positive"):
        with pytest.raises(UserError, match=f"concept.spm.{key} has 3 prompts for 2 targets"):
            SPM.validate_concept(concept(**{key: ["a", "b", "c"]}))


# ------------------------------------------------------------------------------------------- the training step

@pytest.mark.parametrize("sampler, query, seed, scale, rows", [  # i, k: 1, 3 and 0, 2
    ("student", "code", 1, (0.8, 1.2), "code"), ("teacher", "ddim", 4, (0.5, 0.6), "all")])
def test_training_step_against_a_second_route(sampler, query, seed, scale, rows):
    """One step (train_spm.py l.146-274) recomputed: the pair i, k and the dynamic resolution replayed from a copy of
    the generator; z by a hand DDIM loop of the sampling model (the membrane model, or the base) on [∅, target_i] at
    guidance 3 through the first k of the 4-step schedule's timesteps (751, 501, 251, 1); the query timestep
    999 - 1000 k // 4 (code) or the one z lives at (ddim); the erase loss on ε*(positive_i), ε*(neutral_i) at g = 2;
    the anchoring loss on [∅, a_3, ∅, a_4] (anchors from ``sample_anchors`` on the replayed generator, its own test
    above). Two targets with their own positive and neutral prompts, so that a step that picks the wrong row goes red;
    the membrane is moved off zero, so that the student and the base differ."""
    import copy

    from erasure.config import validate
    from erasure.models import load_models
    from erasure.session import Session, seed_everything
    from tests.test_method_steps import ddim, generator_copy, randint

    cfg = compose_cfg(["model=tiny", "concept=nudity", "concept.targets=[nudity,naked person]",
                       "+concept.spm={positive:[a nude body,a bare body],neutral:[a dressed person,a clothed body]}",
                       "method=spm", "method.ddim_steps=4", "method.erase_guidance=2.0", f"method.sampler={sampler}",
                       f"method.query_timestep={query}", f"trainer.seed={seed}", f"method.anchor_scale={list(scale)}",
                       f"method.anchor_rows={rows}"])
    method_cls, mcfg = validate(cfg)
    seed_everything(0)
    models = load_models(cfg.model, "cpu")
    base = copy.deepcopy(models.unet)
    sess = Session.create(cfg, models, method_cls, mcfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sess.trainable.items():
            if name.endswith("up.weight"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    student = models.unet
    m = sess.method

    def emb(texts):
        ids = models.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return models.text_encoder(ids)[0]

    def eps(unet, z, t, e):
        return unet(z, torch.as_tensor(t), encoder_hidden_states=e).sample

    r = generator_copy(m.ctx)
    i, k = randint(r, 0, 2), randint(r, 1, 4)
    h, w = 16 * randint(r, 4, 8) // 8, 16 * randint(r, 4, 8) // 8
    x_T = torch.randn((1, 4, h, w), generator=r)
    e_u, e_t = emb([""]), emb([["nudity", "naked person"][i]])
    timesteps = [751, 501, 251, 1]
    z = ddim(student if sampler == "student" else base, x_T, timesteps[:k], e_u, e_t, 3.0, 250)
    t = 999 - 1000 * k // 4 if query == "code" else timesteps[k]
    with torch.no_grad():
        positive = eps(base, z, t, emb([["a nude body", "a bare body"][i]]))
        neutral = eps(base, z, t, emb([["a dressed person", "a clothed body"][i]]))
    erase = ((eps(student, z, t, e_t) - (neutral - 2.0 * (positive - neutral))) ** 2).mean()
    anchors = sample_anchors(e_t, 4, r, scale)
    conds = torch.cat([e_u, anchors[2:3], e_u, anchors[3:4]]) if rows == "code" else anchors
    zs = z.expand(4, -1, -1, -1)
    with torch.no_grad():
        anchor_base = eps(base, zs, t, conds)
    anchor = ((eps(student, zs, t, conds) - anchor_base) ** 2).mean()

    terms = m.training_step(1)
    assert m.ctx.generator.get_state().equal(r.get_state())
    assert terms["erase"].item() == pytest.approx(erase.item(), rel=1e-4)
    assert terms["anchor"].item() == pytest.approx(anchor.item(), rel=1e-4) and anchor.item() > 0
    assert terms["loss"].item() == pytest.approx(erase.item() + 1000.0 * anchor.item(), rel=1e-4)


def test_without_latent_anchoring_the_loss_is_the_erase_loss():
    """pikachu/prompt.yaml action "erase" (latent_anchoring false): no anchors are drawn, the loss is L_erase."""

    def terms(anchoring: bool):
        sess = build_session(["model=tiny", "concept=nudity", "method=spm", "method.ddim_steps=4",
                              f"method.latent_anchoring={str(anchoring).lower()}"])[0]
        return sess.method.training_step(1)

    plain, anchored = terms(False), terms(True)
    assert set(plain) == {"loss", "erase"} and plain["loss"].equal(plain["erase"])
    assert plain["erase"].item() == anchored["erase"].item()  # the same draws up to the anchors


def test_dynamic_resolution_draws_four_to_seven_eighths_of_each_side():
    """train_util.py l.645-646: each latent side k/8 of the model's, k ~ U{4..7} (randint's upper bound excluded):
    on the tiny model's 16 x 16 latents every side 2k for k = 4..7 occurs in 200 draws and none other."""

    sess, models, _ = build_session(["model=tiny", "concept=nudity", "method=spm"])
    assert models.latent_shape[1:] == (16, 16)
    m = sess.method
    shapes = [m.latent_shape() for _ in range(200)]
    assert {s[0] for s in shapes} == {models.latent_shape[0]}
    assert {s[1] for s in shapes} == {s[2] for s in shapes} == {8, 10, 12, 14}
