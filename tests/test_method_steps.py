"""Each baseline's training step (ESD, SDD, Ablating Concepts, Forget-Me-Not) against a second route on the tiny model,
and the optimizer settings reaching AdamW, with two updates checked against a hand AdamW.

The second route never calls the step's own helpers: the step's randomness is drawn again from a copy of the method's
generator (in the order the method documents), z_t is sampled with a DDIM loop and a noise schedule written out here,
every epsilon comes from a plain UNet call (a copy holding the base, EMA or student weights), and the loss is
assembled by hand. Where the student and the teacher would give the same numbers (before any update), the student
is moved off the base first, so that a step that asks the wrong model goes red.
"""
from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import build_method, build_session, compose_cfg

N_TRAIN = 1000  # the tiny model's scheduler: SD v1.4's num_train_timesteps
# SD v1.4's noise schedule ("scaled_linear", beta 0.00085 .. 0.012), written out
ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, N_TRAIN, dtype=torch.float64) ** 2, 0)


def generator_copy(ctx) -> torch.Generator:
    g = torch.Generator()
    g.set_state(ctx.generator.get_state())
    return g


def randint(g: torch.Generator, low: int, high: int) -> int:
    return int(torch.randint(low, high, (1,), generator=g))


def eps(unet, z, t, emb):
    return unet(z, torch.as_tensor(t), encoder_hidden_states=emb).sample


@torch.no_grad()
def ddim(unet, x, timesteps: list[int], emb_u, emb_c, guidance: float, stride: int) -> torch.Tensor:
    """Guided DDIM, eta 0, through ``timesteps``: x0 = (x - sqrt(1-a) e) / sqrt(a), x' = sqrt(a') x0 + sqrt(1-a') e,
    a' = alpha-bar at t - stride (alpha-bar at 0 below 0: set_alpha_to_one false)."""
    for t in timesteps:
        e_u, e_c = eps(unet, x, t, emb_u), eps(unet, x, t, emb_c)
        e = e_u + guidance * (e_c - e_u)
        a, a_prev = ALPHAS_CUMPROD[t], ALPHAS_CUMPROD[max(t - stride, 0)]
        x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
        x = (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e).float()
    return x


