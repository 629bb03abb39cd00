"""MACE (baselines/mace.py): the closed-form refinement and the LoRA fusion against independent least-squares solves
and by hand, the attention-map loss by hand, the token alignment of the refinement by hand, the toy world's exact
masks, and the trainer's path on the tiny model (delta = fused attn2.to_k/to_v, one LoRA per concept, round robin)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from baselines.mace import (MACE, aligned_positions, attention_map_loss, fuse_weight, gram, importance_weights,
                            refine_weight)
from erasure.config import validate
from erasure.delta import load_run, read_delta
from erasure.errors import UserError
from erasure.models import load_models
from erasure.trainer import train
from tests.conftest import ROOT, assert_refused_in_one_sentence, build_session, compose_cfg, shared_scope

F64 = dict(dtype=torch.float64)


def lstsq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """W minimising ‖X Wᵀ − Y‖² (rows of X: inputs, rows of Y: wanted outputs), by torch.linalg.lstsq."""
    return torch.linalg.lstsq(x, y).solution.T


# ------------------------------------------------------------------------------------------ closed forms


@pytest.mark.parametrize("lamb,s", [(1e3, 0.0), (0.5, 2.0), (0.0, 0.3)])
def test_refinement_is_the_least_squares_minimiser(lamb, s):
    """λ‖W − W₀‖² + Σ_i ‖W e_i − W₀ g_i‖² + s Σ_j ‖W p_j − W₀ p_j‖² as one stacked least-squares problem."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, 6, generator=g, **F64)
    e, gd = torch.randn(9, 6, generator=g, **F64), torch.randn(9, 6, generator=g, **F64)
    p = torch.randn(3, 6, generator=g, **F64)
    got = refine_weight(w0, gram(e), gd.T @ e, gram(p), lamb, s)
    x = torch.cat([lamb ** 0.5 * torch.eye(6, **F64), e, s ** 0.5 * p])
    y = torch.cat([lamb ** 0.5 * w0.T, gd @ w0.T, s ** 0.5 * p @ w0.T])
    torch.testing.assert_close(got, lstsq(x, y), rtol=1e-9, atol=1e-9)


def test_refinement_by_hand():
    """d = 2, one row e = (1, 0) mapped to g = (0, 1), λ = 1: B = diag(2, 1), A = W₀ + W₀ g eᵀ, so the first column
    becomes the mean of W₀'s two columns and the second stays: W e = (W₀ e + W₀ g) / 2, W g = W₀ g."""
    w0 = torch.tensor([[1.0, 3.0], [-2.0, 4.0]], **F64)
    e, g = torch.tensor([[1.0, 0.0]], **F64), torch.tensor([[0.0, 1.0]], **F64)
    w = refine_weight(w0, gram(e), g.T @ e, torch.zeros(2, 2, **F64), 1.0, 0.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 3.0], [1.0, 4.0]], **F64))


@pytest.mark.parametrize("lamb,s", [(1e3, 0.0), (0.5, 1.5), (0.0, 0.0)])
def test_fusion_is_the_least_squares_minimiser(lamb, s):
    """λ‖W − W_cfr‖² + Σ_k Σ_c ‖W c − (W_cfr + ΔW_k) c‖² + s Σ_j ‖W p_j − W₀ p_j‖², two rank-1 LoRAs."""
    g = torch.Generator().manual_seed(1)
    w0, w_cfr = torch.randn(4, 6, generator=g, **F64), torch.randn(4, 6, generator=g, **F64)
    deltas = [torch.randn(4, 1, generator=g, **F64) @ torch.randn(1, 6, generator=g, **F64) for _ in range(2)]
    rows = [torch.randn(7, 6, generator=g, **F64), torch.randn(5, 6, generator=g, **F64)]
    p = torch.randn(2, 6, generator=g, **F64)
    got = fuse_weight(w_cfr, w0, deltas, [gram(r) for r in rows], gram(p), lamb, s)
    x = torch.cat([lamb ** 0.5 * torch.eye(6, **F64), *rows, s ** 0.5 * p])
    y = torch.cat([lamb ** 0.5 * w_cfr.T, *[r @ (w_cfr + d).T for r, d in zip(rows, deltas)], s ** 0.5 * p @ w0.T])
    torch.testing.assert_close(got, lstsq(x, y), rtol=1e-8, atol=1e-9)


