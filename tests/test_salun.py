"""SalUn (baselines/salun.py): the saliency mask by hand and by a second autograd route, the loss terms by hand and by
a second route on the same draws, masked weights frozen through the shared loop, the cached forget/retain sets,
resuming with the saved mask, and refused configs."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from baselines import common
from baselines.salun import forgetting_loss, top_fraction_mask, unlearning_losses
from erasure.config import group_options, validate
from erasure.delta import read_delta
from erasure.errors import UserError
from erasure.models import load_models
from erasure.session import Session
from erasure.teacher import student_eps
from erasure.trainer import train
from tests.conftest import assert_refused_in_one_sentence, build_method, build_session, compose_cfg, shared_scope

# 4 forget and 4 retain images of 2 sampling steps, batches of 2: the method starts in about a second on the tiny model
SMALL = ["method.num_forget_images=4", "method.num_retain_images=4", "method.image_steps=2", "method.batch_size=2",
         "method.mask_batch_size=2"]


@pytest.fixture(scope=shared_scope)
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("salun_cache")  # the generated sets, shared by this module's tests


def overrides(cache, extra=()):
    return ["model=tiny", "concept=nudity", "method=salun", *SMALL, f"method.cache_dir={cache}",
            "trainer.preview_every=0", *extra]


def config(cache, extra=()):
    return compose_cfg(overrides(cache, extra))


def build(cache, extra=(), seed=0):
    """What erasure.session.Session.create sets up before the loop: the method on the tiny model, and its context."""
    method, ctx, _ = build_method(overrides(cache, extra), generator_seed=seed)
    return method, ctx


# ---------------------------------------------------------------------------------------------- formulas by hand


def test_mask_by_hand_global_ranking_and_ties():
    grads = {"a": torch.tensor([3.0, -1.0]), "b": torch.tensor([[0.5, 2.0], [-4.0, 0.0]])}
    # N = 6, keep int(0.5 * 6) = 3 by |g| over both tensors at once: 4, 3, 2
    mask = top_fraction_mask(grads, 0.5)
    assert mask["a"].tolist() == [True, False]
    assert mask["b"].tolist() == [[False, True], [True, False]]
    assert mask["a"].dtype == torch.bool
    # a per-tensor threshold would keep one of a's two entries and two of b's four: the same here, so make them differ
    lopsided = {"a": torch.tensor([5.0, 6.0]), "b": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    m = top_fraction_mask(lopsided, 0.5)
    assert m["a"].tolist() == [True, True] and m["b"].tolist() == [False, False, False, True]  # global: 6, 5, 4
    # ties at the threshold are kept by position, and exactly int(f N) entries are kept
    tied = {"a": torch.tensor([1.0, -1.0]), "b": torch.tensor([1.0, 0.0])}
    assert top_fraction_mask(tied, 0.5)["a"].tolist() == [True, True]
    assert top_fraction_mask(tied, 0.5)["b"].tolist() == [False, False]
    assert top_fraction_mask(tied, 0.75)["b"].tolist() == [True, False]
    assert all(m.all() for m in top_fraction_mask(tied, 1.0).values())
    assert not any(m.any() for m in top_fraction_mask(tied, 0.2).values())  # int(0.8) = 0


def test_mask_matches_a_sort_on_random_saliencies():
    g = torch.Generator().manual_seed(3)
    grads = {"w": torch.randn(37, 5, generator=g), "b": torch.randn(11, generator=g), "c": torch.randn(2, 3, 4, generator=g)}
    flat = torch.cat([v.abs().flatten() for v in grads.values()])
    for fraction in (0.01, 0.3, 0.5, 0.77, 1.0):
        k = int(flat.numel() * fraction)
        expected = torch.zeros(flat.numel(), dtype=torch.bool)
        expected[torch.sort(flat, descending=True).indices[:k]] = True
        got = torch.cat([m.flatten() for m in top_fraction_mask(grads, fraction).values()])
        assert torch.equal(got, expected), fraction


def test_loss_formulas_by_hand_and_the_pseudo_target_is_detached():
    # forgetting loss, w = 1: guided = 2 [1, 0] - [0, 2] = [2, -2]; errors to the noise [1, 1]: [1, -3]; -(1 + 9) / 2
    eps_c, eps_u, noise = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0])
    assert forgetting_loss(eps_c, eps_u, noise, 1.0).item() == pytest.approx(-5.0)
    # w = 7.5: guided = 8.5 [1, 0] - 7.5 [0, 2] = [8.5, -15]; errors [7.5, -16]
    assert forgetting_loss(eps_c, eps_u, noise, 7.5).item() == pytest.approx(-(7.5**2 + 16**2) / 2)
    pred_f = torch.tensor([1.0, 2.0], requires_grad=True)
    target = torch.tensor([0.0, 4.0], requires_grad=True)
    pred_r, noise_r = torch.tensor([1.0, 1.0], requires_grad=True), torch.tensor([0.0, 3.0])
    forget, retain = unlearning_losses(pred_f, target, pred_r, noise_r)
    assert forget.item() == pytest.approx((1 + 4) / 2) and retain.item() == pytest.approx((1 + 4) / 2)
    (forget + 0.5 * retain).backward()
    assert target.grad is None  # sg[eps(x_t, c_p)]
    torch.testing.assert_close(pred_f.grad, torch.tensor([1.0, -2.0]))  # d/dp mean((p - t)^2) = (p - t)
    torch.testing.assert_close(pred_r.grad, 0.5 * torch.tensor([1.0, -2.0]))


# ------------------------------------------------------------------------------------- on the tiny model, second routes


@pytest.mark.parametrize("size", [2, 3])  # 3: batches of 3 and 1 (a batch of 3 tells chunk(2) from chunk(3))
def test_mask_equals_a_second_autograd_route_of_the_forgetting_loss(cache, size):
    m, ctx = build(cache, [f"method.mask_batch_size={size}"])
    assert m.cfg.mask_threshold == 0.5 and m.cfg.mask_guidance == 7.5
    # the same draws (the method's generator, t then noise per batch), the same images, a separately built UNet;
    # the two branches as two UNet calls, the gradients of the batches summed by hand
    models = load_models(ctx.cfg.model, "cpu")
    params = dict(models.unet.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    acp = models.scheduler.alphas_cumprod
    for start in range(0, 4, size):
        x0 = m.forget[start:start + size]
        t = torch.randint(0, 1000, (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        e_c = models.encode_text(m.forget_of[start:start + size])
        e_u = models.encode_text([""] * len(x0))
        eps_c = models.unet(x_t, t, encoder_hidden_states=e_c).sample
        eps_u = models.unet(x_t, t, encoder_hidden_states=e_u).sample
        loss = -((8.5 * eps_c - 7.5 * eps_u - noise) ** 2).mean()
        for (n, _), gr in zip(params.items(), torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            if gr is not None:
                total[n] += gr
    saliency = {n: v.abs() for n, v in total.items()}
    flat = torch.cat([v.flatten() for v in saliency.values()])
    k = int(flat.numel() * 0.5)
    threshold = torch.sort(flat, descending=True).values[k - 1]
    assert set(m.masks) == set(ctx.trainable) == set(params)  # params=full: every UNet weight is trained and masked
    disagree, total_kept = 0, 0
    for n, s in saliency.items():
        expected = s >= threshold
        differ = expected != m.masks[n]
        # the two routes round differently, so only weights at the threshold itself may fall on the other side
        assert torch.allclose(s[differ], threshold.expand_as(s[differ]), rtol=1e-3), n
        disagree += int(differ.sum())
        total_kept += int(m.masks[n].sum())
    assert total_kept == k  # exactly half of the UNet, as generate_mask.py's int(0.5 N)
    assert disagree <= flat.numel() * 1e-4
    assert m.kept_fraction == pytest.approx(0.5, abs=1e-6)


def test_loss_terms_equal_a_second_route_on_the_same_draws(cache):
    m, ctx = build(cache, ["method.alpha=0.3"])
    d = m.draw(1)
    assert d["forget_idx"] == [0, 1] and len(d["retain_idx"]) == 2  # forget batches in order (setup_forget_data)
    terms = m.losses(d)
    unet, models = ctx.unet, ctx.models
    acp = models.scheduler.alphas_cumprod

    def noised(x0, t, noise):
        a = acp[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    fi, ri = d["forget_idx"], d["retain_idx"]
    x_f = noised(m.forget[fi], d["t_f"], d["noise_f"])
    x_r = noised(m.retain[ri], d["t_r"], d["noise_r"])
    assert [m.forget_of[i] for i in fi] == ["a photo of a nude person"] * 2  # conf/concept/nudity.yaml (README l.64)
    assert [m.pseudo_of[i] for i in fi] == ["a photo of a person wearing clothes"] * 2
    pred_f = unet(x_f, d["t_f"], encoder_hidden_states=models.encode_text([m.forget_of[i] for i in fi])).sample
    target = unet(x_f, d["t_f"], encoder_hidden_states=models.encode_text([m.pseudo_of[i] for i in fi])).sample
    pred_r = unet(x_r, d["t_r"], encoder_hidden_states=models.encode_text([m.retain_of[i] for i in ri])).sample
    forget = ((pred_f - target.detach()) ** 2).mean()
    retain = ((pred_r - d["noise_r"]) ** 2).mean()
    torch.testing.assert_close(terms["forget"], forget, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(terms["retain"], retain, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(terms["loss"], forget + 0.3 * retain, rtol=1e-4, atol=1e-7)
    assert terms["mask_kept"].item() == pytest.approx(0.5, abs=1e-6)
    # the gradients agree too (the target is detached in both; the mask hooks act on both alike)
    probe = [p for n, p in ctx.trainable.items() if "attn2.to_k" in n][0]
    g_method = torch.autograd.grad(terms["loss"], probe)[0]
    g_hand = torch.autograd.grad(forget + 0.3 * retain, probe)[0]
    torch.testing.assert_close(g_method, g_hand, rtol=1e-3, atol=1e-9)


def test_masked_weights_never_move_through_the_shared_loop_and_the_others_do(cache):
    session = build_session(overrides(cache, ["method.lr=1e-3", "trainer.iterations=3"]))[0]
    masks = session.method.masks
    before = {n: p.detach().clone() for n, p in session.trainable.items()}
    for step in (1, 2, 3):
        session.step(step)
    moved_kept, kept = 0, 0
    for n, p in session.trainable.items():
        frozen = ~masks[n]
        assert torch.equal(p.detach()[frozen], before[n][frozen]), n  # not a single masked weight moved
        moved_kept += int((p.detach()[masks[n]] != before[n][masks[n]]).sum())
        kept += int(masks[n].sum())
    assert kept > 0 and moved_kept > 0.95 * kept  # the salient half is trained
    for n, p in session.teacher.params.items():  # the frozen teacher still holds the base weights
        torch.testing.assert_close(p, before[n])


def test_without_the_mask_every_weight_moves(cache):
    session = build_session(overrides(cache, ["method.lr=1e-3", "trainer.iterations=2", "method.use_mask=false"]))[0]
    assert session.method.masks == {}
    before = {n: p.detach().clone() for n, p in session.trainable.items()}
    session.step(1)
    moved = sum(int((p.detach() != before[n]).sum()) for n, p in session.trainable.items())
    assert moved > 0.95 * sum(p.numel() for p in before.values())


@pytest.mark.parametrize("n_retain, fresh_at", [(6, {1, 3}), (2, {1, 2, 3, 4})])
def test_a_fresh_retain_pass_at_each_epoch_and_whenever_one_runs_out(cache, n_retain, fresh_at):
    """random_label.py l.67-76: the retain loader is restarted at each epoch's start (here every 2 steps: 4 forget
    images in batches of 2) and whenever it runs out. 6 retain images: a pass of 3 batches is cut short at step 3 (a
    new epoch) with one batch left; 2 retain images: one batch a pass, so a fresh pass every step. Each fresh pass is
    torch.randperm of the retain set drawn first from the step's generator (replayed here), cut into batches of 2."""
    m, ctx = build(cache, [f"method.num_retain_images={n_retain}", "method.use_mask=false"])
    expected: list[list[int]] = []
    for step in range(1, 5):
        g = torch.Generator()
        g.set_state(ctx.generator.get_state())
        if step in fresh_at:
            order = torch.randperm(n_retain, generator=g).tolist()
            expected = [order[i:i + 2] for i in range(0, n_retain, 2)]
        assert m.draw(step)["retain_idx"] == expected.pop(0), step


