"""All-but-One loss terms, the erasing signal delta, and one training step, against hand computations."""
import math

import pytest
import torch

from erasure.allbutone.ours import OursConfig, concept_and_penalty, instruction_delta, percentile_mask, resolve_window
from erasure.params import select_params
from tests.conftest import build_method, compose_cfg


def test_concept_loss_and_penalty_by_hand():
    # 1x1x1x2 tensors, small enough to do on paper
    eps_c = torch.tensor([[[[1.0, 2.0]]]])
    eps_u = torch.tensor([[[[0.5, -1.0]]]])
    target = torch.tensor([[[[3.0, 10.0]]]])
    teacher_u = torch.tensor([[[[0.0, 0.0]]]])
    concept, penalty = concept_and_penalty(eps_c, eps_u, target, teacher_u, gamma2=2.0)
    # gamma2*(eps_c - eps_u) = [1, 6]; minus target = [-2, -4]; mean of squares = (4 + 16) / 2
    assert concept.item() == pytest.approx(10.0)
    # (0.25 + 1) / 2
    assert penalty.item() == pytest.approx(0.625)


def test_no_gradient_flows_through_the_students_unconditional_branch_of_the_concept_loss():
    eps_c = torch.randn(1, 4, 3, 3, requires_grad=True)
    eps_u = torch.randn(1, 4, 3, 3, requires_grad=True)
    concept, _ = concept_and_penalty(eps_c, eps_u, torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3), 7.5)
    concept.backward()
    assert eps_u.grad is None
    assert eps_c.grad is not None and eps_c.grad.abs().sum() > 0


def test_lambda_changes_the_gradient_by_exactly_the_penalty_gradient(monkeypatch):
    """The method's own student_loss on the tiny model, student moved off the teacher: the gradient on the student's
    unconditional output eps_u is 2 lam (eps_u - eps*_u) / N (N = its element count: the penalty is a mean, Eq. 12)
    and nothing from the concept term (stop-gradient); on eps_c it is the concept term's alone."""
    import dataclasses

    from erasure.allbutone import ours

    m, ctx, _ = build_method(["model=tiny", "concept=nudity", "method=ours", "method.T=6", "method.signal=none",
                               "method.gamma1=3", "method.gamma2=2"])
    work = m.teacher_work([m.draw(1)])[0]
    z, t = work["z_t"], work["timestep"]
    emb_u, emb_c = ctx.models.encode_text([""]), ctx.models.encode_text(["nudity"])
    with torch.no_grad():  # eps* from the plain UNet while it still holds the base weights (not through the Teacher)
        base_u = ctx.unet(z, t, encoder_hidden_states=emb_u).sample
        base_c = ctx.unet(z, t, encoder_hidden_states=emb_c).sample
        g = torch.Generator().manual_seed(1)
        for p in ctx.trainable.values():  # the student leaves the teacher: eps_u != eps*_u
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        eps_u = ctx.unet(z, t, encoder_hidden_states=emb_u).sample
        eps_c = ctx.unet(z, t, encoder_hidden_states=emb_c).sample
    assert (eps_u - base_u).abs().max() > 1e-3
    n = eps_u.numel()
    gamma1, gamma2 = 3.0, 2.0
    target = gamma1 * (base_c - base_u)

    seen = []

    def recording(eps_fn, x, timestep, conds):  # the student's outputs, kept for their gradients
        out = ours_eps_all(eps_fn, x, timestep, conds)
        for e in out:
            e.retain_grad()
        seen.append(out)
        return out

    ours_eps_all = ours.eps_all
    monkeypatch.setattr(ours, "eps_all", recording)
    config = m.cfg
    for lam in (0.0, 2.5):
        m.cfg = dataclasses.replace(config, lam=lam)
        seen.clear()
        terms = m.student_loss(work)
        (out_c, out_u), = seen
        torch.testing.assert_close(out_u.detach(), eps_u, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out_c.detach(), eps_c, rtol=1e-5, atol=1e-6)
        terms["loss"].backward()
        grad_c = 2 * gamma2 * (gamma2 * (eps_c - eps_u) - target) / n
        # tolerance: batched and single UNet calls round differently (~1e-6), 1e-3 of the gradients' scale here
        tol = dict(rtol=1e-3, atol=1e-3 * grad_c.abs().max().item())
        torch.testing.assert_close(out_u.grad, 2 * lam * (eps_u - base_u) / n, **tol)
        torch.testing.assert_close(out_c.grad, grad_c, **tol)
        concept, penalty = ((gamma2 * (eps_c - eps_u) - target) ** 2).mean(), ((eps_u - base_u) ** 2).mean()
        torch.testing.assert_close(terms["loss"].detach(), concept + lam * penalty, rtol=1e-5, atol=0)
        for p in ctx.trainable.values():
            p.grad = None