def test_fusion_by_hand():
    """Concept 1 on e1, concept 2 on e2, λ = 1, d = 3: B = diag(2, 2, 1), so W* e1 = W e1 + ΔW_1 e1 / 2, likewise e2,
    and e3 (no concept's prompt) keeps W e3. One concept whose rows span the space with λ = 0: W* = W + ΔW exactly."""
    w = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0]], **F64)
    d1 = torch.tensor([[4.0, 0.0, 2.0], [2.0, 0.0, 0.0]], **F64)
    d2 = torch.tensor([[0.0, 6.0, 0.0], [0.0, -2.0, 8.0]], **F64)
    e = torch.eye(3, **F64)
    got = fuse_weight(w, w, [d1, d2], [gram(e[:1]), gram(e[1:2])], torch.zeros(3, 3, **F64), 1.0, 0.0)
    torch.testing.assert_close(got @ e[0], torch.tensor([3.0, 1.0], **F64))  # [1, 0] + [4, 2] / 2
    torch.testing.assert_close(got @ e[1], torch.tensor([5.0, -2.0], **F64))  # [2, -1] + [6, -2] / 2
    torch.testing.assert_close(got @ e[2], torch.tensor([3.0, 1.0], **F64))
    full = torch.randn(10, 3, generator=torch.Generator().manual_seed(2), **F64)
    torch.testing.assert_close(fuse_weight(w, w, [d1], [gram(full)], torch.zeros(3, 3, **F64), 0.0, 0.0), w + d1)
    with pytest.raises(ValueError):  # one Gram per LoRA: a missing one is an error, not a concept left out
        fuse_weight(w, w, [d1, d2], [gram(e[:1])], torch.zeros(3, 3, **F64), 1.0, 0.0)


def test_a_singular_system_is_refused_in_one_sentence():
    with pytest.raises(UserError, match="closed form is singular.*method.lamb > 0"):
        refine_weight(torch.ones(2, 3), torch.zeros(3, 3), torch.zeros(3, 3), torch.zeros(3, 3), 0.0, 0.0)


def test_aligned_positions_by_hand():
    """The shared words keep their positions and the differing ones are left out (cfr_utils.py l.10-30); the padding
    after each prompt's last kept token is paired from the end (l.107-112)."""
    sot, eot = 49406, 49407
    # "a circle" vs "a big shape": prefix [sot, a], suffix [eot]; old 3 is eot, new 4 is eot
    old, new = aligned_positions([sot, 320, 7117, eot], [sot, 320, 1, 2, eot], 8)
    assert old == [0, 1, 3, 4, 5, 6] and new == [0, 1, 4, 5, 6, 7]
    # the concept first ("circle in a photo" vs "ground in a photo"): only its own token drops out
    old, new = aligned_positions([sot, 7117, 530, 320, 1125, eot], [sot, 3, 530, 320, 1125, eot], 8)
    assert old == new == [0, 2, 3, 4, 5, 6, 7]
    # the mapping longer than the concept at the end of the prompt: the old side is cut so the lists pair up
    old, new = aligned_positions([sot, 320, 7117, eot], [sot, 320, 1, 2, 3, eot], 7)
    assert old == [0, 1, 3, 4] and new == [0, 1, 5, 6]  # new's eot at 5; old pads 4 only (7 - 2)


# ---------------------------------------------------------------------------------------- attention loss


def test_attention_map_loss_by_hand():
    """Two layers (2×2 and 4×4 image positions), 2 heads, 3 keys; concept keys 1 and 2; mask = the top-left 2×2 of a
    4×4 image. Nearest resizing keeps image position 0 of the 2×2 layer (pixel (0, 0)) and positions 0, 1, 4, 5 of the
    4×4 one. The loss is Σ_layers sqrt(Σ selected²)."""
    a = torch.arange(2 * 4 * 3, **F64).reshape(2, 4, 3) / 24
    b = torch.arange(2 * 16 * 3, **F64).reshape(2, 16, 3) / 96
    positions = torch.tensor([[False, True, True]])
    mask = torch.zeros(1, 4, 4, **F64)
    mask[0, :2, :2] = 1.0
    sel_a = [a[h, q, k] for h in range(2) for q in (0,) for k in (1, 2)]
    sel_b = [b[h, q, k] for h in range(2) for q in (0, 1, 4, 5) for k in (1, 2)]
    expected = math.sqrt(sum(v.item() ** 2 for v in sel_a)) + math.sqrt(sum(v.item() ** 2 for v in sel_b))
    assert attention_map_loss([a, b], positions, mask).item() == pytest.approx(expected, rel=1e-12)
    squared = sum(v.item() ** 2 for v in sel_a + sel_b)
    assert attention_map_loss([a, b], positions, mask, "squared").item() == pytest.approx(squared, rel=1e-12)
    # no mask (use_mask=false): every image position
    whole = math.sqrt((a[:, :, 1:] ** 2).sum().item()) + math.sqrt((b[:, :, 1:] ** 2).sum().item())
    assert attention_map_loss([a, b], positions, None).item() == pytest.approx(whole, rel=1e-12)
    # a batch of two, batch-major heads: the second image's mask and positions apply to rows 2-3
    a2 = torch.cat([a, 2 * a])
    pos2 = torch.tensor([[False, True, True], [True, False, False]])
    mask2 = torch.stack([mask[0], torch.ones(4, 4, **F64)])
    expected2 = math.sqrt(sum(v.item() ** 2 for v in sel_a) + ((2 * a)[:, :, 0] ** 2).sum().item())
    assert attention_map_loss([a2], pos2, mask2).item() == pytest.approx(expected2, rel=1e-12)


