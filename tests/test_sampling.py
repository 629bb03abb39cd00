"""sample_to_step against two independent routes: diffusers' own pipeline loop, and the DDIM formula by hand."""
import pytest
import torch

from erasure.sampling import ddim_timesteps, eps_all, sample_along, sample_to_step
from erasure.teacher import Teacher
from erasure.params import select_params
from tests.conftest import compose_cfg


def _unet_fn(unet):
    return lambda x, t, e: unet(x, t, encoder_hidden_states=e).sample


@pytest.mark.parametrize("stop", [1, 4, 9])
def test_sample_to_step_equals_the_diffusers_pipeline(tiny_models, stop):
    m = tiny_models
    T, g = 10, 7.5
    x_T = torch.randn(1, *m.latent_shape, generator=torch.Generator().manual_seed(3))
    conds = [m.encode_text([""]), m.encode_text(["a photo of a cat"])]
    ours, t_at = sample_to_step(_unet_fn(m.unet), m.scheduler, x_T, conds, stop, T, g)

    captured = {}

    def grab(pipe, i, t, kw):
        captured[i] = kw["latents"].clone()
        return kw

    pipe = m.pipeline(scheduler=m.scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe("a photo of a cat", num_inference_steps=T, guidance_scale=g, latents=x_T.clone(), output_type="latent",
         height=m.resolution, width=m.resolution, callback_on_step_end=grab)
    # the pipeline's callback after step index i holds the latents after i+1 steps
    torch.testing.assert_close(ours, captured[stop - 1], rtol=1e-5, atol=1e-5)
    assert int(t_at) == int(m.scheduler.timesteps[stop])


def test_one_ddim_step_by_hand(tiny_models):
    m = tiny_models
    T = 35
    x_T = torch.randn(1, *m.latent_shape, generator=torch.Generator().manual_seed(0))
    conds = [m.encode_text([""]), m.encode_text(["nudity"])]
    z1, _ = sample_to_step(_unet_fn(m.unet), m.scheduler, x_T, conds, 1, T, 3.0)
    ts = ddim_timesteps(m.scheduler, T)
    # SD v1.4 settings: steps_offset=1, 1000 train steps, 35 inference steps -> ratio 28, first t = 34*28+1
    assert int(ts[0]) == 34 * 28 + 1 and int(ts[1]) == 33 * 28 + 1
    with torch.no_grad():
        eu, ec = eps_all(_unet_fn(m.unet), x_T, ts[0], conds)
    eps = eu + 3.0 * (ec - eu)
    ac = m.scheduler.alphas_cumprod
    a_t, a_prev = ac[int(ts[0])], ac[int(ts[1])]
    x0 = (x_T - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    expected = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(z1, expected, rtol=1e-4, atol=1e-5)


def test_zero_steps_is_x_T_and_range_is_checked(tiny_models):
    m = tiny_models
    x_T = torch.randn(1, *m.latent_shape)
    conds = [m.encode_text([""]), m.encode_text(["x"])]
    z, t = sample_to_step(_unet_fn(m.unet), m.scheduler, x_T, conds, 0, 35, 7.5)
    assert torch.equal(z, x_T) and int(t) == 953
    with pytest.raises(ValueError):
        sample_to_step(_unet_fn(m.unet), m.scheduler, x_T, conds, 35, 35, 7.5)


def test_teacher_swaps_in_frozen_params_without_copying_the_unet(tiny_models):
    m = tiny_models
    trainable = select_params(m.unet, compose_cfg(["params=to_out"]).params)
    teacher = Teacher(m.unet, trainable)
    x = torch.randn(1, *m.latent_shape)
    e = m.encode_text(["a"])
    before = teacher(x, 500, e)
    with torch.no_grad():
        for p in trainable.values():
            p.add_(0.05)
    # the student moved, the teacher did not
    student = m.unet(x, 500, encoder_hidden_states=e).sample
    assert not torch.allclose(student, before)
    torch.testing.assert_close(teacher(x, 500, e), before)
    assert teacher.numel() == sum(p.numel() for p in trainable.values()) < sum(p.numel() for p in m.unet.parameters()) / 10


def test_pure_low_precision_teacher_is_a_half_precision_copy_run_as_is(tiny_models):
    """trainer.teacher_precision=pure: the frozen copy of the trained subset, the inputs and every op in bf16 with
    autocast off. Second route: a deep bf16 copy of the UNet (trained parameters at their base values) called
    directly on bf16 inputs, as a diffusers half-precision pipeline would."""
    import copy

    m = tiny_models
    trainable = select_params(m.unet, compose_cfg(["params=to_out"]).params)
    by_hand = copy.deepcopy(m.unet).to(torch.bfloat16)
    for name, p in m.unet.named_parameters():  # the trainer keeps trained weights fp32, the frozen ones bf16
        if name not in trainable:
            p.data = p.data.to(torch.bfloat16)
    teacher = Teacher(m.unet, trainable, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in teacher.params.values())
    with torch.no_grad():
        for p in trainable.values():
            p.add_(0.05)  # the student moves; the teacher must not
    x = torch.randn(2, *m.latent_shape)
    e = m.encode_text(["a red circle", ""])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer's context: the teacher switches it off
        got = teacher(x, 500, e)
    with torch.no_grad():
        want = by_hand(x.to(torch.bfloat16), 500, encoder_hidden_states=e.to(torch.bfloat16)).sample.float()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_teacher_precision_must_be_autocast_or_pure(tmp_path):
    from erasure.errors import UserError
    from erasure.trainer import train

    cfg = compose_cfg(["model=tiny", "trainer.teacher_precision=half", "trainer.iterations=1", "trainer.preview_every=0"])
    with pytest.raises(UserError, match="teacher_precision=half is not valid"):
        train(cfg, tmp_path / "run")


def test_an_extra_term_is_added_to_the_guided_eps_by_hand(tiny_models):
    """``extra`` (All-but-One's delta) enters the step as eps(∅) + g(eps(c) - eps(∅)) + extra, computed here with the
    DDIM formula by hand; a step where ``extra`` returns None is plain guidance."""
    m = tiny_models
    T, g = 35, 3.0
    x_T = torch.randn(1, *m.latent_shape, generator=torch.Generator().manual_seed(1))
    conds = [m.encode_text([""]), m.encode_text(["nudity"]), m.encode_text(["a dress"])]
    add = 0.3 * torch.randn(1, *m.latent_shape, generator=torch.Generator().manual_seed(2))
    seen = []

    def extra(i, eps):
        seen.append((i, [e is not None for e in eps]))
        return add if i == 0 else None

    z1, _ = sample_to_step(_unet_fn(m.unet), m.scheduler, x_T, conds, 1, T, g, extra=extra)
    assert seen == [(0, [True, True, True])]  # every condition's eps reaches extra when ``needed`` is not given
    ts = ddim_timesteps(m.scheduler, T)
    with torch.no_grad():
        eu, ec, _ = eps_all(_unet_fn(m.unet), x_T, ts[0], conds)
    ac = m.scheduler.alphas_cumprod
    a_t, a_prev = ac[int(ts[0])], ac[int(ts[1])]

    def ddim(x, eps):
        return a_prev.sqrt() * (x - (1 - a_t).sqrt() * eps) / a_t.sqrt() + (1 - a_prev).sqrt() * eps

    torch.testing.assert_close(z1, ddim(x_T, eu + g * (ec - eu) + add), rtol=1e-4, atol=1e-5)
    # and the step after returns None: the two-step result is the one-step result stepped with plain guidance
    z2, _ = sample_to_step(_unet_fn(m.unet), m.scheduler, x_T, conds, 2, T, g, extra=extra)
    z2_plain_second, _ = sample_along(_unet_fn(m.unet), m.scheduler, z1, conds[:2], [int(ts[1])], [1], T, g)
    torch.testing.assert_close(z2, z2_plain_second, rtol=1e-4, atol=1e-5)


def test_sample_along_checks_its_step_counts(tiny_models):
    """0 .. len(timesteps) steps are accepted (0 returns x_T at timesteps[0]); a negative count or one past the list
    is refused."""
    m = tiny_models
    x_T = torch.randn(2, *m.latent_shape, generator=torch.Generator().manual_seed(4))
    conds = [m.encode_text(["", ""]), m.encode_text(["x", "x"])]
    along = [int(t) for t in ddim_timesteps(m.scheduler, 10)[:3]]
    z, at = sample_along(_unet_fn(m.unet), m.scheduler, x_T, conds, along, [0, 3], 10, 7.5)
    assert torch.equal(z[0], x_T[0]) and at.tolist() == [along[0], max(along[2] - 100, 0)]
    assert at.dtype == torch.long  # a timestep the UNet and the scheduler index with, not a float
    for bad in ([-1, 1], [1, 4]):
        with pytest.raises(ValueError, match=r"steps_taken must be in \[0, 3\]"):
            sample_along(_unet_fn(m.unet), m.scheduler, x_T, conds, along, bad, 10, 7.5)


def test_needed_limits_the_conditions_evaluated_per_step(tiny_models):
    """``needed(i)`` names the extra conditions read at step i (All-but-One's window): only those reach the UNet, the
    others arrive at ``extra`` as None."""
    m = tiny_models
    x_T = torch.randn(1, *m.latent_shape, generator=torch.Generator().manual_seed(5))
    conds = [m.encode_text([""]), m.encode_text(["nudity"]), m.encode_text(["a dress"]), m.encode_text(["a coat"])]
    rows, seen = [], []
    unet = _unet_fn(m.unet)

    def counting(x, t, e):
        rows.append(e.shape[0])
        return unet(x, t, e)

    def extra(i, eps):
        seen.append([e is not None for e in eps])
        return None

    sample_to_step(counting, m.scheduler, x_T, conds, 3, 10, 7.5, extra=extra, needed=lambda i: [3] if i == 1 else [])
    assert sum(rows) == 2 + 3 + 2
    assert seen == [[True, True, False, False], [True, True, False, True], [True, True, False, False]]
