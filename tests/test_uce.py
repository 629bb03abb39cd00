"""UCE (baselines/uce.py): its closed form against an independent least-squares solve, the edit's effect by hand on
small tensors, the trainer's closed-form path on the tiny model (delta = the closed form, attn2.to_k/to_v only,
one step) and refused configs."""
from __future__ import annotations

import json

import pytest
import torch

from baselines.uce import UCE, concept_prompts, concept_rows, subject_embeddings, subject_token_index, uce_weight
from erasure.delta import load_run, read_delta
from erasure.errors import UserError
from erasure.trainer import train
from tests.conftest import assert_refused_in_one_sentence, compose_cfg, shared_scope

F64 = dict(dtype=torch.float64)


def lstsq_edit(w_old, erase, guide, preserve, lamb, se, sp):
    """The UCE objective  lamb |W - W_old|^2 + se sum_i |W c_i - W_old g_i|^2 + sp sum_j |W c_j - W_old c_j|^2  as one
    stacked least-squares problem X Wᵀ ≈ Y, solved by torch.linalg.lstsq (no normal equations written out)."""
    d = w_old.shape[1]
    x = torch.cat([lamb ** 0.5 * torch.eye(d, **F64), se ** 0.5 * erase, sp ** 0.5 * preserve])
    y = torch.cat([lamb ** 0.5 * w_old.T, se ** 0.5 * guide @ w_old.T, sp ** 0.5 * preserve @ w_old.T])
    return torch.linalg.lstsq(x, y).solution.T


@pytest.mark.parametrize("lamb,se,sp", [(0.5, 1.0, 1.0), (0.1, 2.0, 0.3), (3.0, 0.5, 5.0)])
def test_closed_form_is_the_least_squares_minimiser(lamb, se, sp):
    g = torch.Generator().manual_seed(0)
    w_old = torch.randn(5, 6, generator=g, **F64)
    erase, guide = torch.randn(2, 6, generator=g, **F64), torch.randn(2, 6, generator=g, **F64)
    preserve = torch.randn(3, 6, generator=g, **F64)
    got = uce_weight(w_old, erase, guide, preserve, lamb, se, sp)
    torch.testing.assert_close(got, lstsq_edit(w_old, erase, guide, preserve, lamb, se, sp), rtol=1e-9, atol=1e-9)
    # the normal equations of the same objective, solved directly: W (lamb I + se EᵀE + sp PᵀP) = lamb W_old + ...
    lhs = lamb * torch.eye(6, **F64) + se * erase.T @ erase + sp * preserve.T @ preserve
    rhs = lamb * w_old + se * (guide @ w_old.T).T @ erase + sp * w_old @ preserve.T @ preserve
    torch.testing.assert_close(got @ lhs, rhs, rtol=1e-9, atol=1e-9)


def test_one_target_by_hand():
    """One target c, guide g, nothing preserved: W_new = W_old + (W_old g - W_old c) cᵀ / (lamb + |c|²), so
    W_new c - W_old g = lamb / (lamb + |c|²) (W_old c - W_old g) (-> 0 as lamb -> 0) and every x ⟂ c is untouched."""
    w_old = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]], **F64)
    c = torch.tensor([[1.0, 1.0, 0.0]], **F64)  # |c|² = 2
    g = torch.tensor([[0.0, 0.0, 1.0]], **F64)
    none = torch.zeros(0, 3, **F64)
    for lamb in (0.5, 0.01):
        w_new = uce_weight(w_old, c, g, none, lamb, 1.0, 1.0)
        v_star, v_old = w_old @ g[0], w_old @ c[0]  # [0, 3] and [3, -1]
        torch.testing.assert_close(w_new @ c[0] - v_star, lamb / (lamb + 2.0) * (v_old - v_star))
        x = torch.tensor([1.0, -1.0, 5.0], **F64)  # x ⟂ c
        torch.testing.assert_close(w_new @ x, w_old @ x)
    # lamb 0.5: W_new c = [0, 3] + 0.2 ([3, -1] - [0, 3]) = [0.6, 2.2]
    torch.testing.assert_close(uce_weight(w_old, c, g, none, 0.5, 1.0, 1.0) @ c[0], torch.tensor([0.6, 2.2], **F64))


def test_preservation_term_keeps_preserved_outputs():
    """A preserved concept orthogonal to the target keeps its output exactly; one that overlaps the target moves less
    with the preservation term than without, and less still with a larger preservation scale."""
    g = torch.Generator().manual_seed(1)
    w_old = torch.randn(4, 5, generator=g, **F64)
    c, guide = torch.tensor([[1.0, 0, 0, 0, 0]], **F64), torch.randn(1, 5, generator=g, **F64)
    ortho = torch.tensor([[0, 1.0, 0, 0, 0]], **F64)
    w_new = uce_weight(w_old, c, guide, ortho, 0.5, 1.0, 1.0)
    torch.testing.assert_close(w_new @ ortho[0], w_old @ ortho[0])
    near = torch.tensor([[1.0, 0.5, 0, 0, 0]], **F64)
    drift = {sp: (uce_weight(w_old, c, guide, near, 0.5, 1.0, sp) @ near[0] - w_old @ near[0]).norm().item()
             for sp in (0.0, 1.0, 100.0)}
    assert drift[0.0] > 0.1 and drift[1.0] < 0.6 * drift[0.0] and drift[100.0] < 0.02 * drift[0.0], drift


