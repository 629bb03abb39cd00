"""Baselines (ESD, SDD, Ablating Concepts, Forget-Me-Not): loss terms by hand, parameter subsets, the
SDD EMA teacher, Ablating's prior term, FMN's attention capture, and two end-to-end iterations each."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from baselines.ablating import AblatingConfig, ablation_and_prior, lr_scale, target_prompt
from baselines.esd import esd_loss
from baselines.fmn import concept_positions, resteering_loss
from baselines.sdd import ema_update, sdd_loss
from erasure.delta import read_delta
from erasure.errors import UserError
from erasure.trainer import train
from tests.conftest import assert_precheck, assert_refused_in_one_sentence, build_method, compose_cfg

# tiny anchor / reference sets so that the methods that generate images start in well under a second
SMALL = {
    "esd": ["method.ddim_steps=4"],
    "sdd": ["method.ddim_steps=4"],
    "ablating": ["method.num_anchor_images=4", "method.anchor_steps=2", "method.batch_size=2"],
    "fmn": ["method.num_reference_images=2", "method.reference_steps=2"],
}


def build(method: str, extra: list[str] = ()):
    """What erasure.trainer.train sets up before its loop: the method on the tiny model, and its context."""
    return build_method(["model=tiny", "concept=nudity", f"method={method}", *SMALL[method], *extra])


# ---------------------------------------------------------------- losses against hand computations

def test_esd_loss_by_hand():
    student = torch.tensor([[[[1.0, 2.0]]]])
    teacher_u = torch.tensor([[[[0.5, 0.0]]]])
    teacher_c = torch.tensor([[[[1.0, 1.0]]]])
    # eta = 1: target = u - (c - u) = [0, -1]; errors [1, 3]; mean square (1 + 9) / 2
    assert esd_loss(student, teacher_u, teacher_c, eta=1.0).item() == pytest.approx(5.0)
    # eta = 2: target = [0.5 - 1, 0 - 2] = [-0.5, -2]; errors [1.5, 4]; (2.25 + 16) / 2
    assert esd_loss(student, teacher_u, teacher_c, eta=2.0).item() == pytest.approx(9.125)


def test_sdd_loss_by_hand_and_stop_gradient_on_the_unconditional_branch():
    u = torch.tensor([[[[1.0, -1.0]]]], requires_grad=True)
    c = torch.tensor([[[[2.0, 1.0]]]], requires_grad=True)
    loss = sdd_loss(u, c)
    assert loss.item() == pytest.approx((1 + 4) / 2)
    loss.backward()
    assert u.grad is None
    torch.testing.assert_close(c.grad, torch.tensor([[[[1.0, 2.0]]]]))  # d/dc mean((c-u)^2) = (c-u)


def test_sdd_ema_update_matches_its_formula():
    ema = {"w": torch.tensor([1.0, 2.0])}
    ema_update(ema, {"w": torch.tensor([3.0, 6.0])}, decay=0.9)
    torch.testing.assert_close(ema["w"], torch.tensor([1.2, 2.4]))  # 0.9*1 + 0.1*3, 0.9*2 + 0.1*6
    ema_update(ema, {"w": torch.tensor([0.0, 0.0])}, decay=0.5)
    torch.testing.assert_close(ema["w"], torch.tensor([0.6, 1.2]))


def test_ablating_losses_by_hand():
    # B=1, C=2, H=1, W=2: the ablation term sums squares over channels and averages over space
    pred = torch.tensor([[[[1.0, 2.0]], [[0.0, 1.0]]]])
    anchor = torch.tensor([[[[0.0, 0.0]], [[0.0, 3.0]]]])
    pred_prior = torch.tensor([[[[1.0, 1.0]], [[1.0, 1.0]]]])
    noise = torch.tensor([[[[0.0, 1.0]], [[3.0, 1.0]]]])
    ablation, prior = ablation_and_prior(pred, anchor, pred_prior, noise)
    # squared errors: ch0 [1, 4], ch1 [0, 4] -> per position [1, 8] -> mean 4.5 (= C x element mean 2.25)
    assert ablation.item() == pytest.approx(4.5)
    assert prior.item() == pytest.approx((1 + 0 + 4 + 0) / 4)
    assert ablation_and_prior(pred, anchor, None, None)[1] is None


def test_ablating_lr_scaling_and_captions():
    assert lr_scale(AblatingConfig(batch_size=4, prior_preservation=True)) == 8
    assert lr_scale(AblatingConfig(batch_size=4, prior_preservation=False)) == 4
    assert lr_scale(AblatingConfig(scale_lr=False)) == 1
    rng = np.random.default_rng(0)
    assert target_prompt("caption", "a man", "nudity", rng) == "nudity"
    assert target_prompt("object", "a robot on the moon", "robot+r2d2", rng) == "a r2d2 on the moon"
    styles = {target_prompt("style", "a house", "van gogh", rng) for _ in range(40)}
    assert styles == {"a house, in the style of van gogh", "in van gogh's style, a house"}
    # utils.py __getprompt__: the first template when a draw of integers(3) is 0 (one time in three), by hand
    rng, draws = np.random.default_rng(1), np.random.default_rng(1).integers(3, size=60)
    got = [target_prompt("style", "a house", "van gogh", rng) for _ in range(60)]
    assert got == ["a house, in the style of van gogh" if d == 0 else "in van gogh's style, a house" for d in draws]


def test_fmn_positions_and_loss_by_hand():
    ids = [49406, 320, 1125, 539, 5, 6, 49407, 49407, 49407]
    pos = concept_positions(ids, [5, 6], eot_id=49407, use_pooler=False)
    assert pos.tolist() == [False] * 4 + [True, True] + [False] * 3
    pooled = concept_positions(ids, [5, 6], eot_id=49407, use_pooler=True)
    assert pooled.tolist() == [False] * 4 + [True] * 5  # every <|endoftext|>, padding included
    # two layers, batch 2 x 2 heads (rows batch-major: b0h0, b0h1, b1h0, b1h1), keys 3; prompt 0 has its concept at
    # key 1, prompt 1 at keys 0 and 2, so a head-major layout (repeat instead of repeat_interleave) picks other keys
    a = torch.tensor([[[0.2, 0.6, 0.2]], [[0.5, 0.3, 0.2]],  # 1 query
                      [[0.1, 0.1, 0.8]], [[0.3, 0.3, 0.4]]])
    b = torch.tensor([[[0.0, 1.0, 0.0], [0.9, 0.0, 0.1]], [[0.4, 0.4, 0.2], [0.1, 0.2, 0.7]],  # 2 queries
                      [[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]], [[0.6, 0.1, 0.3], [0.2, 0.7, 0.1]]])
    positions = torch.tensor([[False, True, False], [True, False, True]])
    picked = [0.6, 0.3, 0.1, 0.8, 0.3, 0.4,  # layer a: b0 key 1 (2 heads), b1 keys 0 and 2 (2 heads)
              1.0, 0.0, 0.4, 0.2, 0.5, 0.0, 0.25, 0.5, 0.6, 0.3, 0.2, 0.1]  # layer b, 2 queries each
    expected = math.sqrt(sum(v * v for v in picked))  # 3.6125
    assert resteering_loss([a, b], positions).item() == pytest.approx(expected)
    assert expected == pytest.approx(math.sqrt(3.6125))
    # the head-major reading would give another number
    assert resteering_loss([a[[0, 2, 1, 3]], b[[0, 2, 1, 3]]], positions).item() != pytest.approx(expected)


def test_fmn_loss_on_a_real_attention_layer_is_the_sum_over_its_prompts():
    """Second route to the (batch, heads) layout: a diffusers Attention with 2 heads run through the capture
    processor on two prompts at once; the squared loss of the pair is the sum of each prompt's alone."""
    from diffusers.models.attention_processor import Attention

    from baselines.fmn import AttentionRecorder, CapturingAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)
    recorder = AttentionRecorder()
    attn.set_processor(CapturingAttnProcessor(recorder))
    x, context = torch.randn(2, 5, 8), torch.randn(2, 4, 6)
    positions = torch.tensor([[False, True, False, False], [False, False, True, True]])

    def loss(rows):
        recorder.probs = []
        with torch.no_grad():
            attn(x[rows], encoder_hidden_states=context[rows])
        assert recorder.probs[0].shape == (2 * len(rows), 5, 4)
        return resteering_loss(recorder.probs, positions[rows]).item()

    assert loss([0, 1]) ** 2 == pytest.approx(loss([0]) ** 2 + loss([1]) ** 2, rel=1e-5)
    # and each prompt alone by hand: softmax(q k^T / sqrt(d)) per head, its concept keys
    for i in range(2):
        q = attn.to_q(x[i]).view(5, 2, 4).transpose(0, 1)
        k = attn.to_k(context[i]).view(4, 2, 4).transpose(0, 1)
        probs = torch.softmax(q @ k.transpose(1, 2) / 2.0, dim=-1)
        assert loss([i]) == pytest.approx(probs[:, :, positions[i]].pow(2).sum().sqrt().item(), rel=1e-5)