def test_importance_sampling_puts_the_mass_between_200_and_400():
    p = importance_weights(1000)
    assert p.sum().item() == pytest.approx(1.0) and 200 <= int(p.argmax()) <= 400
    assert p[200:401].sum() > 0.85 and p[150:451].sum() > 0.98 and p[0] < 1e-3 * p.max() and p[999] < 1e-3 * p.max()
    f = lambda t: 1 / (1 + math.exp(-0.05 * (t - 200))) - 1 / (1 + math.exp(-0.05 * (t - 400)))  # noqa: E731
    assert (p[300] / p[100]).item() == pytest.approx(f(300) / f(100), rel=1e-9)


# ------------------------------------------------------------------------------------------------ toy data


def test_toy_masks_are_exact_and_the_shipped_folder_is_reproduced(tmp_path):
    from erasure.toyworld import world
    from erasure.toyworld.mace_data import write_concept_data

    scenes, images, _ = world.sample(4, 3, with_captions=False, shape="circle")
    for scene, image in zip(scenes, images):
        m = np.asarray(world.mask(scene)) > 0
        px = np.asarray(image).astype(int)
        obj = np.clip(np.array(world.RGB[scene.color]) + np.array(scene.jitter), 0, 255)
        bg = np.array(world.RGB[scene.background])
        # inside: nearer the object's colour than the background's; outside: the other way round
        # (up to the rounding of pixels about half covered)
        assert (np.abs(px[m] - obj).sum(1) <= np.abs(px[m] - bg).sum(1) + 6).all()
        assert (np.abs(px[~m] - bg).sum(1) <= np.abs(px[~m] - obj).sum(1) + 6).all()
        assert abs(m.sum() - math.pi * (scene.extent * world.SIZE / 2) ** 2) < 0.08 * m.sum()
    write_concept_data(tmp_path, "circle", 8, 0)
    shipped = ROOT / "data" / "mace" / "toyworld"
    for sub in ("circle", "circle mask"):
        names = sorted(p.name for p in (shipped / sub).iterdir())
        assert names == sorted(p.name for p in (tmp_path / sub).iterdir()) and len(names) == 8
        for name in names:
            assert np.array_equal(np.asarray(Image.open(shipped / sub / name)), np.asarray(Image.open(tmp_path / sub / name)))


# ------------------------------------------------------------------------------------------- the trainer


def write_folder(root, concepts, n=3, side=32):
    """Random images and half-image masks in the official layout."""
    rng = np.random.default_rng(0)
    for c in concepts:
        (root / c).mkdir(parents=True)
        (root / f"{c} mask").mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
            m = np.zeros((side, side), np.uint8)
            m[:, : side // 2] = 255
            Image.fromarray(m).save(root / f"{c} mask" / f"{i}_mask.png")


TWO = ["model=tiny", "concept=nudity", "method=mace", "trainer.preview_every=0", "concept.mace.concepts=[nudity,naked]",
       "trainer.iterations=4"]


@pytest.fixture(scope=shared_scope)
def mace_run(tmp_path_factory):
    data = tmp_path_factory.mktemp("mace_data")
    write_folder(data, ["nudity", "naked"])
    run = tmp_path_factory.mktemp("mace")
    cfg = compose_cfg([*TWO, f"method.data_dir={data}", "method.lr=1e-2", "trainer.checkpoint_every=2"])
    train(cfg, run)
    return run, data


def test_trainer_writes_the_fused_weights_as_the_delta(mace_run):
    run, _ = mace_run
    tensors, meta = read_delta(run)
    assert meta["method"] == "mace" and meta["params"] == "xattn_kv" and meta["iterations"] == "4"
    assert meta["format"] == "erasure-delta/1" and "adapters" not in meta  # fused tensors, no adapter
    _, base = load_run(run, "cpu", base=True)
    kv = {n: p.detach() for n, p in base.unet.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n}
    assert set(tensors) == set(kv) and all(n.endswith(".weight") for n in tensors)
    assert all(not torch.equal(tensors[n], kv[n]) for n in kv)  # every projection edited
    _, erased = load_run(run, "cpu")  # erasure.generate's loader: the delta in the fingerprinted base
    named = dict(erased.unet.named_parameters())
    assert all(torch.equal(named[n].detach(), t) for n, t in tensors.items())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] > 0 and math.isfinite(r["loss"]) for r in rows)


