"""ESD's two timestep modes (baselines/esd.py, ``method.timesteps``), against numbers worked out by hand from the
official CompVis script: rohitgandikota/erasing at 6eb7dc8f266e3cdcbbf6ae9e030fbd44f03bb2ab,
train-scripts/train-esd.py l.226-247, ldm/models/diffusion/ddim.py l.149-195, ldm/modules/diffusionmodules/util.py
l.46-74.

By hand, for S = ddim_steps and N = 1000 DDPM steps:
* ldm's 'uniform' DDIM schedule is range(0, N, N // S) + 1; S = 50: 1, 21, ..., 981; t_start = -1 drops 981, so the
  sampler visits 961, 941, ..., 1 (49 timesteps) and each step goes 20 DDPM steps down (from 1: to alphas_cumprod[0]);
* the loop breaks after the step whose index (48 for 961 ... 0 for 1) is t_enc - 1: 50 - t_enc steps, and all 49 for
  t_enc = 0 (the break never fires), so t_enc = 0 and 1 both give the fully denoised z;
* t_enc_ddpm ~ U[round(t_enc / S * N), round((t_enc + 1) / S * N)) = [20 t_enc, 20 t_enc + 20) for S = 50;
* the teacher's two queries and the student's query are all at t_enc_ddpm, on the same z.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from baselines.esd import compvis_draw
from erasure.config import validate
from tests.conftest import assert_refused_in_one_sentence, build_method, compose_cfg

# t_enc -> (DDIM steps taken, first and last timestep stepped from, DDPM timestep z lies at, t_enc_ddpm's range
# [lo, hi] inclusive), S = 50, worked out by hand from the rules in the module docstring
HAND_S50 = {
    0: (49, 961, 1, 0, (0, 19)),
    1: (49, 961, 1, 0, (20, 39)),
    2: (48, 961, 21, 1, (40, 59)),
    25: (25, 961, 481, 461, (500, 519)),
    47: (3, 961, 921, 901, (940, 959)),
    49: (1, 961, 961, 941, (980, 999)),
}
# the same for S = 10 (schedule 1, 101, ..., 901; 901 dropped; steps 100 DDPM steps down): t_enc -> (steps, z's
# timestep, t_enc_ddpm range)
HAND_S10 = {0: (9, 0, (0, 99)), 1: (9, 0, (100, 199)), 2: (8, 1, (200, 299)), 5: (5, 301, (500, 599)),
            9: (1, 701, (900, 999))}


def build(extra: list[str] = ()):
    """ESD on the tiny random-weight model, as erasure.trainer.train sets it up (tests/test_baselines.py's build)."""
    method, ctx, _ = build_method(["model=tiny", "concept=nudity", "method=esd", *extra])
    return method, ctx


def perturb_student(ctx) -> None:
    """Make the student differ from the frozen teacher, so that a query sent to the wrong model shows."""
    with torch.no_grad():
        for p in ctx.trainable.values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))