def noised(x0, noise, t):
    a = ALPHAS_CUMPROD[t].float().view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def moved(module, seed: int, scale: float = 0.05, names=None) -> None:
    """Add seeded noise to ``module``'s parameters (all, or those in ``names``)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if names is None or name in names:
                p.add_(scale * torch.randn(p.shape, generator=g))


def with_weights(unet, values: dict[str, torch.Tensor]):
    """A copy of ``unet`` holding ``values`` (by name) in place of its own."""
    other = copy.deepcopy(unet)
    with torch.no_grad():
        named = dict(other.named_parameters())
        for name, v in values.items():
            named[name].copy_(v)
    return other


def grad_of(loss, p):
    return torch.autograd.grad(loss, [p])[0]


def close(a, b, rel=1e-4):
    """Close up to float32 rounding of batched vs single UNet calls, relative to the size of ``b``."""
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * float(b.abs().max()))


def one_trained(ctx, pattern: str):
    return next((n, p) for n, p in ctx.trainable.items() if pattern in n)


# --------------------------------------------------------------------------------------------------------------- ESD

@pytest.mark.parametrize("targets, seed, word", [(["nudity"], 3, 0), (["nudity", "naked", "nude"], 3, 1)])
def test_esd_step_is_the_negatively_guided_target_of_the_frozen_teacher_at_the_students_z_t(targets, seed, word):
    """train-esd.py with S = 4: the word drawn from the targets (l.218), t_enc ~ U{0..3}, the query t_enc_ddpm ~
    U[250 t_enc, 250 t_enc + 250), x_T; z from the student (sampler: student) along ldm's list 501, 251, 1 for 3, 3,
    2, 1 steps (t_enc = 0..3); target eps*(z, ∅) - eta (eps*(z, c) - eps*(z, ∅)) from the frozen base at the query
    timestep, c the drawn word alone (with three targets: the middle one)."""
    eta, guidance = 2.0, 3.0
    m, ctx, _ = build_method(["model=tiny", "concept=nudity", "method=esd", "method.ddim_steps=4", f"method.eta={eta}",
                              f"method.start_guidance={guidance}", "concept.targets=[" + ",".join(targets) + "]"],
                             generator_seed=seed)
    base = copy.deepcopy(ctx.unet)
    moved(ctx.unet, 1, names=set(ctx.trainable))
    emb_u, emb_c = ctx.models.encode_text([""]), ctx.models.encode_text([targets[word]])

    g = generator_copy(ctx)
    assert randint(g, 0, len(targets)) == word
    t_enc = randint(g, 0, 4)
    query = randint(g, 250 * t_enc, 250 * t_enc + 250)
    x_T = torch.randn((1, *ctx.models.latent_shape), generator=g)
    steps = {0: 3, 1: 3, 2: 2, 3: 1}[t_enc]
    assert steps >= 2  # the seed gives a z that depends on who samples it
    z = ddim(ctx.unet, x_T, [501, 251, 1][:steps], emb_u, emb_c, guidance, stride=250)
    with torch.no_grad():
        base_u, base_c = eps(base, z, query, emb_u), eps(base, z, query, emb_c)
    name, p = one_trained(ctx, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")

    def hand_loss(z):
        return ((eps(ctx.unet, z, query, emb_c) - (base_u - eta * (base_c - base_u))) ** 2).mean()

    expected = hand_loss(z)
    expected_grad = grad_of(expected, p)
    loss = m.training_step(1)["loss"]
    close(loss, expected.detach())
    close(grad_of(loss, p), expected_grad)
    assert ctx.generator.get_state().equal(g.get_state())  # the step drew exactly these numbers
    # z sampled by the frozen base instead gives another loss: the test sees who samples
    z_base = ddim(base, x_T, [501, 251, 1][:steps], emb_u, emb_c, guidance, stride=250)
    assert hand_loss(z_base).item() != pytest.approx(expected.item(), rel=1e-3)


# --------------------------------------------------------------------------------------------------------------- SDD

def test_sdd_step_draws_z_t_with_the_ema_teacher_and_pulls_the_concept_to_the_students_empty_prompt():
    """train_sdd.py with S = 4: k ~ U{0..3}, x_T; z_t after k DDIM steps of the scheduler's schedule 751, 501, 251, 1
    sampled by the EMA teacher (guidance 3 on ", ".join(concepts)); loss MSE(eps_student(z_t, c), sg[eps_student(z_t,
    ∅)]) at z_t's timestep. Base, EMA teacher and student hold three different weights here."""
    m, ctx, _ = build_method(["model=tiny", "concept=nudity", "method=sdd", "method.ddim_steps=4"], generator_seed=5)
    base = copy.deepcopy(ctx.unet)
    moved(ctx.unet, 1, names=set(ctx.trainable))  # the student
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, v in m.ema.params.items():  # the EMA teacher: neither the base nor the student
            v.add_(0.05 * torch.randn(v.shape, generator=g))
    ema = with_weights(ctx.unet, m.ema.params)
    emb_u, emb_c = ctx.models.encode_text([""]), ctx.models.encode_text(["nudity"])

    g = generator_copy(ctx)
    k = randint(g, 0, 4)
    x_T = torch.randn((1, *ctx.models.latent_shape), generator=g)
    assert k == 3  # the seed gives a z_t that depends on who samples it
    timesteps = [751, 501, 251, 1]
    name, p = one_trained(ctx, "attn2.to_k")

    def hand_loss(sampler):
        z = ddim(sampler, x_T, timesteps[:k], emb_u, emb_c, 3.0, stride=250)
        with torch.no_grad():
            student_u = eps(ctx.unet, z, timesteps[k], emb_u)
        return ((eps(ctx.unet, z, timesteps[k], emb_c) - student_u) ** 2).mean()

    expected = hand_loss(ema)
    expected_grad = grad_of(expected, p)
    loss = m.training_step(1)["loss"]
    close(loss, expected.detach())
    close(grad_of(loss, p), expected_grad)
    assert ctx.generator.get_state().equal(g.get_state())
    # drawn with the student or with the base instead, z_t and so the loss differ
    for other in (ctx.unet, base):
        assert hand_loss(other).item() != pytest.approx(expected.item(), rel=1e-3)