def test_one_lora_per_concept_round_robin_and_the_delta_is_their_fusion(mace_run):
    """Rebuilt on the base model, the method's fusion of zero LoRAs is the refined weights. Restored from the step-2
    checkpoint (steps 1, 3 train concept 0's LoRA; 2, 4 concept 1's) and stepped twice, it ends with the run's delta,
    and that delta is fuse_weight of the refined weights and the two LoRAs."""
    from erasure.checkpoint import list_checkpoints, load_checkpoint

    run, data = mace_run
    session, _, _ = build_session([*TWO, f"method.data_dir={data}", "method.lr=1e-2"])
    m = session.method
    before = m.export_params()  # LoRAs still zero: the fusion returns the refined weights
    for name in m.base:
        torch.testing.assert_close(before[name], m.refined[name], rtol=1e-5, atol=1e-6)
    done, state = load_checkpoint(list_checkpoints(run)[-1])
    assert done == 2
    keys = [n[: -len(".weight")] for n in m.base if ".to_k." in n]  # (the last attn2's to_v reaches no attention map)
    for k in range(2):  # both LoRAs had one step: their key up factors left zero
        assert all(state["params"][f"{n}.erasure_adapters.mace_{k}.up.weight"].abs().sum() > 0 for n in keys)
    session.restore(state)
    # step 3 trains concept 0's LoRA only: its up factors get a gradient, concept 1's none; to_k/to_v none either
    session.optimizer.zero_grad(set_to_none=True)
    m.training_step(3)["loss"].backward()
    assert all(m.sets[0].modules[n].up.weight.grad.abs().sum() > 0 for n in keys)
    assert all(p.grad is None for p in m.sets[1].named_parameters().values())
    assert all(session.trainable[n].grad is None for n in m.base)
    assert all(s.multiplier == 0.0 for s in m.sets)  # off outside a training step
    session.restore(state)
    for step in (3, 4):
        session.step(step)
    fused, (tensors, _) = m.export_params(), read_delta(run)
    for name, t in tensors.items():
        torch.testing.assert_close(fused[name], t, rtol=1e-5, atol=1e-6)
        deltas = [m.sets[k].modules[name[: -len(".weight")]].delta_weight().detach() for k in range(2)]
        expected = fuse_weight(m.refined[name], m.base[name], deltas, m.fusion_grams, m.preserve_gram, 1e3, 0.0)
        torch.testing.assert_close(t, expected.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides,match", [
    (["method.data=generate"], "data=generate makes images without masks"),
    (["concept.mace.mappings=[a,b]"], "concept.mace.mappings has 2 entries for 4 concepts"),
    (["+concept.mace.templates=[a photo]"], "must hold '\\{\\}'"),
    (["+concept.mace.preserve=[naked]"], "concept.mace.preserve lists the concept 'naked'"),
    (["method.rank=0"], "method.rank must be at least 1"),
    (["method.loss_norm=l1"], "method.loss_norm must be frobenius or squared"),
    (["+concept.mace.mapping=[x]"], "invalid concept.mace config"),
])
def test_bad_config_is_refused_in_one_sentence(overrides, match):
    assert_refused_in_one_sentence(["model=tiny", "concept=nudity", "method=mace", *overrides], match)


@pytest.mark.parametrize("overrides,match", [
    (["params=xattn"], r"MACE edits exactly .*params=xattn selects .*use params=xattn_kv"),
    (["params=none"], r"MACE edits exactly .*params=none selects 'nothing of attn2.to_k/to_v': use params=xattn_kv"),
    (["trainer.iterations=3"], "trainer.iterations=3 is fewer than the 4 concepts"),
    ([], "MACE needs images of each concept"),
    (["method.data_dir=/nonexistent"], "no folder '/nonexistent/nudity'"),
])
def test_refused_when_the_run_starts(tmp_path, overrides, match):
    cfg = compose_cfg(["model=tiny", "concept=nudity", "method=mace", "trainer.preview_every=0", *overrides])
    with pytest.raises(UserError, match=match):
        train(cfg, tmp_path)
    assert MACE.shape == "adapter"


# ------------------------------------------------------------------------------------------ the training step