def test_forget_batches_go_in_order_and_each_image_gets_its_own_noise(cache):
    """random_label.py: the forget loader is not shuffled (setup_forget_data), so 6 images in batches of 2 give the
    batches [0, 1], [2, 3], [4, 5], then [0, 1] again; t and ε are drawn per image (one row each)."""
    m, _ = build(cache, ["method.num_forget_images=6", "method.use_mask=false"])
    draws = [m.draw(step) for step in range(1, 5)]
    assert [d["forget_idx"] for d in draws] == [[0, 1], [2, 3], [4, 5], [0, 1]]
    for d in draws:
        assert d["noise_f"].shape == (2, *m.forget.shape[1:]) and d["noise_r"].shape == (2, *m.retain.shape[1:])
        assert not torch.equal(d["noise_f"][0], d["noise_f"][1]) and not torch.equal(d["noise_r"][0], d["noise_r"][1])
        assert d["t_f"].shape == (2,) and d["t_r"].shape == (2,)


def test_a_loaded_mask_replaces_the_computed_one_and_the_draws_continue(cache):
    a, ctx_a = build(cache)
    a.draw(1), a.draw(2)
    state, gen = a.state_dict(), ctx_a.generator.get_state()
    assert set(state["masks"]) == set(ctx_a.trainable) and all(v.dtype == torch.bool for v in state["masks"].values())
    b, ctx_b = build(cache, seed=123)  # a different generator: b's own mask differs from a's
    assert any(not torch.equal(b.masks[n], a.masks[n]) for n in a.masks)
    b.load_state_dict({**state, "masks": {n: v.clone() for n, v in state["masks"].items()}})
    ctx_b.generator.set_state(gen)
    assert all(torch.equal(b.masks[n], a.masks[n]) for n in a.masks)
    da, db = a.draw(3), b.draw(3)
    assert da["forget_idx"] == db["forget_idx"] and da["retain_idx"] == db["retain_idx"]
    assert torch.equal(da["noise_f"], db["noise_f"]) and torch.equal(da["t_r"], db["t_r"])
    b.losses(db)["loss"].backward()  # b's hooks now apply the loaded mask
    for n, p in ctx_b.trainable.items():
        assert not p.grad[~a.masks[n]].any(), n