def test_sdd_cycles_through_its_concepts_and_samples_on_all_of_them_joined():
    """train_sdd.py with three concepts ('iterative'): step n erases concept (n - 1) mod 3 while z_t is always sampled on
    ", ".join(concepts); k ~ U{0..S-1} includes 0 (z_t = x_T at the first timestep). Three steps by hand."""
    targets = ["nudity", "naked man", "nude woman"]
    m, ctx, _ = build_method(["model=tiny", "concept=nudity", "method=sdd", "method.ddim_steps=4",
                              f"concept.targets=[{','.join(targets)}]"], generator_seed=0)
    moved(ctx.unet, 1, names=set(ctx.trainable))  # the student moved away from the EMA teacher (= the base)
    ema = with_weights(ctx.unet, m.ema.params)
    emb_u, emb_joined = ctx.models.encode_text([""]), ctx.models.encode_text(["nudity, naked man, nude woman"])
    timesteps = [751, 501, 251, 1]
    drawn = []
    for step in (1, 2, 3):
        g = generator_copy(ctx)
        k = randint(g, 0, 4)
        x_T = torch.randn((1, *ctx.models.latent_shape), generator=g)
        drawn.append(k)
        z = ddim(ema, x_T, timesteps[:k], emb_u, emb_joined, 3.0, stride=250)
        emb_c = ctx.models.encode_text([targets[(step - 1) % 3]])
        with torch.no_grad():
            student_u = eps(ctx.unet, z, timesteps[k], emb_u)
        expected = ((eps(ctx.unet, z, timesteps[k], emb_c) - student_u) ** 2).mean()
        close(m.training_step(step)["loss"].detach(), expected.detach())
        assert ctx.generator.get_state().equal(g.get_state())
    assert 0 in drawn, drawn  # the seed draws k = 0 once: U{0..S-1}, not U{1..S-1}


# ---------------------------------------------------------------------------------------------------------- Ablating

@torch.no_grad()
def pipeline_latents(ctx, prompts: list[str], steps: int, guidance: float, batch: int, seed: int) -> torch.Tensor:
    """Second route to the base model's images: diffusers' own StableDiffusionPipeline on the prompt strings (its own
    text encoding and noise), one generator drawn batch by batch, latents out."""
    from diffusers import StableDiffusionPipeline

    mod = ctx.models
    pipe = StableDiffusionPipeline(vae=mod.vae, text_encoder=mod.text_encoder, tokenizer=mod.tokenizer, unet=mod.unet,
                                   scheduler=copy.deepcopy(mod.generation_scheduler), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    out = [pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=g,
                height=mod.resolution, width=mod.resolution, output_type="latent").images
           for i in range(0, len(prompts), batch)]
    return torch.cat(out)


def test_ablating_step_targets_the_current_models_anchor_epsilon_on_the_base_models_anchor_images():
    """Anchors: the base model's images of the anchor prompts, prompt i % 7 for image i (the pipeline as second
    route). The step: a permutation of the 9 anchors, the last two taken for the ablation half-batch (noise, t ~
    U{0..999}), the next two for the prior half (noise, t); captions nudity / nsfw by image index; ablation term
    = squared error summed over channels, mean over batch and space, against the current model's eps at the anchor
    prompt (stop-gradient); prior = MSE to the noise, weighted 0.5. The student is moved off the base first."""
    prompts = ["people", "body", "boy", "girl", "women", "man", "child"]
    m, ctx, _ = build_method(["model=tiny", "concept=nudity", "method=ablating", "method.num_anchor_images=9",
                              "method.anchor_steps=2", "method.batch_size=2", "method.prior_loss_weight=0.5"])
    # the generator was fresh (seed 0) when the anchors were generated: batches of 4, guidance 7.5
    assert m.anchor_prompts == [prompts[i % 7] for i in range(9)]
    close(m.latents, pipeline_latents(ctx, m.anchor_prompts, 2, 7.5, 4, seed=0))
    base = copy.deepcopy(ctx.unet)
    moved(ctx.unet, 1, names=set(ctx.trainable))

    g = generator_copy(ctx)
    order = torch.randperm(9, generator=g).tolist()
    idx = [order.pop(), order.pop()]
    noise = torch.randn((2, *ctx.models.latent_shape), generator=g)
    t = torch.randint(0, N_TRAIN, (2,), generator=g)
    pidx = [order.pop(), order.pop()]
    noise_p = torch.randn((2, *ctx.models.latent_shape), generator=g)
    tp = torch.randint(0, N_TRAIN, (2,), generator=g)
    z, zp = noised(m.latents[idx], noise, t), noised(m.latents[pidx], noise_p, tp)
    enc = ctx.models.encode_text
    emb_anchor = enc([prompts[i % 7] for i in idx])
    emb_caption = enc([["nudity", "nsfw"][i % 2] for i in idx])
    emb_prior = enc([prompts[i % 7] for i in pidx])
    with torch.no_grad():
        anchor_eps = eps(ctx.unet, z, t, emb_anchor)
        assert (anchor_eps - eps(base, z, t, emb_anchor)).abs().max() > 1e-3  # current model != base
    ablation = ((eps(ctx.unet, z, t, emb_caption) - anchor_eps) ** 2).sum(1).mean()
    prior = ((eps(ctx.unet, zp, tp, emb_prior) - noise_p) ** 2).mean()
    expected = ablation + 0.5 * prior
    name, p = one_trained(ctx, "attn2.to_q")
    expected_grad = grad_of(expected, p)

    terms = m.training_step(1)
    close(terms["ablation"], ablation.detach())
    close(terms["prior"], prior.detach())
    close(terms["loss"], expected.detach())
    close(grad_of(terms["loss"], p), expected_grad)
    assert ctx.generator.get_state().equal(g.get_state())