@pytest.mark.parametrize("importance, norm", [(True, "frobenius"), (False, "squared")])
def test_training_step_against_a_second_route(tmp_path, importance, norm):
    """One LoRA step (cfr_lora_training.py l.480-540) recomputed: concept k = (step - 1) mod 3 (round robin over three
    concepts), its next image from a permutation of its 3, x0 = mean + std * n (latent_dist.sample()), noise, t from
    the importance weights or uniform on 0..999, a random one of its prompts -- every draw replayed from a copy of the
    generator; z_t with SD's noise schedule written out; the attention probabilities of every attn2 layer computed
    from each layer's inputs (tests/test_method_steps.attention_by_hand) with concept k's LoRA, and only it, at
    multiplier 1; the loss: attention_map_loss (its own hand tests above) on that prompt's concept positions inside
    the image's mask. The LoRAs are moved off zero first, so that a step with the wrong LoRA, multiplier or mask goes
    red."""
    from tests.test_method_steps import attention_by_hand, generator_copy, noised, randint

    concepts = ["nudity", "naked", "nude"]
    write_folder(tmp_path, concepts)
    sess, _, cfg = build_session(["model=tiny", "concept=nudity", "method=mace",
                                  f"concept.mace.concepts=[{','.join(concepts)}]", "trainer.iterations=3",
                                  f"method.data_dir={tmp_path}", f"method.importance_sampling={str(importance).lower()}",
                                  f"method.loss_norm={norm}"])
    m = sess.method
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sess.trainable.items():
            if name.endswith("up.weight"):
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    assert all(s.multiplier == 0.0 for s in m.sets)  # outside a step every LoRA is off

    for step in (1, 2):
        k = step - 1
        r = generator_copy(m.ctx)
        i = torch.randperm(3, generator=r).tolist().pop()
        mean, std = m.latent_mean[k][i][None], m.latent_std[k][i][None]
        assert std.abs().sum() > 0  # encoded images: a distribution, not a point
        x0 = mean + std * torch.randn(mean.shape, generator=r)
        noise = torch.randn(x0.shape, generator=r)
        t = torch.multinomial(importance_weights(1000), 1, generator=r) if importance else \
            torch.randint(0, 1000, (1,), generator=r)
        j = randint(r, 0, len(m.templates[k]))
        with m.sets[k].multiplied(1.0):
            probs = [p.flatten(0, 1) for p in attention_by_hand(m.ctx.unet, noised(x0, noise, t), t,
                                                                m.prompt_emb[k][j][None])]
        positions, mask = m.positions[k][j][None], m.masks[k][i][None]
        expected = attention_map_loss(probs, positions, mask, norm)

        loss = m.training_step(step)["loss"]
        assert m.ctx.generator.get_state().equal(r.get_state())
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert abs(attention_map_loss(probs, positions, None, norm).item() - expected.item()) > 1e-3 * expected.item()
        with torch.no_grad():  # the base of the step (every LoRA off) gives another loss
            plain = [p.flatten(0, 1) for p in attention_by_hand(m.ctx.unet, noised(x0, noise, t), t,
                                                                m.prompt_emb[k][j][None])]
        assert abs(attention_map_loss(plain, positions, mask, norm).item() - expected.item()) > 1e-3 * expected.item()


# ------------------------------------------------------------------------------------------- the image folder
def test_the_image_folder_is_read_in_sorted_pairs_in_zero_one_with_channels_first(tmp_path):
    """load_concept_folder: images (n, 3, R, R) = pixel / 255 in RGB order, masks (n, R, R) = pixel / 255, paired by
    sorted file name; at the model's resolution nothing is resized. Values written here by hand."""
    from baselines.mace import load_concept_folder

    (tmp_path / "cat").mkdir()
    (tmp_path / "cat mask").mkdir()
    pixels = {"b.png": (10, 200, 51), "a.png": (255, 0, 102)}  # sorted: a then b
    for name, rgb in pixels.items():
        arr = np.zeros((8, 8, 3), np.uint8)
        arr[:] = rgb
        arr[0, 1] = (1, 2, 3)  # one odd pixel: row 0, column 1
        Image.fromarray(arr).save(tmp_path / "cat" / name)
    for name, value in {"a_mask.png": 255, "b_mask.png": 51}.items():
        m = np.zeros((8, 8), np.uint8)
        m[2:, :3] = value
        Image.fromarray(m).save(tmp_path / "cat mask" / name)

    images, masks = load_concept_folder(tmp_path, "cat", True, 8)
    assert images.shape == (2, 3, 8, 8) and masks.shape == (2, 8, 8) and images.dtype == torch.float32
    assert images[0, :, 5, 5].tolist() == pytest.approx([1.0, 0.0, 0.4])
    assert images[1, :, 5, 5].tolist() == pytest.approx([10 / 255, 200 / 255, 0.2])
    assert images[1, :, 0, 1].tolist() == pytest.approx([1 / 255, 2 / 255, 3 / 255])  # (row, column), not swapped
    assert masks[0, 5, 1] == 1.0 and masks[1, 5, 1] == pytest.approx(0.2) and masks[:, 1, 1].eq(0).all()
    assert masks[0, :, 3:].eq(0).all() and masks[0, 2:, :3].eq(1).all()

    only, none = load_concept_folder(tmp_path, "cat", False, 8)  # use_mask=false: the masks are not read
    assert none is None and only.equal(images)