# ---------------------------------------------------------------- subsets, teachers, terms on the tiny model

@pytest.mark.parametrize("method,params", [("esd", "noxattn"), ("esd", "xattn"), ("sdd", "xattn"),
                                           ("ablating", "attn_qkv"), ("fmn", "xattn")])
def test_an_optimizer_step_moves_exactly_the_chosen_subset(method, params):
    m, ctx, cfg = build(method, [f"params={params}", "method.lr=1e-3"])
    before = {n: p.detach().clone() for n, p in ctx.unet.named_parameters()}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m.training_step(1)["loss"].backward()
    with_grad = {n for n, p in ctx.unet.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and with_grad <= set(ctx.trainable)
    opt.step()
    changed = {n for n, p in ctx.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed == with_grad
    if params == "noxattn":  # ESD-u leaves cross-attention, the time embedding and the output layers alone
        assert not any("attn2" in n or n.startswith(("time_embedding", "conv_out", "conv_norm_out")) for n in changed)
    if params in ("xattn", "attn_qkv"):
        pattern = "attn2." if params == "xattn" else (".to_q.", ".to_k.", ".to_v.")
        assert all(any(p in n for p in ([pattern] if isinstance(pattern, str) else pattern)) for n in changed)
    # the frozen teacher theta* still holds the base weights
    for n, p in ctx.teacher.params.items():
        torch.testing.assert_close(p, before[n])


def test_esd_sampler_option_samples_with_the_chosen_model():
    m, ctx, _ = build("esd", ["method.ddim_steps=3"])
    ctx.randint = lambda low, high: high - 1  # first target, and the last DDIM step: z_t is 2 steps from x_T
    state = ctx.generator.get_state()

    def loss_with(sampler):
        m.cfg.sampler = sampler
        ctx.generator.set_state(state)
        with torch.no_grad():
            return m.training_step(1)["loss"].item()

    assert loss_with("student") == loss_with("teacher")  # identical models before any update
    with torch.no_grad():
        for p in ctx.trainable.values():
            p.add_(0.05 * torch.randn_like(p))
    assert loss_with("student") != pytest.approx(loss_with("teacher"), rel=1e-3)


def test_sdd_teacher_is_the_ema_of_the_student_and_is_what_is_exported():
    m, ctx, _ = build("sdd", ["method.lr=1e-3", "method.ema_decay=0.9"])
    base = {n: p.detach().clone() for n, p in ctx.trainable.items()}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-4)
    expected = {n: v.clone() for n, v in base.items()}
    for step in (1, 2):
        opt.zero_grad()
        m.training_step(step)["loss"].backward()
        opt.step()
        m.after_step(step)
        expected = {n: 0.9 * expected[n] + 0.1 * ctx.trainable[n].detach() for n in expected}
    exported = m.export_params()
    for n in expected:
        torch.testing.assert_close(exported[n], expected[n])
    assert any(not torch.allclose(exported[n], ctx.trainable[n]) for n in exported)  # not the student
    for n, p in ctx.teacher.params.items():  # the trainer's theta* stays the base
        torch.testing.assert_close(p, base[n])


def test_ablating_prior_preservation_term_is_present_and_weighted():
    def terms(extra):
        m, ctx, _ = build("ablating", extra)
        with torch.no_grad():
            return m.training_step(1)

    w0, w2 = terms(["method.prior_loss_weight=0"]), terms(["method.prior_loss_weight=2.5"])
    assert w0["prior"].item() > 0
    torch.testing.assert_close(w2["prior"], w0["prior"])
    torch.testing.assert_close(w2["ablation"], w0["ablation"])
    torch.testing.assert_close(w2["loss"], w0["ablation"] + 2.5 * w0["prior"])
    off = terms(["method.prior_preservation=false"])
    assert "prior" not in off and torch.equal(off["loss"], off["ablation"])


def test_ablating_scaled_lr_reaches_the_optimizer(tmp_path):
    cfg = compose_cfg(["model=tiny", "method=ablating", *SMALL["ablating"], "trainer.iterations=1",
                       "trainer.preview_every=0"])
    run = train(cfg, tmp_path / "run")
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["lr"]
    assert logged == pytest.approx(4e-6 * 2 * 2)  # SMALL: batch 2, x 2 for prior preservation


def _attention_mass(m, ctx, z, t):
    """Summed attention probability on the concept's word tokens over all attn2 layers, heads and queries."""
    with torch.no_grad(), m.recorder.recording(ctx.unet):
        ctx.unet(z, t, encoder_hidden_states=m.emb)
        probs = list(m.recorder.probs)
    heads = [p.shape[0] for p in probs]
    return sum(p[:, :, m.positions[0]].sum().item() for p in probs), probs, heads


def test_fmn_capture_is_exact_restores_the_processors_and_lowers_the_concept_attention():
    m, ctx, _ = build("fmn", ["method.use_pooler=false", "params=xattn"])
    # "a photo of nudity": positions 4.. hold the BPE tokens of "nudity" (after <start>, a, photo, of)
    word = ctx.models.tokenizer("nudity", add_special_tokens=False).input_ids
    assert m.positions[0].nonzero().flatten().tolist() == list(range(4, 4 + len(word)))
    z, t = m.latents[:1] + 0.3 * torch.randn(1, *ctx.models.latent_shape), torch.tensor([500])
    kinds = {n: type(p) for n, p in ctx.unet.attn_processors.items()}
    with torch.no_grad():
        plain = ctx.unet(z, t, encoder_hidden_states=m.emb).sample
        with m.recorder.recording(ctx.unet):
            captured = ctx.unet(z, t, encoder_hidden_states=m.emb).sample
    torch.testing.assert_close(captured, plain, rtol=1e-4, atol=1e-5)  # the capture does not change the UNet
    assert {n: type(p) for n, p in ctx.unet.attn_processors.items()} == kinds
    mass0, probs, _ = _attention_mass(m, ctx, z, t)
    n_attn2 = sum(1 for n in kinds if ".attn2." in n)
    assert len(probs) == n_attn2
    for p in probs:  # probabilities over the 77 keys
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:2]))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for step in range(1, 6):
        opt.zero_grad()
        loss = m.training_step(step)["loss"]
        losses.append(loss.item())
        loss.backward()
        opt.step()
    mass1, _, _ = _attention_mass(m, ctx, z, t)
    assert mass1 < 0.9 * mass0, (mass0, mass1)  # measured: 183 -> 144 on the seed-0 tiny model
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------- end to end through the shared trainer