def test_forget_and_retain_sets_are_cached_and_reading_them_changes_nothing(cache, tmp_path, monkeypatch):
    fresh = tmp_path / "cache"
    first, ctx1 = build(fresh)
    files = sorted((fresh / "latents").glob("*.safetensors"))
    assert len(files) == 2  # D_f and D_r
    state1 = ctx1.generator.get_state()

    def no_generation(*args, **kwargs):
        raise AssertionError("the sets should come from the cache")

    monkeypatch.setattr(common, "generate", no_generation)
    second, ctx2 = build(fresh)
    assert torch.equal(second.forget, first.forget) and torch.equal(second.retain, first.retain)
    assert second.forget_of == first.forget_of and second.retain_of == first.retain_of
    assert torch.equal(ctx2.generator.get_state(), state1)  # the method's generator does not see the cache
    assert all(torch.equal(second.masks[n], first.masks[n]) for n in first.masks)
    assert not torch.equal(first.forget, first.retain)  # D_f and D_r from different seeds
    # another count is another set
    monkeypatch.undo()
    build(fresh, ["method.num_forget_images=3"])
    assert len(list((fresh / "latents").glob("*.safetensors"))) == 3


# ------------------------------------------------------------------------------------------ end to end, refusals


def test_two_iterations_end_to_end_and_a_resume_continues_exactly(cache, tmp_path):
    common_args = ["trainer.iterations=4", "trainer.checkpoint_every=2", "method.lr=1e-3"]
    ref = train(config(cache, common_args), tmp_path / "ref")
    summary = json.loads((ref / "summary.json").read_text())
    assert summary["method"] == "salun" and summary["params"] == "full" and summary["iterations"] == 4
    assert set(summary["final"]) >= {"loss", "forget", "retain", "mask_kept"}
    tensors, _ = read_delta(ref)
    base = dict(load_models(config(cache).model, "cpu").unet.named_parameters())
    assert max((tensors[n] - base[n].detach()).abs().max().item() for n in tensors) > 0
    # a run cut after its step-2 checkpoint and resumed gives the same delta, bit for bit
    cut = tmp_path / "cut"
    shutil.copytree(ref, cut)
    assert [c.name for c in sorted((cut / "checkpoints").iterdir())] == ["step_000002"]  # none at the last step
    for name in ("delta.safetensors", "summary.json"):
        (cut / name).unlink()
    train(compose_cfg([f"resume={cut}"]), cut)
    assert (cut / "delta.safetensors").read_bytes() == (ref / "delta.safetensors").read_bytes()