def test_subject_token_is_the_one_before_end_of_text(tiny_models):
    tok = tiny_models.tokenizer
    mask = tok(["", "a circle"], padding="max_length", max_length=tok.model_max_length, truncation=True).attention_mask
    assert [subject_token_index(m) for m in mask] == [0, 2]  # <|startoftext|>; "circle" in [sot, a, circle, eot]
    emb = subject_embeddings(tiny_models, ["a circle", ""])
    full = tiny_models.encode_text(["a circle", ""])
    assert torch.equal(emb, torch.stack([full[0, 2], full[1, 0]]))


def test_concept_rows_by_hand():
    """Rows of the edit: ``last`` takes each prompt's last subject token; ``trailing`` (train_erase.py) pairs the
    target's positions from its last subject token k with the guide's from m, both cut to length L - max(k, m), and
    takes every position of a preserved prompt."""
    L = 6
    emb = {name: torch.arange(L, dtype=torch.float64)[:, None] + offset
           for name, offset in (("t", 0.0), ("g", 10.0), ("p", 20.0), ("u", 30.0))}
    index = {"t": 2, "g": 0, "p": 1, "u": 3}
    e, g, p = concept_rows(emb, index, ["t"], ["g"], ["p"], "last")
    assert e.flatten().tolist() == [2.0] and g.flatten().tolist() == [10.0] and p.flatten().tolist() == [21.0]
    e, g, p = concept_rows(emb, index, ["t"], ["g"], ["p"], "trailing")
    assert e.flatten().tolist() == [2.0, 3.0, 4.0, 5.0]  # t[2:6]
    assert g.flatten().tolist() == [10.0, 11.0, 12.0, 13.0]  # g[0:4]
    assert p.flatten().tolist() == [20.0 + i for i in range(L)]
    e, g, p = concept_rows(emb, index, ["t", "p"], ["u", "g"], [], "trailing")
    assert e.flatten().tolist() == [2.0, 3.0, 4.0, 21.0, 22.0, 23.0, 24.0, 25.0]  # t[2:5] (f = 3), then p[1:6] (f = 1)
    assert g.flatten().tolist() == [33.0, 34.0, 35.0, 10.0, 11.0, 12.0, 13.0, 14.0]  # u[3:6], then g[0:5]
    assert p.shape == (0, 1)


@pytest.fixture(scope=shared_scope)
def uce_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("uce")
    cfg = compose_cfg(["model=tiny", "concept=nudity", "method=uce", "trainer.preview_every=0",
                       "+concept.uce.preserve=[a photo of a cat, a dog]"])
    train(cfg, run)
    return run


def test_trainer_writes_the_closed_form_as_the_delta(uce_run):
    tensors, meta = read_delta(uce_run)
    assert meta["method"] == "uce" and meta["params"] == "xattn_kv" and meta["iterations"] == "1"
    _, base = load_run(uce_run, "cpu", base=True)
    kv = {n: p.detach() for n, p in base.unet.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n}
    assert set(tensors) == set(kv) and all(n.endswith(".weight") for n in tensors)  # attn2 to_k/to_v, nothing else
    erase = subject_embeddings(base, ["nudity"]).double()
    guide = subject_embeddings(base, [""]).double()
    preserve = subject_embeddings(base, ["a photo of a cat", "a dog"]).double()
    for name, w_old in kv.items():
        expected = lstsq_edit(w_old.double(), erase, guide, preserve, 0.5, 1.0, 1.0)
        torch.testing.assert_close(tensors[name].double(), expected, rtol=1e-4, atol=1e-5)
        # what the edit is for: the target's output moves to the guide's, the preserved outputs stay
        w_new = tensors[name].double()
        v_star, v_old = w_old.double() @ guide[0], w_old.double() @ erase[0]
        assert (w_new @ erase[0] - v_star).norm() < 0.05 * (v_old - v_star).norm(), name
        for p in preserve:
            assert (w_new @ p - w_old.double() @ p).norm() < 0.05 * (w_old.double() @ p).norm(), name
    _, erased = load_run(uce_run, "cpu")  # erasure.generate's loader: the delta goes into the fingerprinted base
    named = dict(erased.unet.named_parameters())
    assert all(torch.equal(named[n].detach(), t) for n, t in tensors.items())