DEFAULT_PARAMS = {"esd": "noxattn", "sdd": "xattn", "ablating": "attn_qkv", "fmn": "full"}
# each method's AdamW as its source sets it (lr, weight decay, max grad norm; eps 1e-8 and betas (0.9, 0.999) for all):
# train-esd.py's Adam; train_sdd.py; diffusers/train.py with scale_lr (4e-6 x batch 2 x 2 for prior preservation);
# configs/attn.yaml
SOURCE_OPTIMIZER = {"esd": (1e-5, 0.0, None), "sdd": (1e-5, 1e-4, 1.0), "ablating": (4e-6 * 2 * 2, 1e-2, 1.0),
                    "fmn": (2e-6, 0.01, 1.0)}


@pytest.mark.parametrize("method", ["esd", "sdd", "ablating", "fmn"])
def test_two_iterations_end_to_end(method, tmp_path):
    """The trainer's run (seeded as build_method seeds) against a loop written here: the method's training_step, AdamW
    with the source's settings, clipping, after_step. The delta holds the loop's trained tensors (SDD: the EMA of
    the student, decay 0.5 here so that it moves visibly, in float64) and metrics.jsonl its losses."""
    extra = ["method.ema_decay=0.5"] if method == "sdd" else []
    overrides = ["model=tiny", "concept=nudity", f"method={method}", *SMALL[method], *extra]
    cfg = compose_cfg([*overrides, "trainer.iterations=2", "trainer.preview_every=0"])
    run = train(cfg, tmp_path / method)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method and summary["iterations"] == 2
    assert summary["params"] == DEFAULT_PARAMS[method]  # the method yaml's default parameter subset
    assert summary["setup_time_s"] >= 0  # the method's own preparation (anchor/reference images), timed apart
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    tensors, meta = read_delta(run)

    m, ctx, _ = build_method(overrides)
    base = {n: p.detach().clone() for n, p in ctx.trainable.items()}
    assert set(tensors) == set(base)
    lr, weight_decay, clip = SOURCE_OPTIMIZER[method]
    trained = list(ctx.trainable.values())
    opt = torch.optim.AdamW(trained, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    ema = {n: v.double() for n, v in base.items()}
    for step, row in zip((1, 2), rows):
        opt.zero_grad()
        loss = m.training_step(step)["loss"]
        assert row["loss"] == pytest.approx(loss.item(), rel=1e-6)
        assert row["lr"] == pytest.approx(lr, rel=1e-12)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(trained, clip)
        opt.step()
        m.after_step(step)
        ema = {n: 0.5 * v + 0.5 * ctx.trainable[n].detach().double() for n, v in ema.items()}
    expected = ema if method == "sdd" else {n: p.detach().double() for n, p in ctx.trainable.items()}
    atol = 1e-7 if method == "sdd" else 1e-9  # the run's EMA is float32 (rounding ~1e-8); the rest: same arithmetic
    for n, value in tensors.items():
        torch.testing.assert_close(value.double(), expected[n], rtol=0, atol=atol)
    assert max((tensors[n] - base[n]).abs().max().item() for n in tensors) > 1e-6  # the tolerance is far below a step


@pytest.mark.parametrize("override, words", [
    ("method.ema_decay=0.0", None), ("method.ema_decay=0.999", None),  # decay 0 copies the student each step
    ("method.ema_decay=1.0", "method.ema_decay must be"),  # train_sdd.py's EMA: 1 would freeze the teacher
    ("method.ema_decay=-0.1", "method.ema_decay must be"),
    ("method.ddim_steps=2", None), ("method.ddim_steps=1", "method.ddim_steps must be at least 2")])
def test_sdd_range_edges(override, words):
    assert_precheck(["model=tiny", "concept=nudity", "method=sdd", override], words)


@pytest.mark.parametrize("option, words", [
    ({"residual_connection": True}, "residual_connection"), ({"rescale_output_factor": 2.0}, "rescale_output_factor"),
    ({"cross_attention_norm": "layer_norm"}, "norm_cross"), ({"spatial_norm_dim": 8}, "spatial_norm"),
    ({"norm_num_groups": 4}, "group_norm"), ("mask", "attention_mask"), ("self", "self-attention"),
    ("4d", "4-d hidden states")])
def test_fmn_capture_refuses_attention_options_stable_diffusion_does_not_use(option, words):
    """The capture computes SD's cross-attention (no norm, residual, rescale or mask inside the layer) and names any
    other option instead of computing it half-way; on SD's own layers it equals diffusers' AttnProcessor (above)."""
    from diffusers.models.attention_processor import Attention

    from baselines.fmn import AttentionRecorder, CapturingAttnProcessor
    from erasure.errors import UserError

    kwargs = option if isinstance(option, dict) else {}
    attn = Attention(32, cross_attention_dim=12, heads=2, dim_head=16, **kwargs)
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 7, 12)
    temb = torch.randn(2, 8) if "spatial_norm_dim" in kwargs else None
    call = dict(encoder_hidden_states=None if option == "self" else ctx,
                attention_mask=torch.zeros(2, 1, 7) if option == "mask" else None)
    with pytest.raises(UserError, match=rf"only, not {re.escape(words)}$"):  # the one option, named as written
        CapturingAttnProcessor(AttentionRecorder())(attn, torch.randn(2, 32, 2, 3) if option == "4d" else x, temb=temb,
                                                    **call)
    plain = Attention(32, cross_attention_dim=12, heads=2, dim_head=16)
    recorder = AttentionRecorder()
    out = CapturingAttnProcessor(recorder)(plain, x, encoder_hidden_states=ctx)
    torch.testing.assert_close(out, plain(x, encoder_hidden_states=ctx))
    assert recorder.probs[0].shape == (4, 5, 7)