def test_the_image_folder_is_resized_bicubic_and_its_masks_nearest(tmp_path):
    """Off the model's resolution, images are resized with PIL's bicubic filter and masks with nearest, so that a
    mask stays 0 or 1 (the project's choice: the official dataset.py crops 512-pixel images and never resizes)."""
    from baselines.mace import load_concept_folder

    (tmp_path / "cat").mkdir()
    (tmp_path / "cat mask").mkdir()
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "cat" / "0.png")
    m = (np.indices((12, 12)).sum(0) % 2 * 255).astype(np.uint8)  # a checkerboard: any averaging filter shows
    Image.fromarray(m).save(tmp_path / "cat mask" / "0.png")

    images, masks = load_concept_folder(tmp_path, "cat", True, 8)
    want = np.asarray(Image.fromarray(arr).resize((8, 8), Image.Resampling.BICUBIC), np.float32) / 255
    assert images.shape == (1, 3, 8, 8)
    assert torch.allclose(images[0].permute(1, 2, 0), torch.from_numpy(want))
    other = np.asarray(Image.fromarray(arr).resize((8, 8), Image.Resampling.BILINEAR), np.float32) / 255
    assert not np.allclose(want, other)  # the filter is visible at this size
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    want_mask = np.asarray(Image.fromarray(m).resize((8, 8), Image.Resampling.NEAREST), np.float32) / 255
    assert torch.equal(masks[0], torch.from_numpy(want_mask))


def test_the_image_folder_refuses_unpaired_masks_in_one_sentence(tmp_path):
    from baselines.mace import load_concept_folder

    write_folder(tmp_path, ["cat"], n=2, side=8)
    (tmp_path / "cat mask" / "1_mask.png").unlink()
    with pytest.raises(UserError, match="holds 2 images but .* 1 masks: give one mask per image"):
        load_concept_folder(tmp_path, "cat", True, 8)
    assert load_concept_folder(tmp_path, "cat", False, 8)[1] is None  # without masks the count does not matter
    with pytest.raises(UserError, match="no folder .*dog"):
        load_concept_folder(tmp_path, "dog", False, 8)


def test_a_data_folder_is_found_absolute_from_the_working_directory_or_else_in_the_repository(tmp_path, monkeypatch):
    from baselines.mace import resolve_dir

    assert resolve_dir(str(tmp_path)) == tmp_path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    assert resolve_dir("here") == Path("here")  # exists in the working directory: taken as it is
    assert resolve_dir("conf/concept") == ROOT / "conf" / "concept"  # not here: the repository's
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_dir("~/here") == tmp_path / "here"


@pytest.mark.parametrize("square, all_words, mappings", [
    (True, False, ["a person wearing clothes"]), (False, False, ["a person wearing clothes"]),
    (True, True, ["a person wearing clothes"]), (True, False, ["a person wearing clothes", "a clothed statue"])])
def test_the_refinement_is_built_from_the_concept_prompts_by_a_second_route(square, all_words, mappings):
    """Stage 1 on the tiny model against a second route: every prompt encoded alone, E = Σ e eᵀ and H = Σ g eᵀ over the
    words each erase prompt shares with its mapped prompt (cfr_utils.py l.101-145), P over all 77 positions of the
    preserved prompts (cache_coco.py), s_t squared or not (cfr_lora_training.py l.309-322); the fusion Grams over
    every position of the erase prompts; the concept positions: its tokens and, with use_pooler, every
    <|endoftext|> (dataset.py l.220-243)."""
    templates = ["a photo of {}", "{} in a painting"]
    sess, models, cfg = build_session(["model=tiny", "concept=nudity", "method=mace", "trainer.preview_every=0",
                                       "trainer.iterations=2", "concept.mace.concepts=[nudity,naked]",
                                       f"+concept.mace.templates={templates}",
                                       "+concept.mace.preserve=[a dog on a bench,a red tree]", "method.data=generate",
                                       "method.use_mask=false", "method.num_images=1", "method.generate_steps=1",
                                       "method.lamb=2.0", "method.train_preserve_scale=0.5",
                                       f"method.square_train_preserve_scale={square}", f"method.all_words={all_words}",
                                       f"concept.mace.mappings={mappings}"])
    m = sess.method
    tok = models.tokenizer

    def alone(text):
        with torch.no_grad():
            return models.encode_text([text])[0].double()

    d = next(iter(m.base.values())).shape[1]
    erase, cross, fusion = torch.zeros(d, d, **F64), torch.zeros(d, d, **F64), []
    for concept, mapping in zip(["nudity", "naked"], mappings * 2 if len(mappings) == 1 else mappings):
        fuse = torch.zeros(d, d, **F64)
        for t in templates:
            old, new = t.format(concept), t.format(mapping)
            po, pn = (list(range(77)),) * 2 if all_words else \
                aligned_positions(tok(old).input_ids, tok(new).input_ids, 77)  # all_words: every position
            old_emb = alone(old)
            e, g = old_emb[po], alone(new)[pn]
            erase, cross = erase + e.T @ e, cross + g.T @ e
            fuse = fuse + old_emb.T @ old_emb
        fusion.append(fuse)
    preserve = sum(p.T @ p for p in map(alone, ["a dog on a bench", "a red tree"]))
    close = dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m.preserve_gram, preserve, **close)
    for got, want in zip(m.fusion_grams, fusion, strict=True):
        torch.testing.assert_close(got, want, **close)
    s_t = 0.25 if square else 0.5
    for name, w0 in m.base.items():
        torch.testing.assert_close(m.refined[name], refine_weight(w0, erase, cross, preserve, 2.0, s_t), **close)
    assert not torch.allclose(refine_weight(w0, erase, cross, preserve, 2.0, 0.75 - s_t), m.refined[name], **close)
    for k, concept in enumerate(["nudity", "naked"]):
        word = tok(concept, add_special_tokens=False).input_ids
        for j, t in enumerate(templates):
            ids = tok(t.format(concept), padding="max_length", max_length=77).input_ids
            at = next(i for i in range(77) if ids[i:i + len(word)] == word)
            want = [at <= i < at + len(word) or ids[i] == tok.eos_token_id for i in range(77)]
            assert m.positions[k][j].tolist() == want and ids[0] != tok.eos_token_id