def test_ablating_numpy_generator_is_seeded_from_the_run_generator_after_the_anchors():
    """The caption generator's seed is the run generator's next draw in [0, 2^31) once the anchor images are made (the
    pipeline's one randn for 2 images): reproducible under trainer.seed, and the run generator is where it should be."""
    import numpy as np

    m, ctx, _ = build_method(["model=tiny", "concept=nudity", "method=ablating", "method.num_anchor_images=2",
                              "method.anchor_steps=1"])
    g = torch.Generator().manual_seed(0)
    torch.randn((2, *ctx.models.latent_shape), generator=g)
    seed = int(torch.randint(0, 2**31, (1,), generator=g))
    assert m.rng.bit_generator.state == np.random.default_rng(seed).bit_generator.state
    assert ctx.generator.get_state().equal(g.get_state())


def test_ablating_style_captions_come_from_the_methods_own_generator():
    """Style mode (utils.py ``__getprompt__``): each caption is one of the two style templates around its anchor prompt,
    chosen by the method's numpy generator, the same draws a copy of that generator makes; over 3 steps of 4 both
    templates occur."""
    from baselines.ablating import target_prompt

    m, ctx, _ = build_method(["model=tiny", "concept=nudity", "method=ablating", "method.num_anchor_images=6",
                              "method.anchor_steps=1", "method.batch_size=4", "concept.ablating.mode=style",
                              "concept.ablating.captions=[van gogh]", "method.prior_preservation=false"])
    texts, embed = [], m._embed
    m._embed = lambda prompts: texts.append(list(prompts)) or embed(prompts)
    rng = copy.deepcopy(m.rng)
    captions = []
    for step in range(1, 4):
        m.training_step(step)
        anchors, got = texts[-2], texts[-1]
        assert got == [target_prompt("style", a, "van gogh", rng) for a in anchors]
        captions += got
    assert any(c.startswith("in van gogh's style, ") for c in captions)
    assert any(c.endswith(", in the style of van gogh") for c in captions)


# ------------------------------------------------------------------------------------------------------- Forget-Me-Not

def attention_by_hand(unet, z, t, emb) -> list[torch.Tensor]:
    """Every cross-attention layer's probabilities softmax(q k^T / sqrt(d)) per head, (batch, heads, queries, keys),
    from the inputs each attn2 module receives in a plain forward (its default processor untouched)."""
    inputs = []
    hooks = [module.register_forward_pre_hook(lambda mod, args, kwargs: inputs.append((mod, args[0], kwargs)),
                                              with_kwargs=True)
             for name, module in unet.named_modules() if name.endswith(".attn2")]
    try:
        unet(z, t, encoder_hidden_states=emb)
    finally:
        for h in hooks:
            h.remove()
    probs = []
    for mod, hidden, kwargs in inputs:
        context = kwargs["encoder_hidden_states"]
        b, heads = hidden.shape[0], mod.heads
        q = mod.to_q(hidden).view(b, hidden.shape[1], heads, -1).transpose(1, 2)
        k = mod.to_k(context).view(b, context.shape[1], heads, -1).transpose(1, 2)
        probs.append(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1))
    return probs