def test_bad_configs_are_refused_in_one_sentence():
    base = ["model=tiny", "concept=nudity", "method=salun"]
    assert_refused_in_one_sentence([*base, "method.mask_threshold=1.5"], "mask_threshold")
    assert_refused_in_one_sentence([*base, "method.mask_threshold=0"], "mask_threshold")
    assert_refused_in_one_sentence([*base, "method.alpha=-1"], "method.alpha")
    assert_refused_in_one_sentence([*base, "method.weight_decay=0.01"], "weight_decay must be 0 with the saliency mask")
    assert_refused_in_one_sentence([*base, "method.batch_size=0"], "method.batch_size")
    assert_refused_in_one_sentence(["model=tiny", "concept=red", "method=salun"], "has no SalUn data")
    assert_refused_in_one_sentence([*base, "concept.salun.pseudo_prompts=[a,b]"], "pseudo_prompts has 2 prompts")
    assert_refused_in_one_sentence([*base, "+concept.salun.unknown=1"], "concept.salun")
    validate(compose_cfg([*base, "method.use_mask=false", "method.weight_decay=0.01"]))  # no mask, nothing to move


def test_the_concept_section_needs_pseudo_and_retain_prompts_and_counts_forget_prompts_from_the_targets():
    """Without ``forget_prompts`` the concept's targets are the forget prompts: two targets take one pseudo prompt or
    two; a section missing either its pseudo or its retain prompts is refused."""
    two = ["model=tiny", "concept=nudity", "method=salun", "concept.salun.forget_prompts=[]",
           "concept.targets=[nudity,nakedness]"]
    for pseudo in ("[clothes]", "[clothes,a dress]"):
        validate(compose_cfg([*two, f"concept.salun.pseudo_prompts={pseudo}"]))
    assert_refused_in_one_sentence([*two, "concept.salun.pseudo_prompts=[a,b,c]"],
                                   "pseudo_prompts has 3 prompts for 2 forget prompts")
    for empty in ("pseudo_prompts", "retain_prompts"):
        assert_refused_in_one_sentence(["model=tiny", "concept=nudity", "method=salun", f"concept.salun.{empty}=[]"],
                                       "concept 'nudity' has no SalUn data")


