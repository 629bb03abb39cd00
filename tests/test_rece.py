"""RECE (baselines/rece.py): the adversarial embedding against an independent least-squares solve, the official code's
matrices and gradient descent, by hand on small tensors; the whole edit on the tiny model against a second route
(torch.linalg.lstsq for every stage), what each epoch's re-erasure reduces, the trainer's delta (attn2 to_k/to_v only)
and refused configs."""
from __future__ import annotations

import json

import pytest
import torch

from baselines.rece import RECE, adversarial_embedding, output_gap, regulariser_terms
from baselines.uce import UCE, encode
from erasure.delta import load_run, read_delta
from erasure.errors import UserError
from erasure.method import TrainContext
from erasure.trainer import train
from tests.conftest import assert_refused_in_one_sentence, compose_cfg, shared_scope
from tests.test_uce import lstsq_edit

F64 = dict(dtype=torch.float64)
KV = (".attn2.to_k.", ".attn2.to_v.")


def lstsq_adversarial(edited, base, c, ridge, anchor, surrogate):
    """min_a Σ_l |W_l a − W*_l c|² + ridge |a − b|² + surrogate Σ_l |W_l a − W_l c|² as one stacked least-squares
    problem X a ≈ y per row of c, solved by torch.linalg.lstsq (no normal equations written out)."""
    d = c.shape[1]
    b = torch.zeros_like(c) if anchor is None else anchor
    x = torch.cat([*edited, *[surrogate ** 0.5 * w for w in edited], ridge ** 0.5 * torch.eye(d, **F64)])
    y = torch.cat([*[w0 @ c.T for w0 in base], *[surrogate ** 0.5 * w @ c.T for w in edited], ridge ** 0.5 * b.T])
    return torch.linalg.lstsq(x, y).solution.T


def official_matrices(edited, base, c, kind, item, lam, old=None):
    """The official closed forms transcribed as matrices (close_form_emb.py@403a67f): mat1, mat2 and a = f(mat1, mat2)."""
    d = c.shape[1]
    gram = sum(w.T @ w for w in edited)
    cross = sum(w.T @ w0 for w, w0 in zip(edited, base))
    eye = torch.eye(d, **F64)
    if kind == "zero":  # l.202-209
        return c @ (torch.linalg.inv(lam * eye + gram) @ cross).T
    if kind == "standard":  # l.101-117: mat2 = lam * old + c mat2_2ᵀ, a = mat2 inv(mat1)ᵀ
        return (lam * old + c @ cross.T) @ torch.linalg.inv(lam * eye + gram).T
    start = torch.zeros(d, d, **F64) if "1" in item else lam * eye  # l.80-87
    mat1 = start + ((1 + lam) * gram if item in ("1st", "both") else gram)  # l.88-96
    mat2 = start + (cross + lam * gram if item in ("1st", "both") else cross)
    return c @ (torch.linalg.inv(mat1) @ mat2).T  # l.97-98


def small_problem(seed=0, d=6):
    g = torch.Generator().manual_seed(seed)
    edited = [torch.randn(out, d, generator=g, **F64) for out in (5, 4, 7)]
    base = [w + 0.5 * torch.randn(w.shape, generator=g, **F64) for w in edited]
    return edited, base, torch.randn(3, d, generator=g, **F64), torch.randn(3, d, generator=g, **F64)


@pytest.mark.parametrize("kind,item", [("zero", "1st"), ("standard", "1st"), ("surrogate", "1st"),
                                       ("surrogate", "2nd"), ("surrogate", "both")])
@pytest.mark.parametrize("lam", [0.1, 2.0])
def test_adversarial_embedding_is_the_regularised_least_squares_minimiser(kind, item, lam):
    edited, base, c, guide = small_problem()
    ridge, anchor_kind, surrogate = regulariser_terms(kind, item, lam)
    anchor = {None: None, "guide": guide, "concept": c}[anchor_kind]
    got = adversarial_embedding(edited, base, c, ridge, anchor, surrogate)
    torch.testing.assert_close(got, lstsq_adversarial(edited, base, c, ridge, anchor, surrogate), rtol=1e-9, atol=1e-9)
    # the same embedding as the official code's matrices (the standard regulariser anchored on the guide)
    torch.testing.assert_close(got, official_matrices(edited, base, c, kind, item, lam, old=guide), rtol=1e-9, atol=1e-9)


