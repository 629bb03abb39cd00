"""SSIM between image pairs (scikit-image's ``structural_similarity``), with the paper's 25x25 window scaled to
the image side. Pure: arrays in, numbers out (used by eval's ``ssim`` metric and the toy world's probe)."""
from __future__ import annotations

import math

import numpy as np

from ..errors import UserError


def ssim_window(side: int, win_size: int = 25, reference_side: int | None = 512) -> int:
    """The SSIM window for images of ``side`` pixels.

    The paper uses 25×25 at SD's 512². With ``reference_side`` set, the window is scaled to keep the same
    fraction of the image side (25/512 ≈ 4.9%), rounded up to an odd size, at least 3 and at most ``side``:
    512² -> 25, 256² -> 13, 64² -> 5, 32² (toy world) -> 3. ``reference_side=None`` uses ``win_size`` as is.
    """
    if reference_side:
        w = win_size * side / reference_side
        win = max(3, int(math.ceil((w - 1) / 2)) * 2 + 1)
    else:
        win = int(win_size)
    if win % 2 == 0 or win > side:
        raise UserError(f"SSIM window {win} must be odd and at most the image side {side}")
    return win


def ssim_pairs(a: np.ndarray, b: np.ndarray, win_size: int) -> np.ndarray:
    """SSIM of each image pair (uint8 N×H×W×3): mean over the colour channels, data range 255."""
    from skimage.metrics import structural_similarity

    if a.shape != b.shape:
        raise UserError(f"SSIM compares images of the same size, got {a.shape} and {b.shape}")
    return np.array([structural_similarity(x, y, win_size=win_size, channel_axis=-1, data_range=255)
                     for x, y in zip(a, b)])