@pytest.mark.parametrize("norm", ["imagenet", "symmetric"])
def test_the_folder_images_are_encoded_normalised_and_scaled_by_a_second_route(tmp_path, norm):
    """Stage 2 with a folder: each concept's images normalised with ImageNet's mean and std (dataset.py l.173) or to
    SD's [-1, 1], encoded by the VAE, and the latent distribution's mean and std times the VAE's scaling factor
    (cfr_lora_training.py l.486-487)."""
    from baselines.mace import load_concept_folder

    write_folder(tmp_path, ["nudity", "naked"], n=2)
    sess, models, _ = build_session([*TWO, f"method.data_dir={tmp_path}", f"method.image_normalization={norm}"])
    m = sess.method
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    for k, concept in enumerate(["nudity", "naked"]):
        images, masks = load_concept_folder(tmp_path, concept, True, models.resolution)
        x = (images - mean) / std if norm == "imagenet" else 2 * images - 1
        with torch.no_grad():
            dist = models.vae.encode(x).latent_dist
        s = models.vae.config.scaling_factor
        assert s != 1.0
        torch.testing.assert_close(m.latent_mean[k], dist.mean * s, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.latent_std[k], dist.std * s, rtol=1e-5, atol=1e-6)
        assert torch.equal(m.masks[k], masks)


def test_each_lora_starts_with_down_drawn_from_the_run_generator_over_the_rank():
    """diffusers' LoRALinearLayer as MACE uses it (mace_lora_atten_processor.py l.123-124): down ~ N(0, 1/rank²), drawn
    in order from the run's generator, one set per concept; up = 0."""
    cfg = compose_cfg([*TWO, "method.rank=2"])
    method_cls, method_cfg = validate(cfg)
    models = load_models(cfg.model, "cpu")
    sets = MACE.build_adapters(method_cfg, models, cfg.concept, torch.Generator().manual_seed(5))
    again = torch.Generator().manual_seed(5)
    assert [s.name for s in sets] == ["mace_0", "mace_1"]
    for s in sets:
        for adapter in s.modules.values():
            want = torch.randn(adapter.down.weight.shape, generator=again) / 2
            assert adapter.down.weight.shape[0] == 2 and torch.equal(adapter.down.weight.detach(), want)
            assert not adapter.up.weight.any()


def test_aligned_positions_edges_by_hand():
    """A word inserted in either prompt (the suffix walks back to the first differing token, cfr_utils.py l.10-30),
    the old prompt longer (its padding cut by the shift) and two identical prompts."""
    sot, eot = 49406, 49407
    # new has a word more before the shared suffix [5, eot]
    old, new = aligned_positions([sot, 5, eot], [sot, 7, 5, eot], 6)
    assert old == [0, 1, 2, 3, 4] and new == [0, 2, 3, 4, 5]
    old, new = aligned_positions([sot, 7, 5, eot], [sot, 5, eot], 6)
    assert old == [0, 2, 3, 4, 5] and new == [0, 1, 2, 3, 4]
    # the old side longer where they differ: shift 1, new's padding is cut at length - 1
    old, new = aligned_positions([sot, 5, 6, eot], [sot, 7, eot], 6)
    assert old == [0, 3, 4, 5] and new == [0, 2, 3, 4]
    old, new = aligned_positions([sot, 5, eot], [sot, 5, eot], 5)
    assert old == new == [0, 1, 2, 3, 4]