@pytest.mark.parametrize("use_pooler", [False, True])
def test_fmn_step_is_the_concept_attention_on_a_noised_reference_image(use_pooler):
    """Reference images: the base model's images of the reference prompts (the pipeline as second route). The step:
    a permutation of the 2 references, the last one taken, noise, t ~ U{0..999}; the loss is the 2-norm of all
    attention probabilities (every attn2 layer, head and query) on the prompt "a photo of nudity"'s concept keys:
    the two tokens of "nudity" (positions 4, 5) and, with use_pooler, every <|endoftext|> (6..76)."""
    m, ctx, _ = build_method(["model=tiny", "concept=nudity", "method=fmn", "method.num_reference_images=2",
                              "method.reference_steps=2", f"method.use_pooler={use_pooler}"])
    close(m.latents, pipeline_latents(ctx, ["nudity", "nudity"], 2, 7.5, 4, seed=0))
    ids = ctx.models.tokenizer("a photo of nudity", padding="max_length", max_length=77).input_ids
    assert ids[4:6] == ctx.models.tokenizer("nudity", add_special_tokens=False).input_ids and set(ids[6:]) == {49407}
    keys = (torch.arange(77) >= 4) & (torch.arange(77) < (77 if use_pooler else 6))
    emb = ctx.models.encode_text(["a photo of nudity"])

    def hand_loss(x0, noise, t):
        probs = attention_by_hand(ctx.unet, noised(x0, noise, t), t, emb)
        assert len(probs) == 4  # the tiny UNet's cross-attention layers: down 1, mid 1, up 2
        return torch.cat([p[..., keys].flatten() for p in probs]).pow(2).sum().sqrt()

    g = generator_copy(ctx)
    i = torch.randperm(2, generator=g).tolist().pop()
    noise = torch.randn((1, *ctx.models.latent_shape), generator=g)
    t = torch.randint(0, N_TRAIN, (1,), generator=g)
    expected = hand_loss(m.latents[i][None], noise, t)
    name, p = one_trained(ctx, "attn2.to_k")
    expected_grad = grad_of(expected, p)

    loss = m.training_step(1)["loss"]
    close(loss, expected.detach(), rel=2e-6)  # measured 2e-7 apart
    close(grad_of(loss, p), expected_grad)  # measured 8e-7 apart
    assert ctx.generator.get_state().equal(g.get_state())
    # the tiny UNet's attention is nearly uniform over the keys, so the other reference image changes the loss by only
    # 2e-5 of it (10x the tolerance above) but the gradient by 12-18%: the step used the image the permutation names
    other = grad_of(hand_loss(m.latents[1 - i][None], noise, t), p)
    assert (other - expected_grad).abs().max() > 1e-2 * expected_grad.abs().max()


# ------------------------------------------------------------------------------------------- optimizer settings

# betas far from torch's defaults, so that the second step tells them apart; per method, a clip below both steps'
# gradient norms and an eps near the clipped gradients' size (measured: ours' norms ~1e-7, ESD's ~2e-3, MACE's ~0.25)
LR, BETAS, WEIGHT_DECAY = 1e-2, (0.5, 0.6), 0.1
METHODS = {  # overrides, grad_clip, adam_eps
    "ours": (["method=ours", "method.T=4"], 5e-8, 1e-10),
    "esd": (["method=esd", "method.ddim_steps=4", "params=xattn"], 1e-3, 1e-6),
    "mace": (["method=mace", "concept.mace.concepts=[nudity]", "method.data=generate", "method.use_mask=false",
              "method.num_images=1", "method.generate_steps=2", "trainer.iterations=2"], 0.1, 1e-6),
}