def ldm_alphas_cumprod() -> torch.Tensor:
    """SD v1's noise schedule as ldm builds it (make_beta_schedule 'linear', util.py l.21-25; v1-inference.yaml
    linear_start 0.00085, linear_end 0.012), in float64."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0)


def ldm_ddim(eps_fn, x, visited: list[int], stride: int, emb_u, emb_c, guidance: float) -> torch.Tensor:
    """ldm's p_sample_ddim with eta 0 (ddim.py l.205-259), written out: alpha_prev = alphas_cumprod[t - stride],
    alphas_cumprod[0] below 0 (util.py l.65-66); the UNet queried at the DDIM timestep t itself."""
    ac = ldm_alphas_cumprod()
    with torch.no_grad():
        for t in visited:
            e_u, e_c = eps_fn(x, t, emb_u), eps_fn(x, t, emb_c)
            e = e_u + guidance * (e_c - e_u)
            a_t, a_prev = float(ac[t]), float(ac[max(t - stride, 0)])
            pred_x0 = (x - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
            x = math.sqrt(a_prev) * pred_x0 + math.sqrt(1 - a_prev) * e
    return x


def official_draws(seed: int, ddim_steps: int, latent_shape) -> tuple[int, int, int, torch.Tensor]:
    """train-esd.py's draws in its order (l.218 word, l.226 t_enc, l.231 t_enc_ddpm, l.233 start_code), from one
    generator: the bins written out as 1000 t_enc / S."""
    g = torch.Generator().manual_seed(seed)
    word = int(torch.randint(0, 1, (1,), generator=g))  # one target (concept=nudity)
    t_enc = int(torch.randint(0, ddim_steps, (1,), generator=g))
    width = 1000 // ddim_steps  # S = 50 and 10 divide 1000: round() is exact here
    t_ddpm = int(torch.randint(width * t_enc, width * (t_enc + 1), (1,), generator=g))
    x_T = torch.randn((1, *latent_shape), generator=g)
    return word, t_enc, t_ddpm, x_T


class Spy:
    """Delegates to the frozen teacher and records the timestep of every call (one call per DDIM step, then the
    query)."""

    def __init__(self, teacher):
        self.teacher, self.calls = teacher, []

    def __call__(self, x, t, emb):
        self.calls.append(t.tolist() if torch.is_tensor(t) else t)
        return self.teacher(x, t, emb)


# ---------------------------------------------------------------- compvis (default): the official script

def test_default_is_compvis():
    assert compose_cfg(["method=esd"]).method.timesteps == "compvis"


def test_draws_follow_the_official_formulas_for_many_seeds():
    m, ctx = build()
    assert m.cfg.timesteps == "compvis" and m.cfg.ddim_steps == 50
    seen_t_enc, seen_offset_in_bin = set(), set()
    for seed in range(300):
        ctx.generator.manual_seed(seed)
        d = m.draw(1)
        word, t_enc, t_ddpm, x_T = official_draws(seed, 50, ctx.models.latent_shape)
        assert (d["target_index"], d["t_enc"], d["query_timestep"]) == (word, t_enc, t_ddpm)
        torch.testing.assert_close(d["x_T"], x_T, rtol=0, atol=0)
        assert 0 <= t_enc <= 49 and 20 * t_enc <= t_ddpm <= 20 * t_enc + 19
        z_at = 0 if t_enc <= 1 else 20 * t_enc - 39  # by hand: 961 - 20 (50 - t_enc) + ... = 20 t_enc - 39
        if t_enc >= 2:
            assert 39 <= t_ddpm - z_at <= 58  # the "39 to 58 DDPM steps noisier"
        if t_enc in HAND_S50:
            lo, hi = HAND_S50[t_enc][4]
            assert lo <= t_ddpm <= hi and HAND_S50[t_enc][3] == z_at
        seen_t_enc.add(t_enc)
        seen_offset_in_bin.add(t_ddpm - 20 * t_enc)
    assert seen_offset_in_bin == set(range(20)) and len(seen_t_enc) >= 45


@pytest.mark.parametrize("t_enc", sorted(HAND_S50))
def test_the_ddim_steps_and_the_query_timestep_by_hand(t_enc):
    """teacher_work on a draw with the given t_enc: the sampler steps from exactly the hand-listed timesteps, z is
    ldm's DDIM written out, and both teacher queries come at t_enc_ddpm (not at z's own timestep)."""
    m, ctx = build()
    steps, first, last, z_at, (lo, hi) = HAND_S50[t_enc]
    query = (lo + hi) // 2
    x_T = torch.randn((1, *ctx.models.latent_shape), generator=torch.Generator().manual_seed(t_enc))
    spy = Spy(ctx.teacher)
    ctx.teacher = spy
    work = m.teacher_work([dict(target_index=0, t_enc=t_enc, query_timestep=query, x_T=x_T)])[0]
    *stepped, queried = spy.calls
    assert len(stepped) == steps and stepped[0] == first and stepped[-1] == last
    assert stepped == list(range(first, last - 1, -20))
    assert queried == [query, query]  # eps*(z, ∅) and eps*(z, c), one batched call
    assert int(work["timestep"]) == query and int(work["z_timestep"]) == z_at
    z = ldm_ddim(spy.teacher, x_T, list(range(961, last - 1, -20)), 20, m.emb_uncond, m.emb_targets[:1], 3.0)
    torch.testing.assert_close(work["z_t"], z, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_compvis_loss_equals_the_esd_formula_by_a_second_route(seed):
    """training_step (student sampling, the default) against: the official draws from the same generator, ldm's
    DDIM written out with the student, and the three UNet calls made here at the hand-computed t_enc_ddpm."""
    m, ctx = build(["method.ddim_steps=10"])
    perturb_student(ctx)
    ctx.generator.manual_seed(seed)
    loss = m.training_step(1)["loss"].item()

    _, t_enc, t_ddpm, x_T = official_draws(seed, 10, ctx.models.latent_shape)
    steps, z_at, (lo, hi) = HAND_S10[t_enc] if t_enc in HAND_S10 else (
        9 if t_enc == 0 else 10 - t_enc, 0 if t_enc <= 1 else 100 * t_enc - 199, (100 * t_enc, 100 * t_enc + 99))
    assert lo <= t_ddpm <= hi
    visited = list(range(801, 0, -100))[:steps]  # ldm: 1, 101, ..., 901 without 901, noisiest first

    def student(x, t, e):
        return ctx.unet(x, t, encoder_hidden_states=e).sample

    z = ldm_ddim(student, x_T, visited, 100, m.emb_uncond, m.emb_targets[:1], 3.0)  # train-esd.py l.237
    with torch.no_grad():
        e_0 = ctx.teacher(z, t_ddpm, m.emb_uncond)  # l.239
        e_p = ctx.teacher(z, t_ddpm, m.emb_targets[:1])  # l.240
        e_n = student(z, t_ddpm, m.emb_targets[:1])  # l.243
        by_hand = F.mse_loss(e_n, e_0 - 1.0 * (e_p - e_0)).item()  # l.247, negative_guidance 1
        e_0z = ctx.teacher(z, z_at, m.emb_uncond)
        e_pz = ctx.teacher(z, z_at, m.emb_targets[:1])
        at_z = F.mse_loss(student(z, z_at, m.emb_targets[:1]), e_0z - (e_pz - e_0z)).item()
    assert loss == pytest.approx(by_hand, rel=2e-6)  # measured: within 1.5e-7
    # the query timestep matters even on random weights (here 2.5e-4 to 4e-3 relative): the test tells them apart
    assert abs(at_z - loss) > 1e-4 * loss


def test_compvis_teacher_bank_matches_one_at_a_time():
    """sampler=teacher batches trajectories of different lengths (49 steps for t_enc = 0 and 1 included)."""
    m, ctx = build(["method.sampler=teacher", "method.ddim_steps=10"])
    assert m.supports_teacher_bank
    draws = [dict(target_index=0, t_enc=t, query_timestep=HAND_S10[t][2][0] + 7,
                  x_T=torch.randn((1, *ctx.models.latent_shape), generator=torch.Generator().manual_seed(t)))
             for t in (0, 1, 2, 9)]
    batched = m.teacher_work(draws)
    for d, b in zip(draws, batched):
        one = m.teacher_work([d])[0]
        assert int(b["timestep"]) == int(one["timestep"]) == d["query_timestep"]
        assert int(b["z_timestep"]) == HAND_S10[d["t_enc"]][1]
        for key in ("z_t", "teacher_u", "teacher_c"):
            torch.testing.assert_close(b[key], one[key], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- diffusers: unchanged

# losses of three training steps before method.timesteps existed (the code at the parent commit, same set-up:
# ddim_steps 6, student perturbed by perturb_student, generator seed 0), per sampler
BEFORE = {"student": [0.11072336882352829, 0.12599125504493713, 0.13743038475513458],
          "teacher": [0.11189168691635132, 0.1391257792711258, 0.14330993592739105]}


@pytest.mark.parametrize("sampler", ["student", "teacher"])
def test_diffusers_mode_is_unchanged(sampler):
    m, ctx = build(["method.timesteps=diffusers", "method.ddim_steps=6", f"method.sampler={sampler}"])
    d = m.draw(1)
    assert sorted(d) == ["steps_taken", "target_index", "x_T"]
    m, ctx = build(["method.timesteps=diffusers", "method.ddim_steps=6", f"method.sampler={sampler}"])
    perturb_student(ctx)
    losses = [m.training_step(step)["loss"].item() for step in (1, 2, 3)]
    assert losses == pytest.approx(BEFORE[sampler], rel=1e-5)
    # queried at z's own timestep: the scheduler's timesteps[k] (esd_sd.py l.129)
    work = m.teacher_work([dict(d, steps_taken=4)])[0]
    ctx.models.scheduler.set_timesteps(6)
    assert int(work["timestep"]) == int(work["z_timestep"]) == int(ctx.models.scheduler.timesteps[4])


def test_bad_timesteps_mode_is_refused_in_one_sentence():
    assert_refused_in_one_sentence(["model=tiny", "concept=nudity", "method=esd", "method.timesteps=ddpm"],
                                   "method.timesteps must be one of compvis, diffusers, got 'ddpm'")


@pytest.mark.parametrize("steps, words", [(2, None), (1, "method.ddim_steps must be at least 2, got 1")])
def test_ddim_steps_edge(steps, words):
    """Two DDIM steps are the fewest the CompVis draw can use (the schema's general rule for counts allows 1)."""
    argv = ["model=tiny", "concept=nudity", "method=esd", f"method.ddim_steps={steps}"]
    if words is None:
        validate(compose_cfg(argv))
    else:
        assert_refused_in_one_sentence(argv, words)


def test_the_query_bin_follows_the_schedulers_own_number_of_timesteps():
    """compvis_draw reads N from the scheduler (1000 is written out in train-esd.py l.228-231): on a 500-step
    scheduler the bin of t_enc at S = 10 is [50 t_enc, 50 t_enc + 50), drawn from the same generator."""
    m, ctx = build(["method.ddim_steps=10"])
    sched = ctx.models.scheduler
    ctx.models.scheduler = type(sched).from_config(sched.config, num_train_timesteps=500)
    try:
        for seed in range(20):
            ctx.generator.manual_seed(seed)
            d = compvis_draw(ctx, 10)
            g = torch.Generator().manual_seed(seed)
            t_enc = int(torch.randint(0, 10, (1,), generator=g))
            query = int(torch.randint(50 * t_enc, 50 * t_enc + 50, (1,), generator=g))
            assert (d["t_enc"], int(d["query"])) == (t_enc, query) and d["query"].dtype == torch.long
    finally:
        ctx.models.scheduler = sched