def test_attention_map_loss_reads_heads_from_the_batch_rows_and_keeps_mask_values_above_one_half():
    """Two images × 3 heads on a 2×2 map (6 rows, 4 image positions: the head count comes from the rows and the
    batch); a mask value of exactly 0.5 is outside (cfr_utils.py l.224-233: > 0.5)."""
    probs = torch.arange(6 * 4 * 2, **F64).reshape(6, 4, 2) / 48
    positions = torch.tensor([[False, True], [True, False]])
    mask = torch.tensor([[[1.0, 0.5], [0.5, 0.5]], [[0.5, 0.5], [0.5, 1.0]]], **F64)
    want = math.sqrt(sum(probs[h, 0, 1].item() ** 2 for h in range(3)) + sum(probs[h, 3, 0].item() ** 2
                                                                               for h in range(3, 6)))
    assert attention_map_loss([probs], positions, mask).item() == pytest.approx(want, rel=1e-12)


def test_generated_images_are_drawn_from_each_concepts_own_prompt(monkeypatch):
    """data=generate (inference.py l.16-38): num_images per concept from the type's prompt with that concept, mask-free."""
    import baselines.mace as mace_module
    from baselines.mace import GENERATION_PROMPTS

    real, asked = mace_module.generate_latents, []

    def spy(ctx, prompts, count, steps, guidance, *args, **kwargs):
        asked.append((list(prompts), count, steps, guidance))
        return real(ctx, prompts, count, steps, guidance, *args, **kwargs)

    monkeypatch.setattr(mace_module, "generate_latents", spy)
    m = build_session([*TWO, "method.data=generate", "method.use_mask=false", "method.num_images=2",
                       "method.generate_steps=1", "method.generate_guidance=3.0"])[0].method
    template = GENERATION_PROMPTS["object"]
    assert asked == [([template.format("nudity")], 2, 1, 3.0), ([template.format("naked")], 2, 1, 3.0)]
    assert [len(x) for x in m.latent_mean] == [2, 2] and m.masks == [None, None]
    assert all(not s.any() for s in m.latent_std)


def test_the_image_folder_reads_rgba_images_and_rgb_masks_as_rgb_and_grey(tmp_path):
    """Masks saved in colour (as segmentation tools often write them) become one grey channel, ITU-R 601 luma as PIL's
    convert("L"); images with an alpha channel drop it."""
    from baselines.mace import load_concept_folder

    (tmp_path / "cat").mkdir()
    (tmp_path / "cat mask").mkdir()
    Image.fromarray(np.full((8, 8, 4), (255, 0, 102, 7), np.uint8), "RGBA").save(tmp_path / "cat" / "a.png")
    Image.fromarray(np.full((8, 8, 3), (255, 255, 255), np.uint8)).save(tmp_path / "cat mask" / "a_mask.png")
    images, masks = load_concept_folder(tmp_path, "cat", True, 8)
    assert images.shape == (1, 3, 8, 8) and masks.shape == (1, 8, 8)
    assert images[0, :, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.4]) and masks.eq(1).all()


def test_without_mace_concepts_the_targets_are_the_concepts():
    """concept_list: ``mace.concepts``, or else the concept's targets (one LoRA each)."""
    from baselines.mace import concept_list

    with_section = compose_cfg(["model=tiny", "concept=nudity", "method=mace"]).concept
    assert concept_list(with_section) == ["nudity", "naked", "erotic", "sexual"]
    targets_only = compose_cfg(["model=tiny", "concept=nudity", "method=mace", "~concept.mace",
                                "concept.targets=[nudity,bare skin]"]).concept
    assert concept_list(targets_only) == ["nudity", "bare skin"]


def test_both_image_normalisations_and_loss_norms_are_accepted_and_others_refused():
    """MACE.validate called on the class (erasure.config.validate memoises whole configs): each documented choice of
    data, image_normalization and loss_norm passes; any other value is named."""
    from baselines.mace import MACEConfig

    for key, allowed in (("data", ("folder",)), ("image_normalization", ("imagenet", "symmetric")),
                         ("loss_norm", ("frobenius", "squared"))):
        for value in allowed:
            MACE.validate(MACEConfig(**{key: value}))
        with pytest.raises(UserError, match=f"method.{key} must be .* got 'other'"):
            MACE.validate(MACEConfig(**{key: "other"}))
    MACE.validate(MACEConfig(data="generate", use_mask=False))


def test_without_preserve_prompts_the_preserve_gram_is_a_float64_zero():
    """The stage-1 Grams accumulate in float64 (the closed form solves in float64); without preserved prompts P is
    the d x d zero of that precision."""
    m = build_session([*TWO, "method.data=generate", "method.use_mask=false", "method.num_images=1",
                       "method.generate_steps=1"])[0].method
    d = next(iter(m.base.values())).shape[1]
    assert m.preserve_gram.dtype == torch.float64 and m.preserve_gram.shape == (d, d)
    assert not m.preserve_gram.any()