def hand_adamw(history: list[dict[str, torch.Tensor]], start: dict[str, torch.Tensor], clip: float,
               eps_: float) -> dict[str, torch.Tensor]:
    """AdamW written out (Loshchilov & Hutter; torch's update order) over steps whose raw gradients are ``history``,
    each step's gradients first clipped to total norm ``clip`` (coefficient clip / (norm + 1e-6), only below 1).
    A tensor without a gradient at a step is left alone and its step count does not advance."""
    lr, (b1, b2), wd = LR, BETAS, WEIGHT_DECAY
    p = {n: v.double().clone() for n, v in start.items()}
    m, v, count = {}, {}, {}
    for grads in history:
        norm = sum(float(g.double().pow(2).sum()) for g in grads.values()) ** 0.5
        assert norm > clip  # clipping acts
        coef = min(1.0, clip / (norm + 1e-6))
        for n, g in grads.items():
            g = g.double() * coef
            count[n] = count.get(n, 0) + 1
            m[n] = b1 * m.get(n, 0) + (1 - b1) * g
            v[n] = b2 * v.get(n, 0) + (1 - b2) * g * g
            m_hat, v_hat = m[n] / (1 - b1 ** count[n]), v[n] / (1 - b2 ** count[n])
            p[n] = p[n] * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps_)
    return p