def test_fmn_reads_the_concepts_own_section():
    """circle.yaml's fmn: section (text, type, reference prompts) is what FMN trains from; without one, the first
    target and the object template (train_attn.py, ForgetMeNotDataset)."""
    m, ctx, cfg = build_method(["model=tiny", "concept=circle", "method=fmn", "method.num_reference_images=1",
                                "concept.fmn.text=circle", "concept.fmn.type=style"])
    assert m.concept_text == "circle" and m.prompt == "a photo in the style of circle"
    assert m.reference_prompts == ["a red circle"]  # circle.yaml's fmn.reference_prompts, not its targets
    m2, _, _ = build_method(["model=tiny", "concept=nudity", "method=fmn", "method.num_reference_images=1"])
    assert m2.concept_text == "nudity" and m2.prompt == "a photo of nudity" and len(m2.latents) == 1
    m3, _, _ = build_method(["model=tiny", "concept=circle", "method=fmn", "method.num_reference_images=2",
                             "~concept.fmn.reference_prompts"])
    assert m3.reference_prompts == ["a circle", "a circle"] and len(m3.latents) == 2  # no section: the targets


def test_fmn_concept_text_must_lie_within_the_77_tokens():
    """The prompt is cut at the tokenizer's 77 tokens (as the text encoder sees it): a concept text pushed past the
    cut is refused in one sentence, not trained on positions the attention maps do not have."""
    long_text = " ".join(["tall"] * 80) + " nudity"
    with pytest.raises(UserError, match="was not found within the first 77 tokens of the prompt") as err:
        build_method(["model=tiny", "concept=nudity", "method=fmn", "method.num_reference_images=1",
                      f"concept.fmn.text='{long_text}'"])
    assert "\n" not in str(err.value)
    text = " ".join(["tall"] * 60) + " nudity"  # fits: its tokens end before the 77th
    m, ctx, _ = build_method(["model=tiny", "concept=nudity", "method=fmn", "method.num_reference_images=1",
                              f"concept.fmn.text='{text}'"])
    n = len(ctx.models.tokenizer(text, add_special_tokens=False).input_ids)
    assert 4 + n < 77 and m.positions.shape == (1, 77)
    # after <start>, a, photo, of: the concept's n tokens, then (use_pooler, configs/attn.yaml) every <|endoftext|>,
    # which is also SD's padding token, to the 77th
    assert m.positions[0].nonzero().flatten().tolist() == list(range(4, 77))
    ids = ctx.models.tokenizer(m.prompt, padding="max_length", max_length=77).input_ids
    assert set(ids[4 + n:]) == {ctx.models.tokenizer.eos_token_id} and ids[4 + n - 1] != ids[4 + n]