def test_adversarial_embedding_by_gradient_descent():
    """Plain gradient descent on Σ_l |W_l a − W*_l c|² + λ|a|² (autograd, no closed form) ends at the closed form."""
    edited, base, c, _ = small_problem(seed=3, d=4)
    c = c[:1]
    lam = 0.3
    a = torch.zeros_like(c, requires_grad=True)
    lipschitz = 2 * torch.linalg.eigvalsh(sum(w.T @ w for w in edited) + lam * torch.eye(4, **F64)).max()
    for _ in range(3000):
        loss = sum((a @ w.T - c @ w0.T).pow(2).sum() for w, w0 in zip(edited, base)) + lam * a.pow(2).sum()
        (grad,) = torch.autograd.grad(loss, a)
        with torch.no_grad():
            a -= grad / lipschitz
    torch.testing.assert_close(adversarial_embedding(edited, base, c, ridge=lam), a.detach(), rtol=1e-7, atol=1e-7)


def test_zero_regulariser_by_hand():
    """Diagonal case: the edit scaled the concept's second direction by 1/2 (W = diag(1, 1/2), W* = I). The embedding
    that regenerates W* c exactly amplifies it back, a = W⁻¹ c = [1, 2]; λ‖a‖² shrinks each direction by
    s / (s² + λ): λ = 1/4 gives a = [1 / 1.25, 0.5 / 0.5] = [0.8, 1.0]."""
    w, w_star, c = torch.diag(torch.tensor([1.0, 0.5], **F64)), torch.eye(2, **F64), torch.tensor([[1.0, 1.0]], **F64)
    torch.testing.assert_close(adversarial_embedding([w], [w_star], c, ridge=1e-12), torch.tensor([[1.0, 2.0]], **F64))
    torch.testing.assert_close(adversarial_embedding([w], [w_star], c, ridge=0.25), torch.tensor([[0.8, 1.0]], **F64))
    # two projections, W_1 = W*_1 = diag(1, 1/2) and W_2 = W*_2 = I: G = H = diag(2, 5/4), so a = G / (G + λ) c
    got = adversarial_embedding([w, torch.eye(2, **F64)], [w, torch.eye(2, **F64)], c, ridge=0.5)
    torch.testing.assert_close(got, torch.tensor([[2 / 2.5, 1.25 / 1.75]], **F64))


# ---- the whole edit on the tiny model ----

def build(overrides, models=None):
    from erasure.models import load_models

    cfg = compose_cfg(["model=tiny", "concept=nudity", *overrides])
    models = models or load_models(cfg.model, "cpu")
    trainable = {n: p for n, p in models.unet.named_parameters() if any(k in n for k in KV)}
    method_cls = RECE if cfg.method.name == "rece" else UCE
    ctx = TrainContext(models, trainable, None, cfg.concept, cfg, torch.Generator().manual_seed(0))
    return method_cls(method_cls.parse_config(cfg.method), ctx), models


@pytest.fixture(scope=shared_scope)
def rece_tiny():
    method, models = build(["method=rece"])
    return method, method.closed_form(), models