def test_percentile_mask_keeps_the_expected_fraction_per_sample_and_channel():
    torch.manual_seed(0)
    d = torch.randn(2, 4, 10, 10)
    mask = percentile_mask(d, 0.95)
    # per (sample, channel): 100 distinct values, quantile 0.95 interpolates between the 95th and 96th
    # smallest |d|, so exactly the 5 largest are kept
    assert torch.equal(mask.flatten(2).sum(-1), torch.full((2, 4), 5))
    top5 = d.abs().flatten(2).topk(5, dim=-1).indices
    kept = mask.flatten(2).nonzero()
    for b in range(2):
        for c in range(4):
            idx = kept[(kept[:, 0] == b) & (kept[:, 1] == c)][:, 2]
            assert set(idx.tolist()) == set(top5[b, c].tolist())


def test_delta_window_warmup_and_sum_by_hand():
    T = 35
    lo, hi = resolve_window([0.35, 1.0], T)
    assert (lo, hi) == (math.floor(0.35 * 35), 35) == (12, 35)
    eps_u = torch.zeros(1, 1, 2, 2)
    e1 = torch.tensor([[[[1.0, -4.0], [2.0, 3.0]]]])
    e2 = torch.tensor([[[[0.5, 0.5], [0.5, 8.0]]]])
    inst = [dict(guidance=-7.5, kappa=0.5, lo=12, hi=35), dict(guidance=6.5, kappa=1.0, lo=20, hi=35)]
    # outside the window of both, or before warm-up: nothing
    assert instruction_delta(11, eps_u, [e1, e2], inst, warmup=5) is None
    assert instruction_delta(12, eps_u, [e1, e2], inst, warmup=13) is None
    # at 12 only the first concept is active; kappa 0.5 over |[1,4,2,3]| -> quantile 2.5 -> keeps 4 and 3
    d12 = instruction_delta(12, eps_u, [e1, e2], inst, warmup=5)
    torch.testing.assert_close(d12, torch.tensor([[[[0.0, 30.0], [0.0, -22.5]]]]))
    # at 25 both; kappa 1.0 keeps only the max |.| (8.0)
    d25 = instruction_delta(25, eps_u, [e1, e2], inst, warmup=5)
    torch.testing.assert_close(d25, torch.tensor([[[[0.0, 30.0], [0.0, -22.5 + 52.0]]]]))


def _method(overrides=()):
    from erasure.method import TrainContext
    from erasure.models import load_models
    from erasure.allbutone.ours import AllButOne
    from erasure.teacher import Teacher

    cfg = compose_cfg(["model=tiny", "concept=nudity", *overrides])
    models = load_models(cfg.model, "cpu")
    trainable = select_params(models.unet, cfg.params)
    for p in trainable.values():
        p.requires_grad_(True)
    teacher = Teacher(models.unet, trainable)
    mcfg = AllButOne.parse_config(cfg.method)
    ctx = TrainContext(models=models, trainable=trainable, teacher=teacher, concept=cfg.concept, cfg=cfg,
                       generator=torch.Generator().manual_seed(0))
    return AllButOne(mcfg, ctx), models, trainable, teacher