@pytest.mark.parametrize("drop", ["~concept.fmn.type", "~concept.fmn"])
def test_fmn_concept_without_a_type_is_an_object(drop):
    """No ``fmn.type`` (or no ``fmn:`` section): the object template, accepted by the config check."""
    from erasure.config import validate

    validate(compose_cfg(["model=tiny", "concept=nudity", "method=fmn", drop]))
    m, _, _ = build_method(["model=tiny", "concept=nudity", "method=fmn", "method.num_reference_images=1", drop])
    assert m.prompt == "a photo of nudity"


def test_fmn_unknown_type_is_refused():
    """Also in tests/test_config_validation.py, which lies outside mutmut's test selection (pyproject [tool.mutmut])."""
    assert_refused_in_one_sentence(["model=tiny", "concept=nudity", "method=fmn", "concept.fmn.type=poem"],
                                   "concept.fmn.type must be one of object, style, got 'poem'")


@pytest.mark.parametrize("overrides, mode", [([], "caption"), (["concept.ablating.mode=style"], "style"),
                                             (["~concept.ablating.mode"], "caption")])
def test_ablating_reads_its_mode_from_the_concept(overrides, mode):
    m, _, _ = build_method(["model=tiny", "concept=nudity", "method=ablating", "method.num_anchor_images=1",
                            "method.anchor_steps=1", *overrides])
    assert m.mode == mode