def test_one_step_in_metrics_and_summary(uce_run):
    rows = [json.loads(line) for line in (uce_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 1 and rows[0]["relative_change"] > 0 and "lr" not in rows[0]
    summary = json.loads((uce_run / "summary.json").read_text())
    assert summary["iterations"] == 1 and summary["train_time_s"] >= 0
    assert summary["final"] == {"relative_change": rows[0]["relative_change"]}


@pytest.mark.parametrize("overrides,match", [
    (["method.lamb=0"], "method.lamb must be > 0"),
    (["method.preserve_scale=-1"], "method.preserve_scale must be >= 0"),
    (["method.erase_scale=0"], "method.erase_scale must be > 0"),
    (["method.iterations=5"], "closed-form edit .one step.: method.iterations must be 1"),
    (["trainer.iterations=5"], "closed-form edit .one step.: trainer.iterations must be 1"),
    (["concept.targets=[nudity,nsfw,gore]", "+concept.uce.guides=[a,b]"], "concept.uce.guides has 2 prompts for 3 targets"),
    (["+concept.uce.preserve=[nudity]"], "concept.uce.preserve lists the target 'nudity'"),
    (["+concept.uce.guide=[x]"], "invalid concept.uce config"),
    (["method.tokens=all"], "method.tokens must be last or trailing"),
])
def test_bad_config_is_refused_in_one_sentence(overrides, match):
    assert_refused_in_one_sentence(["model=tiny", "concept=nudity", "method=uce", *overrides], match)


def test_range_edges_that_are_allowed():
    """preserve_scale = 0 (no preservation term) is a valid edit; only erase_scale and lamb must be positive."""
    from erasure.config import validate

    validate(compose_cfg(["model=tiny", "concept=nudity", "method=uce", "method.preserve_scale=0"]))


def test_a_subset_beyond_attn2_kv_is_refused(tmp_path):
    cfg = compose_cfg(["model=tiny", "concept=nudity", "method=uce", "params=xattn", "trainer.preview_every=0"])
    with pytest.raises(UserError, match=r"UCE edits only .*params=xattn also selects .*use params=xattn_kv"):
        train(cfg, tmp_path)


def test_multi_target_edit_has_one_guide_per_target(tiny_models):
    """Several targets (concept.targets), one guide each: every target's output goes to its own guide's."""
    texts = ["nudity", "gore", "a cat", "a dog"]
    keys = subject_embeddings(tiny_models, texts).double()
    w_old = dict(tiny_models.unet.named_parameters())["mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight"]
    w_old = w_old.detach().double()
    w_new = uce_weight(w_old, keys[:2], keys[2:], keys[:0], 0.5, 1.0, 1.0)
    for target, guide in ((0, 2), (1, 3)):
        err = (w_new @ keys[target] - w_old @ keys[guide]).norm()
        assert err < 0.1 * (w_old @ keys[target] - w_old @ keys[guide]).norm()
    assert UCE.shape == "closed_form"


@pytest.mark.parametrize("targets,guides,want", [
    (["nudity", "nsfw", "gore"], ["a photo"], ["a photo"] * 3),  # one guide serves every target (sd_erase.py l.142-145)
    (["nudity", "gore"], ["a man", "a cat"], ["a man", "a cat"]),  # one per target, in order
    (["nudity"], ["a photo"], ["a photo"]),
])
def test_concept_prompts_give_one_guide_per_target(targets, guides, want):
    from omegaconf import OmegaConf

    concept = OmegaConf.create({"targets": targets, "uce": {"guides": guides, "preserve": ["a dog"]}})
    assert concept_prompts(concept) == (targets, want, ["a dog"])


def test_erasure_curve_of_a_closed_form_edit_is_over_its_strength(tmp_path):
    """On the toy world, trainer.probe_points=2 gives UCE's curve over its erase scale: the base (iteration 0), then
    the edit at half and at full strength (iteration 1). The full-strength point is the final probe's number (a second
    route: the trained delta, measured by FinalProbe); the half-strength point is a model between the two."""
    cfg = compose_cfg(["model=toyworld", "concept=circle", "method=uce", "trainer.preview_every=0",
                       "trainer.probe_points=2", "trainer.probe_seeds=1", "concept.probe.seeds=1",
                       "model.sample_steps=8"])  # fewer sampling steps than the model's 35: the routes agree at any
    train(cfg, tmp_path)
    points = [json.loads(line) for line in (tmp_path / "probe.jsonl").read_text().splitlines()]
    assert [(p["step"], p.get("edit_strength")) for p in points] == [(0, None), (1, 0.5), (1, 1.0)]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert points[0]["concept_rate"] == summary["concept_rate_before"]
    assert points[0]["ssim_preserved"] == pytest.approx(1.0)
    assert points[2]["concept_rate"] == summary["concept_rate_after"]
    assert points[2]["ssim_preserved"] == pytest.approx(summary["ssim_preserved"], abs=1e-6)
    assert 1.0 > points[1]["ssim_preserved"] and points[1]["ssim_preserved"] != points[2]["ssim_preserved"]