def test_one_optimizer_step_changes_only_the_subset_and_not_the_teacher():
    method, models, trainable, teacher = _method(["method.T=6", "method.lr=1e-2"])
    before = {n: p.detach().clone() for n, p in models.unet.named_parameters()}
    frozen = {n: p.clone() for n, p in teacher.params.items()}
    opt = torch.optim.AdamW(method.parameters(), lr=1e-2)
    losses = method.training_step(1)
    assert set(losses) == {"loss", "concept", "penalty"}
    losses["loss"].backward()
    opt.step()
    changed = {n for n, p in models.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(trainable)
    assert all(".to_out." in n for n in changed)
    for n, p in teacher.params.items():
        assert torch.equal(p, frozen[n])


def test_config_defaults_are_the_papers():
    cfg = OursConfig()
    assert (cfg.iterations, cfg.lr, cfg.adam_eps, cfg.gamma1, cfg.gamma2, cfg.T, cfg.warmup, cfg.lam) == \
        (200, 1e-5, 1e-8, 7.5, 7.5, 35, 5, 5.0)
    composed = compose_cfg([]).method
    assert composed.lam == 5.0 and composed.T == 35 and composed.iterations == 200


def test_delta_subtracts_eps_u_and_reads_its_window_and_warmup_inclusively():
    """d = eps_i - eps_u with eps_u non-zero (the hand test above has eps_u = 0, where eps_i + eps_u would pass), and
    the edges: active at steps_taken = warmup and at both ends of the window, idle one step outside."""
    eps_u = torch.tensor([[[[1.0, 1.0], [-2.0, 0.5]]]])
    e1 = eps_u + torch.tensor([[[[1.0, -4.0], [2.0, 3.0]]]])  # d = [[1, -4], [2, 3]] as above
    inst = [dict(guidance=-7.5, kappa=0.5, lo=12, hi=20)]
    expected = torch.tensor([[[[0.0, 30.0], [0.0, -22.5]]]])  # kappa 0.5 keeps |d| = 4 and 3
    for steps, warmup in ((12, 12), (20, 5), (16, 16)):
        torch.testing.assert_close(instruction_delta(steps, eps_u, [e1], inst, warmup=warmup), expected)
    assert instruction_delta(11, eps_u, [e1], inst, warmup=5) is None
    assert instruction_delta(21, eps_u, [e1], inst, warmup=5) is None
    assert instruction_delta(12, eps_u, [e1], inst, warmup=13) is None
    # an idle instruction concept before an active one is skipped, not the end of the list
    later = dict(guidance=6.5, kappa=1.0, lo=30, hi=35)
    torch.testing.assert_close(instruction_delta(12, eps_u, [e1 + 9.0, e1], [later, *inst], warmup=5), expected)


def test_the_teachers_target_adds_each_instruction_concepts_own_delta_by_hand():
    """Algorithm 1, line 10 with the nudity concept's three instruction concepts: the guidance target of every drawn
    iteration is gamma1 (eps_c - eps_u) plus, for each instruction concept k active at that step, g_k d_k
    percentile_mask(d_k, kappa_k) with d_k = eps_k - eps_u, all epsilons from the base UNet at the work's z_t; the
    instruction concepts matched to their own epsilons by their text, encoded here."""
    from erasure.allbutone.ours import AllButOne

    m, models, _, _ = _method(["method.T=8"])
    unet0 = __import__("copy").deepcopy(models.unet)
    cfg, insts = m.cfg, m.ctx.concept.instructions
    assert len(insts) == 3

    def encode(text):
        ids = models.tokenizer([text], padding="max_length", max_length=77, return_tensors="pt").input_ids
        return models.text_encoder(ids)[0]

    draws = [m.draw(s) for s in range(1, 9)]
    active_seen = 0
    with torch.no_grad():
        for d, w in zip(draws, m.teacher_work(draws)):
            steps = cfg.T - d["t"]

            def eps(text):
                return unet0(w["z_t"], w["timestep"], encoder_hidden_states=encode(text)).sample

            eps_u = eps("")
            target = cfg.gamma1 * (eps(m.targets[d["target_index"]]) - eps_u)
            for inst in insts:
                lo, hi = resolve_window(inst.window, cfg.T)
                if steps >= cfg.warmup and lo <= steps <= hi:
                    dk = eps(inst.text) - eps_u
                    target = target + inst.guidance * dk * percentile_mask(dk, inst.kappa)
                    active_seen += 1
            torch.testing.assert_close(w["guidance_target"], target, rtol=1e-4, atol=1e-4)
    assert active_seen >= 3 and isinstance(m, AllButOne)


@pytest.mark.parametrize("instructions, refusal", [
    ([{"text": "a", "guidance": 1.0, "kappa": 1.0, "window": [0.0, 1.0]}], None),  # the edges: kappa 1, [0, 1]
    ([{"text": "a", "guidance": 1.0, "kappa": 0.5, "window": [0.5, 0.5]}], None),  # low = high
    ([{"text": "a", "guidance": 1.0, "kappa": 0.0, "window": [0.0, 1.0]}], "instruction concept 'a' has kappa 0.0"),
    ([{"text": "a", "guidance": 1.0, "kappa": 1.5, "window": [0.0, 1.0]}], "kappa must be in \\(0, 1\\]"),
    ([{"text": "b", "guidance": 1.0, "kappa": 1.0, "window": [0.6, 0.5]}], "instruction concept 'b' has window"),
    ([{"text": "b", "guidance": 1.0, "kappa": 1.0, "window": [0.5, 1.5]}], "0 <= low <= high <= 1"),
    ([{"text": "b", "guidance": 1.0, "kappa": 1.0, "window": [-0.1, 0.5]}], "0 <= low <= high <= 1"),
    ([{"text": "b", "guidance": 1.0, "kappa": 1.0, "window": [0.1, 0.5, 0.9]}], "has window \\[0.1, 0.5, 0.9\\]"),
    ([{"text": "c", "guidance": 1.0, "window": [0.0, 1.0]}], "invalid concept config at concept.instructions"),
    ([{"text": "c", "guidance": 1.0, "kappa": 1.0, "colour": "red"}],
     "invalid concept config at concept.colour: Key 'colour' not in 'Instruction'"),
])
def test_the_instruction_concepts_are_checked_against_their_schema_and_ranges(instructions, refusal):
    """AllButOne.validate_concept called directly (erasure.config.validate memoises whole configs): kappa in (0, 1],
    the window two fractions 0 <= low <= high <= 1, no unknown or missing key; a concept without instruction
    concepts is accepted."""
    from erasure.allbutone.ours import AllButOne
    from erasure.errors import UserError

    AllButOne.validate_concept({"targets": ["x"]})
    if refusal is None:
        AllButOne.validate_concept({"instructions": instructions})
    else:
        with pytest.raises(UserError, match=refusal) as err:
            AllButOne.validate_concept({"instructions": instructions})
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("settings, refusal", [
    (dict(lam=0.0, T=2, adv_warmup=0, adv_weight=0.0, adv_lr=1e-6), None),  # every edge that is allowed
    (dict(lam=0.5), None),
    (dict(lam=-0.1), "lambda must be >= 0"),
    (dict(T=1), "method.T \\(DDIM steps\\) must be at least 2, got 1"),
    (dict(adv_warmup=-1), "method.adv_warmup and method.adv_weight must be 0 or more"),
    (dict(adv_weight=-0.5), "method.adv_warmup and method.adv_weight must be 0 or more"),
    (dict(adv_lr=0.0), "method.adv_lr a positive number"),
    (dict(adv_lr=float("inf")), "method.adv_lr a positive number"),
])
def test_the_methods_settings_are_checked_at_their_edges(settings, refusal):
    """AllButOne.validate called directly (erasure.config.validate memoises whole configs): lambda 0 (no penalty), T 2,
    no attack warm-up and adv_weight 0 are allowed; one step past each edge is refused."""
    from erasure.allbutone.ours import AllButOne
    from erasure.errors import UserError

    cfg = OursConfig(**settings)
    if refusal is None:
        AllButOne.validate(cfg)
    else:
        with pytest.raises(UserError, match=refusal):
            AllButOne.validate(cfg)


def test_an_instruction_concept_is_evaluated_from_the_first_to_the_last_step_of_its_window():
    """``active`` (which instruction concepts go through the UNet at a step) reads each window inclusively and
    nothing before the warm-up (3): T = 8, the first and third windows [0.35, 1] are steps 2..8, the second's
    [0.5, 0.75] steps 4..6."""
    m, *_ = _method(["method.T=8", "method.warmup=3", "concept.instructions.1.window=[0.5,0.75]"])
    assert [(i["lo"], i["hi"]) for i in m.instructions] == [(2, 8), (4, 6), (2, 8)]
    assert m.active(2) == []  # inside two windows, before the warm-up
    assert m.active(3) == [2, 4]
    assert m.active(4) == m.active(6) == [2, 3, 4]
    assert m.active(7) == m.active(8) == [2, 4]