@pytest.mark.parametrize("override, words", [
    ("concept.ablating.captions=[]", "has no Ablating Concepts data"),
    ("concept.ablating.anchor_prompts=[]", "has no Ablating Concepts data"),
    ("concept.ablating.mode=painting", "concept.ablating.mode must be one of")])
def test_ablating_refuses_a_concept_without_its_data(override, words):
    from erasure.cli import precheck_train_args
    from erasure.errors import UserError

    with pytest.raises(UserError, match=words):
        precheck_train_args(["model=tiny", "concept=nudity", "method=ablating", override])


# ------------------------------------------------------------------------- generated sets kept on disk (common.py)
def test_cached_latents_are_keyed_by_everything_that_decides_them(tiny_models, tmp_path):
    """cached_latents: the file's metadata holds the key written out here by hand (format, both fingerprints, the
    sampler, guidance, batch size, prompts, count, seed, device, dtype); a second call with the same arguments reads
    the file (the same latents, no new file); changing any one of seed, guidance, prompts, count or batch size makes a
    new file (seed, guidance and prompts: other latents). The noise comes from its own generator: the method's is not drawn from."""
    import hashlib
    from types import SimpleNamespace

    from safetensors import safe_open

    from baselines.common import CACHE_FORMAT, cached_latents
    from erasure.generation import Sampler

    ctx = SimpleNamespace(models=tiny_models, generator=torch.Generator().manual_seed(5))
    state = ctx.generator.get_state()
    base = dict(prompts=["a cat", "a dog"], count=3, steps=2, guidance=3.0, seed=7, batch_size=2)

    def call(**changes):
        a = {**base, **changes}
        return cached_latents(ctx, a["prompts"], a["count"], a["steps"], a["guidance"], seed=a["seed"],
                              cache_dir=tmp_path, batch_size=a["batch_size"])

    first, chosen = call()
    assert chosen == ["a cat", "a dog", "a cat"] and first.shape[0] == 3
    assert torch.equal(ctx.generator.get_state(), state)
    files = sorted((tmp_path / "latents").iterdir())
    assert len(files) == 1
    with safe_open(str(files[0]), framework="pt") as f:
        text = f.metadata()["key"]
    key = json.loads(text)
    assert files[0].name == hashlib.sha256(text.encode()).hexdigest()[:20] + ".safetensors"  # the documented name
    sampler = Sampler(tiny_models.generation_scheduler, steps=2, guidance=3.0, resolution=tiny_models.resolution,
                      batch_size=2)
    assert key == json.loads(json.dumps(dict(
        format=CACHE_FORMAT, unet=tiny_models.fingerprint, text_encoder=tiny_models.text_encoder_fingerprint,
        sampler=sampler.describe(), guidance=3.0, batch_size=2, prompts=["a cat", "a dog"], count=3, seed=7,
        device="cpu", dtype=str(tiny_models.dtype)), default=str))
    again, _ = call()
    assert torch.equal(again, first) and len(list((tmp_path / "latents").iterdir())) == 1
    for n, change in enumerate([dict(seed=8), dict(guidance=4.0), dict(prompts=["a dog", "a cat"]), dict(count=2),
                                dict(batch_size=1)], start=2):
        other, _ = call(**change)
        assert len(list((tmp_path / "latents").iterdir())) == n, change
        if "count" not in change and "batch_size" not in change:  # those two draw the same first images
            assert not torch.equal(other[:2], first[:2]), change
    assert call(count=1)[0].shape[0] == 1  # the least count
    with pytest.raises(ValueError, match="count must be at least 1, got 0"):
        call(count=0)


def test_a_relative_cache_folder_is_the_repositorys(tmp_path, monkeypatch):
    from baselines.common import resolve_cache_dir
    from tests.conftest import ROOT

    monkeypatch.chdir(tmp_path)
    assert resolve_cache_dir("outputs/cache") == ROOT / "outputs" / "cache"
    assert resolve_cache_dir(tmp_path / "c") == tmp_path / "c"