@pytest.mark.parametrize("method", sorted(METHODS))
def test_optimizer_settings_reach_adamw_and_two_updates_match_a_hand_adamw_with_clipping(method):
    overrides, clip, adam_eps = METHODS[method]
    session = build_session(["model=tiny", "concept=nudity", *overrides, f"method.lr={LR}",
                             f"method.adam_betas={list(BETAS)}", f"method.adam_eps={adam_eps}",
                             f"method.weight_decay={WEIGHT_DECAY}", f"method.grad_clip={clip}"])[0]
    (group,) = session.optimizer.param_groups
    assert (group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"]) == \
        (LR, BETAS, adam_eps, WEIGHT_DECAY)
    params = dict(zip(map(id, session.method.parameters()), session.method.parameters()))
    assert {id(p) for p in group["params"]} == set(params)
    names = {id(p): n for n, p in session.trainable.items()}
    start = {names[i]: p.detach().clone() for i, p in params.items()}
    history: list[dict[str, torch.Tensor]] = []
    # each gradient as backward leaves it, before any clipping
    hooks = [p.register_post_accumulate_grad_hook(lambda p: history[-1].__setitem__(names[id(p)], p.grad.clone()))
             for p in params.values()]
    for step in (1, 2):
        history.append({})
        session.step(step)
    for h in hooks:
        h.remove()
    assert all(history)
    expected = hand_adamw(history, start, clip, adam_eps)
    moved_any = False
    for i, p in params.items():
        n = names[i]
        torch.testing.assert_close(p.detach().double(), expected[n], rtol=0, atol=1e-6)
        moved_any |= not torch.equal(p.detach(), start[n])
    assert moved_any


# ------------------------------------------------------------------------------------------------ method state
@pytest.mark.parametrize("method", ["sdd", "ablating", "fmn"])
def test_a_method_restored_from_its_checkpointed_state_takes_the_same_next_step(method, tmp_path):
    """In-process resume of one method (the resume tests run erasure.train in a subprocess, which mutation testing
    cannot trace): after a step, its state_dict goes through a checkpoint on disk into a fresh method (same weights,
    same generator state), which then holds what the original holds (SDD's EMA teacher, Ablating's anchor order and
    numpy generator, FMN's image order; a fresh method does not) and takes the same next step."""
    from erasure.checkpoint import load_checkpoint, save_checkpoint

    extra = {"ablating": ["method.num_anchor_images=12"], "fmn": [], "sdd": ["method.ddim_steps=4", "method.ema_decay=0.5"]}[method]
    overrides = ["model=tiny", "concept=nudity", f"method={method}", *extra]
    a, ctx_a, _ = build_method(overrides, generator_seed=3)
    loss = a.training_step(1)["loss"]
    loss.backward()
    with torch.no_grad():
        for p in ctx_a.trainable.values():
            if p.grad is not None:
                p.sub_(1e-2 * p.grad.sign())
                p.grad = None
    a.after_step(1)
    save_checkpoint(tmp_path, 1, {"method": a.state_dict()}, keep=1)
    _, state = load_checkpoint(tmp_path / "checkpoints" / "step_000001")

    def fresh(restore: bool):
        b, ctx_b, _ = build_method(overrides, generator_seed=3)
        with torch.no_grad():
            for name, p in ctx_b.trainable.items():
                p.copy_(ctx_a.trainable[name])
        ctx_b.generator.set_state(ctx_a.generator.get_state())
        if restore:
            b.load_state_dict(state["method"])
        return b

    def kept(m):  # the state each method carries between steps
        if method == "sdd":
            return {k: v.clone() for k, v in m.ema.params.items()}
        return {"order": list(m._order), **({"rng": m.rng.bit_generator.state} if method == "ablating" else {})}

    def same(x, y):
        return x.keys() == y.keys() and all(v.equal(y[k]) if torch.is_tensor(v) else v == y[k] for k, v in x.items())

    restored, unrestored = fresh(True), fresh(False)
    assert same(kept(restored), kept(a)) and not same(kept(unrestored), kept(a))
    assert restored.training_step(2)["loss"].item() == a.training_step(2)["loss"].item()


# whole-session resume in-process, for the methods whose state holds more than an order: AdvUnlearn (word, attack
# round, unseen retain prompts, the adversarial prompt warm-starting the next attack; retain_train iter's follow-up
# step), robust All-but-One (the attack counter and each target's adversarial prompt), MACE (the images not yet
# drawn in each concept's epoch) and SalUn (its mask and the retain batches left)
SESSION_STATE = {
    "advunlearn": (["concept=circle", "method=advunlearn", "method.ddim_steps=4", "method.attack_step=2",
                    "method.warmup_iter=1", "method.retain_batch=3"], 2),
    "ours_adversarial": (["concept=circle", "method=ours", "method.T=4", "method.adversarial=true",
                          "method.adv_steps=2", "method.adv_warmup=1", "method.adv_every=3"], 2),  # attacks at 1, 4
    "mace": (["concept=nudity", "method=mace", "concept.mace.concepts=[nudity]", "method.data=generate",
              "method.use_mask=false", "method.num_images=3", "method.generate_steps=2"], 2),  # one image left
    # SalUn: the saliency mask and the retain batches left in the current pass (4 retain images in batches of 2: one
    # left after a step); the restored mask also gives the logged mask_kept fraction
    "salun": (["concept=nudity", "method=salun", "method.num_forget_images=4", "method.num_retain_images=4",
               "method.image_steps=2", "method.batch_size=2", "method.mask_batch_size=2"], 1),
}


@pytest.mark.parametrize("method", sorted(SESSION_STATE))
def test_a_session_restored_from_a_checkpoint_on_disk_takes_the_same_next_step(method, tmp_path):
    """Session.state after ``k`` steps, through a checkpoint on disk, into a fresh session: its next step gives the same
    loss terms and the same weights as the original's next step. A session restored with everything but the method's
    own state (a fresh method's state_dict in its place) does not: the test sees what the method keeps."""
    from erasure.checkpoint import load_checkpoint, save_checkpoint
    from erasure.config import validate
    from erasure.models import load_models
    from erasure.session import Session, seed_everything

    overrides, k = SESSION_STATE[method]
    cache = [f"method.cache_dir={tmp_path / 'images'}"] if method == "salun" else []  # its generated sets, made once
    cfg = compose_cfg(["model=tiny", *overrides, *cache, "method.lr=1e-2"])
    method_cls, method_cfg = validate(cfg)

    def fresh() -> Session:
        seed_everything(0)
        return Session.create(cfg, load_models(cfg.model, "cpu"), method_cls, method_cfg)

    a = fresh()
    for step in range(1, k + 1):
        a.step(step)
    save_checkpoint(tmp_path, k, a.state(k), keep=1)
    _, state = load_checkpoint(tmp_path / "checkpoints" / f"step_{k:06d}")
    assert state["method"], "the method keeps no state here: the test would not see a lost one"

    restored, blank = fresh(), fresh()
    restored.restore(state)
    blank.restore({**state, "method": blank.method.state_dict()})
    expected = a.step(k + 1)
    for other, same in ((restored, True), (blank, False)):
        terms = other.step(k + 1)
        equal = terms.keys() == expected.keys() and all(terms[n].equal(expected[n]) for n in expected)
        equal = equal and all(p.equal(a.trainable[n]) for n, p in other.trainable.items())
        assert equal is same, f"{'restored' if same else 'blank'} session after step {k + 1}"