def test_every_concept_either_runs_salun_or_says_why_not():
    runs = []
    for concept in group_options("concept"):
        try:
            validate(compose_cfg(["model=tiny", f"concept={concept}", "method=salun"]))
            runs.append(concept)
        except UserError as err:
            assert "\n" not in str(err) and "has no SalUn data" in str(err), concept
    assert {"circle", "nudity"} <= set(runs)


@pytest.mark.parametrize("pseudo, expected", [(["x"], ["x", "x", "x"]), (["x", "y", "z"], ["x", "y", "z"])])
def test_one_pseudo_prompt_serves_every_forget_prompt(pseudo, expected):
    """nsfw_removal.py pairs each forget prompt with a pseudo prompt: one given serves all, else one per forget
    prompt, in order; the retain prompts come as they are."""
    from baselines.salun import SalUn

    cfg = compose_cfg(["model=tiny", "concept=nudity", "method=salun", "concept.salun.forget_prompts=[a,b,c]",
                       "concept.salun.pseudo_prompts=[" + ",".join(pseudo) + "]",
                       "concept.salun.retain_prompts=[r1,r2]"])
    assert SalUn.prompts(cfg.concept) == (["a", "b", "c"], expected, ["r1", "r2"])


def test_a_subset_beyond_the_unet_is_refused_in_one_sentence(cache):
    """The saliency mask covers UNet weights: a subset with text-encoder weights stops when the method is made,
    before any image is generated."""
    with pytest.raises(UserError, match=r"SalUn masks UNet weights only, and params=text_encoder_layer0 also trains "
                                        r"'text_encoder\.encoder\.layers\.0\.") as err:
        cfg = config(cache, ["params=text_encoder_layer0"])
        method_cls, mcfg = validate(cfg)
        Session.create(cfg, load_models(cfg.model, "cpu"), method_cls, mcfg)
    assert "\n" not in str(err.value)