def test_edit_matches_a_second_route(rece_tiny):
    """UCE stage and three epochs recomputed with torch.linalg.lstsq from the encoder outputs: the UCE stage with
    train_uce.py's rows (target from its last subject token, guide "" from position 0, "" preserved on all 77 positions,
    scales 1, λ 0.5), each epoch's embedding from every projection at once, its re-erasure anchored on the current
    weights (λ 0.1, s_e 1, s_p 0.1, "" preserved on all positions)."""
    method, edited, models = rece_tiny
    emb, index = encode(models, ["nudity", ""])
    target, empty = emb[0].double(), emb[1].double()
    k = index[0]
    assert index[1] == 0 and k > 0
    erase, guide0 = target[k:], empty[:77 - k]
    names = sorted(method.base)
    base = [method.base[n].double() for n in names]
    weights = [lstsq_edit(w, erase, guide0, empty, 0.5, 1.0, 1.0) for w in base]
    for _ in range(3):
        adv = lstsq_adversarial(weights, base, target, 0.1, None, 0.0)
        weights = [lstsq_edit(w, adv, empty, empty, 0.1, 1.0, 0.1) for w in weights]
    for name, expected in zip(names, weights):
        torch.testing.assert_close(edited[name].double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("regularizer, item, ridge, anchor, surrogate", [
    ("standard", "1st", 0.1, "guide", 0.0), ("surrogate", "2nd", 0.1, "concept", 0.0),
    ("surrogate", "both", 0.1, "concept", 0.1)])
def test_one_epoch_with_each_anchored_regulariser_matches_a_second_route(rece_tiny, regularizer, item, ridge, anchor,
                                                                          surrogate):
    """emb.py's other regularisers (ridge toward the guide's rows, toward the concept's own rows, and the surrogate
    term), one epoch after the UCE stage, recomputed with torch.linalg.lstsq as above."""
    _, _, models = rece_tiny
    method, _ = build(["method=rece", "method.epochs=1", f"method.regularizer={regularizer}",
                       f"method.reg_item={item}"], models)
    edited = method.closed_form()
    emb, index = encode(models, ["nudity", ""])
    target, empty = emb[0].double(), emb[1].double()
    k = index[0]
    names = sorted(method.base)
    base = [method.base[n].double() for n in names]
    weights = [lstsq_edit(w, target[k:], empty[:77 - k], empty, 0.5, 1.0, 1.0) for w in base]
    adv = lstsq_adversarial(weights, base, target, ridge, {"guide": empty, "concept": target}[anchor], surrogate)
    weights = [lstsq_edit(w, adv, empty, empty, 0.1, 1.0, 0.1) for w in weights]
    for name, expected in zip(names, weights):
        torch.testing.assert_close(edited[name].double(), expected, rtol=1e-4, atol=1e-5)
    h = method.history[0]  # the record of the epoch, by hand
    out = [target @ w.T for w in base]
    norm = sum(float(o.pow(2).sum()) for o in out)
    after = sum(float((adv @ w.T - o).pow(2).sum()) for w, o in zip(weights, out)) / norm
    assert h["epoch"] == 1 and h["regenerate_after"] == pytest.approx(after, rel=1e-4)
    assert h["adv_norm"] == pytest.approx(float(adv.norm(dim=1).mean()), rel=1e-6)
    assert h["concept_norm"] == pytest.approx(float(target.norm(dim=1).mean()), rel=1e-6)
    assert 0 < h["seconds"] < 60


def test_each_epoch_erases_its_adversarial_embedding(rece_tiny):
    """Before its re-erasure the derived embedding regenerates the concept's base outputs closely; the re-erasure sends
    it to the guide's outputs (distance cut by more than 10x), after which it regenerates the concept at least twice
    as badly, and the next epoch's best embedding fits worse than this one did."""
    method, _, _ = rece_tiny
    history = method.history
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for h in history:
        assert h["guide_gap_after"] < 0.1 * h["guide_gap_before"], h
        assert h["regenerate_after"] > 2 * h["regenerate_before"], h
        assert h["adv_norm"] < h["concept_norm"], h  # λ_r‖a‖² keeps it shorter than the concept's own rows
    fits = [h["regenerate_before"] for h in history]
    assert fits == sorted(fits) and fits[0] < fits[-1], fits


@pytest.mark.parametrize("tokens", ["trailing", "last"])
def test_zero_epochs_is_the_uce_edit_of_train_uce(rece_tiny, tokens):
    """epochs=0 leaves the UCE stage: UCE's own edit with the same tokens, "" preserved at scale 1."""
    _, _, models = rece_tiny
    rece, _ = build(["method=rece", "method.epochs=0", f"method.uce_tokens={tokens}"], models)
    uce, _ = build(["method=uce", f"method.tokens={tokens}", "+concept.uce.preserve=['']"], models)
    got, expected = rece.closed_form(), uce.closed_form()
    assert set(got) == set(expected) and all(torch.allclose(got[n], expected[n], atol=1e-6) for n in got)


@pytest.mark.parametrize("scale, uce_scale", [(None, 0.333), (0.7, 0.7)])
def test_the_uce_stages_preserve_scale(rece_tiny, scale, uce_scale):
    """train_uce.py l.291-294: with no scale given, the UCE stage preserves its n prompts ("" and the concept's) at
    max(0.1, 1/n) rounded to 3 places, here 1/3 -> 0.333; a given uce_preserve_scale is used as it is."""
    _, _, models = rece_tiny
    preserve = "+concept.uce.preserve=['a cat','a dog']"
    rece, _ = build(["method=rece", "method.epochs=0", preserve,
                     *([f"method.uce_preserve_scale={scale}"] if scale is not None else [])], models)
    uce, _ = build(["method=uce", "method.tokens=trailing", "+concept.uce.preserve=['','a cat','a dog']",
                    f"method.preserve_scale={uce_scale}"], models)
    got, expected = rece.closed_form(), uce.closed_form()
    assert set(got) == set(expected) and all(torch.allclose(got[n], expected[n], atol=1e-6) for n in got)
    other, _ = build(["method=uce", "method.tokens=trailing", "+concept.uce.preserve=['','a cat','a dog']",
                      "method.preserve_scale=0.334"], models)  # one step of the rounding away: a different edit
    assert any(not torch.allclose(got[n], v, atol=1e-6) for n, v in other.closed_form().items())


def test_output_gap_by_hand():
    """Σ_l ‖rows W_lᵀ − targets_l‖²: rows (1, 2) and (0, 1); W_1 = I, W_2 = 2 I; targets all ones."""
    rows = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    weights = [torch.eye(2), 2 * torch.eye(2)]
    ones = torch.ones(2, 2, dtype=torch.float64)
    # W_1: rows - 1 = (0, 1), (-1, 0): 2;  W_2: 2 rows - 1 = (1, 3), (-1, 1): 12
    assert output_gap(weights, rows, [ones, ones]) == 14.0
    with pytest.raises(ValueError):
        output_gap(weights, rows, [ones])  # one target per projection


@pytest.mark.parametrize("method,keys", [("uce", ["erase_scale"]), ("rece", ["uce_erase_scale", "erase_scale"])])
def test_edit_strength_scales_the_official_erase_scales(rece_tiny, method, keys):
    """The erasure curve of a closed-form method (closed_form_at, used by the probe): fraction f of the edit strength
    is the edit of a config whose official erase scales are f times theirs, built separately; the config is restored;
    and as f -> 0 the edit goes back to the base weights (UCE's solve without erase rows returns W_old)."""
    _, _, models = rece_tiny
    edit, _ = build([f"method={method}"], models)
    assert list(edit.strength_keys) == keys
    for f in (0.25, 1.0):
        scaled, _ = build([f"method={method}", *[f"method.{k}={f}" for k in keys]], models)
        got, expected = edit.closed_form_at(f), scaled.closed_form()
        assert set(got) == set(expected)
        for n in got:
            torch.testing.assert_close(got[n], expected[n], rtol=1e-6, atol=1e-7)
    assert all(getattr(edit.cfg, k) == 1.0 for k in keys)  # restored
    tiny = edit.closed_form_at(1e-9)
    assert max(float((tiny[n] - edit.base[n]).abs().max()) for n in tiny) < 1e-6
    full = edit.closed_form_at(1.0)
    assert max(float((full[n] - edit.base[n]).abs().max()) for n in full) > 1e-3
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        edit.closed_form_at(0.0)


@pytest.fixture(scope=shared_scope)
def rece_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("rece")
    train(compose_cfg(["model=tiny", "concept=nudity", "method=rece", "trainer.preview_every=0"]), run)
    return run


def test_trainer_writes_the_edit_as_the_delta(rece_run, rece_tiny):
    _, edited, _ = rece_tiny
    tensors, meta = read_delta(rece_run)
    assert meta["method"] == "rece" and meta["params"] == "xattn_kv" and meta["iterations"] == "1"
    _, base = load_run(rece_run, "cpu", base=True)
    kv = {n for n, _ in base.unet.named_parameters() if any(k in n for k in KV) and n.endswith(".weight")}
    assert set(tensors) == kv  # attn2 to_k/to_v weights, nothing else
    for name, value in tensors.items():
        torch.testing.assert_close(value, edited[name], rtol=1e-5, atol=1e-6)
    _, erased = load_run(rece_run, "cpu")  # erasure.generate's loader
    named = dict(erased.unet.named_parameters())
    assert all(torch.equal(named[n].detach(), t) for n, t in tensors.items())
    rows = [json.loads(line) for line in (rece_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["relative_change"] > 0


@pytest.mark.parametrize("overrides,match", [
    (["method.epochs=-1"], "method.epochs must be >= 0"),
    (["method.regularizer=l2"], "method.regularizer must be one of zero, standard, surrogate"),
    (["method.reg_item=3rd"], "method.reg_item must be one of"),
    (["method.lamb=0"], "method.lamb must be > 0"),
    (["method.uce_preserve_scale=-1"], "method.uce_preserve_scale must be >= 0"),
    (["method.uce_tokens=all"], "method.uce_tokens must be last or trailing"),
    (["+concept.uce.preserve=[nudity]"], "concept.uce.preserve lists the target 'nudity'"),
])
def test_bad_config_is_refused_in_one_sentence(overrides, match):
    assert_refused_in_one_sentence(["model=tiny", "concept=nudity", "method=rece", *overrides], match)


def test_a_subset_beyond_attn2_kv_is_refused(tmp_path):
    cfg = compose_cfg(["model=tiny", "concept=nudity", "method=rece", "params=xattn", "trainer.preview_every=0"])
    with pytest.raises(UserError, match=r"RECE edits only .*params=xattn also selects .*use params=xattn_kv"):
        train(cfg, tmp_path)


def test_the_uce_stage_without_the_empty_prompt(rece_tiny):
    """uce_preserve_empty=false: the UCE stage preserves the concept's prompts alone (no "" first, train_uce.py
    l.286 otherwise), so the default scale is max(0.1, 1/2) = 0.5: UCE's own edit of exactly those two prompts."""
    _, _, models = rece_tiny
    preserve = "+concept.uce.preserve=['a cat','a dog']"
    rece, _ = build(["method=rece", "method.epochs=0", preserve, "method.uce_preserve_empty=false"], models)
    uce, _ = build(["method=uce", "method.tokens=trailing", preserve, "method.preserve_scale=0.5"], models)
    got, expected = rece.closed_form(), uce.closed_form()
    assert all(torch.allclose(got[n], expected[n], atol=1e-6) for n in got)
    with_empty, _ = build(["method=uce", "method.tokens=trailing", "+concept.uce.preserve=['','a cat','a dog']",
                           "method.preserve_scale=0.5"], models)  # "" preserved too: another edit
    assert any(not torch.allclose(got[n], v, atol=1e-6) for n, v in with_empty.closed_form().items())


@pytest.mark.parametrize("key", ["regular_scale", "preserve_scale", "uce_preserve_scale"])
def test_a_scale_of_zero_is_allowed_and_a_negative_one_refused(key):
    """λ_r = 0 (no ridge; the system may then be singular, which the solve reports) and s_p = 0 (no preservation
    term, for the re-erasure and for its UCE stage) are valid settings; below 0 is refused. Called on the class, not
    through erasure.config.validate, whose per-process memo would hide it."""
    from baselines.rece import RECEConfig

    RECE.validate(RECEConfig(**{key: 0.0}))
    with pytest.raises(UserError, match=rf"method.{key} must be >= 0, got -0.1"):
        RECE.validate(RECEConfig(**{key: -0.1}))


@pytest.mark.parametrize("key", ["lamb", "uce_lamb", "erase_scale", "uce_erase_scale"])
def test_lambda_and_erase_scales_must_be_positive(key):
    """λ keeps the edit's linear system invertible and s_e = 0 erases nothing: zero is refused, any positive value
    accepted."""
    from baselines.rece import RECEConfig

    RECE.validate(RECEConfig(**{key: 1e-3}))
    with pytest.raises(UserError, match=rf"method.{key} must be > 0"):
        RECE.validate(RECEConfig(**{key: 0.0}))