def test_the_sets_come_from_seeds_image_seed_and_the_next_one(cache, tmp_path):
    """D_f from image_seed, D_r from image_seed + 1 (two seeds, as the official scripts generate the two sets apart):
    each equals cached_latents called directly with that seed, in another cache folder (so generated again)."""
    from baselines.common import cached_latents

    m, ctx = build(cache, ["method.image_seed=11", "method.use_mask=false"])
    forget, pseudo, retain = m.prompts(ctx.concept)
    for got, prompts, count, seed in ((m.forget, forget, 4, 11), (m.retain, retain, 4, 12)):
        again, _ = cached_latents(ctx, prompts, count, m.cfg.image_steps, m.cfg.image_guidance, seed=seed,
                                  cache_dir=tmp_path / "other")
        assert torch.equal(got, again), seed


def test_hooks_taken_off_leave_the_gradients_whole(cache):
    m, ctx = build(cache)
    name, p = next((n, p) for n, p in ctx.trainable.items() if 0 < int(m.masks[n].sum()) < m.masks[n].numel())
    (p.sum() * 2).backward()
    assert p.grad[~m.masks[name]].eq(0).all() and p.grad[m.masks[name]].eq(2).all()  # masked while hooked
    p.grad = None
    m.remove_hooks()
    (p.sum() * 2).backward()
    assert p.grad.eq(2).all()


def test_saliency_sums_low_precision_weights_in_float32_and_gives_unused_weights_zero(cache):
    """With ``trainer.precision`` on a GPU the frozen weights are held in bfloat16 and their per-batch gradients are
    summed in float32 (generate_mask.py sums on float32 CPU copies, l.69); a weight the loss never reaches gets a zero
    saliency. Here two cross-attention weights are cast to bfloat16 and both routes run under CPU autocast: the
    method's saliency over 2 forget batches against the batches' gradients taken one by one and summed by hand."""
    m, ctx = build(cache)
    unet = ctx.unet
    low = [n for n, _ in unet.named_parameters() if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))][:2]
    assert len(low) == 2
    with torch.no_grad():
        for n in low:
            unet.get_parameter(n).data = unet.get_parameter(n).data.to(torch.bfloat16)
    unet.register_parameter("unused_for_the_test", torch.nn.Parameter(torch.ones(3)))
    params = dict(unet.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    before = ctx.generator.get_state()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m.saliency()
    # the second route: the same draws (t then ε per batch of 2, in order) from a copy of the generator
    g = torch.Generator().set_state(before)
    total = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()}
    names = [n for n in params if n != "unused_for_the_test"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for start in (0, 2):
            idx = [start, start + 1]
            t = torch.randint(0, 1000, (2,), generator=g)
            noise = torch.randn((2, *m.forget.shape[1:]), generator=g)
            x_t = ctx.models.scheduler.add_noise(m.forget[idx], noise, t)
            emb = torch.cat([m._embed([m.forget_of[i] for i in idx]), m._embed(["", ""])])
            eps_c, eps_u = student_eps(unet, torch.cat([x_t, x_t]), torch.cat([t, t]), emb).chunk(2)
            loss = -((8.5 * eps_c.float() - 7.5 * eps_u.float() - noise) ** 2).mean()
            for n, gr in zip(names, torch.autograd.grad(loss, [params[n] for n in names])):
                total[n] += gr.float()
    for n in low:
        assert got[n].dtype == torch.float32
        assert torch.equal(got[n], total[n].abs()), n  # float32 sums of bfloat16 gradients, not bfloat16 sums
        assert got[n].abs().sum() > 0
    for n in ("conv_in.weight", "conv_out.bias"):
        torch.testing.assert_close(got[n], total[n].abs(), rtol=1e-5, atol=0)
    assert got["unused_for_the_test"].dtype == torch.float32 and got["unused_for_the_test"].eq(0).all()
    assert all(p.grad is None and p.requires_grad == flags[n] for n, p in params.items())
