"""The toy world's detector (the analogue of NudeNet): a small CNN that names the shape and colour.

Two heads on one convolutional trunk: ``shape`` (the world's shapes plus ``none``, an empty
background, which is what an erased prompt often yields) and ``color``. Trained on renders with a
little blur and noise, so that it judges generated images (slightly soft) fairly. Weights ship as
``erasure/toyworld/detector.safetensors``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserError
from . import world

log = logging.getLogger(__name__)

SHAPE_CLASSES = (*world.SHAPES, "none")
COLOR_CLASSES = world.COLORS
WEIGHTS = Path(__file__).with_name("detector.safetensors")


class DetectorNet(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.trunk = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width))  # 32 -> 4
        self.shape_head = nn.Linear(4 * width * 16, len(SHAPE_CLASSES))
        self.color_head = nn.Linear(4 * width * 16, len(COLOR_CLASSES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: float N x 3 x 32 x 32 in [0, 1]. Returns (shape logits, colour logits)."""
        h = self.trunk(x).flatten(1)
        return self.shape_head(h), self.color_head(h)


def as_uint8_tensor(images) -> torch.Tensor:
    """A list of PIL images, or a uint8 N x 3 x H x W tensor/array (or N x H x W x 3 array), as a uint8 N x 3 x 32 x 32 tensor."""
    if isinstance(images, (list, tuple)):
        if not images:
            return torch.zeros(0, 3, world.SIZE, world.SIZE, dtype=torch.uint8)
        if isinstance(images[0], Image.Image):
            images = [im.convert("RGB").resize((world.SIZE, world.SIZE), Image.Resampling.BOX)
                      if im.size != (world.SIZE, world.SIZE) else im.convert("RGB") for im in images]
            return torch.from_numpy(world.to_uint8(images))
        images = torch.stack([torch.as_tensor(im) for im in images])
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[-1] == 3:
        images = images.transpose(0, 3, 1, 2)  # N x H x W x 3 (erasure.generation.generate) -> N x 3 x H x W
    x = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
        raise UserError(f"the detector takes PIL images or a uint8 N x 3 x H x W tensor, got {x.dtype} {tuple(x.shape)}")
    if x.shape[-2:] != (world.SIZE, world.SIZE):
        x = F.interpolate(x.float(), size=(world.SIZE, world.SIZE), mode="area").round().clamp(0, 255).to(torch.uint8)
    return x


class Detector:
    """``predict(images) -> {"shape": [...], "color": [...], "shape_prob": N x S, "color_prob": N x C}``."""

    shape_classes = SHAPE_CLASSES
    color_classes = COLOR_CLASSES

    def __init__(self, net: DetectorNet):
        self.net = net.eval()

    @torch.no_grad()
    def predict(self, images, batch_size: int = 512) -> dict:
        x = as_uint8_tensor(images)
        probs_s, probs_c = [], []
        for chunk in x.split(batch_size):
            ls, lc = self.net(chunk.float() / 255)
            probs_s.append(ls.softmax(-1))
            probs_c.append(lc.softmax(-1))
        ps = torch.cat(probs_s) if probs_s else torch.zeros(0, len(SHAPE_CLASSES))
        pc = torch.cat(probs_c) if probs_c else torch.zeros(0, len(COLOR_CLASSES))
        return {"shape": [SHAPE_CLASSES[i] for i in ps.argmax(-1).tolist()],
                "color": [COLOR_CLASSES[i] for i in pc.argmax(-1).tolist()],
                "shape_prob": ps, "color_prob": pc}


def load_detector(path: str | Path = WEIGHTS) -> Detector:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"the toy-world detector weights are missing ({path}): rebuild with `make toyworld`")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    net = DetectorNet(width=int(meta.get("width", 32)))
    net.load_state_dict(load_file(str(path)))
    return Detector(net)


# ---------------------------------------------------------------------------------------- training
def _batch(rng: np.random.Generator, n: int, p_empty: float = 0.08) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Renders (and some empty backgrounds) with blur/noise augmentation; colour label -100 for empty."""
    images, shapes, colors = [], [], []
    for _ in range(n):
        if rng.random() < p_empty:
            bg = world.BACKGROUNDS[rng.integers(len(world.BACKGROUNDS))]
            base = np.array(world.RGB[bg]) + rng.integers(-20, 21, size=3)
            images.append(np.broadcast_to(np.clip(base, 0, 255)[:, None, None], (3, world.SIZE, world.SIZE)).astype(np.uint8))
            shapes.append(len(SHAPE_CLASSES) - 1)
            colors.append(-100)
            continue
        scene = world.sample_scene(rng)
        images.append(world.to_uint8([world.render(scene)])[0])
        shapes.append(SHAPE_CLASSES.index(scene.shape))
        colors.append(COLOR_CLASSES.index(scene.color))
    x = torch.from_numpy(np.stack(images)).float() / 255
    return x, torch.tensor(shapes), torch.tensor(colors)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random blur (mix with a 3x3 box blur), brightness shift and Gaussian noise."""
    n = x.shape[0]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    blur2 = F.avg_pool2d(F.pad(blur, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    a, b = torch.rand(2, n, 1, 1, 1, generator=gen)
    x = a * (b * blur2 + (1 - b) * blur) + (1 - a) * x  # up to two passes of a 3x3 box blur (soft generations)
    x = x + 0.06 * (torch.rand(n, 3, 1, 1, generator=gen) - 0.5)
    x = x + 0.04 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


def accuracy_on_renders(det: Detector, n: int, seed: int) -> dict:
    scenes, images, _ = world.sample(n, seed, with_captions=False)
    pred = det.predict(images)
    return {"shape": float(np.mean([p == s.shape for p, s in zip(pred["shape"], scenes)])),
            "color": float(np.mean([p == s.color for p, s in zip(pred["color"], scenes)]))}


def train_detector(out: str | Path = WEIGHTS, steps: int = 1500, batch: int = 128, seed: int = 0, width: int = 32,
                   lr: float = 2e-3) -> dict:
    """Train on fresh renders each step (seeded); returns held-out accuracy on renders."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    net = DetectorNet(width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    net.train()
    for step in tqdm(range(steps), desc="detector", dynamic_ncols=True, disable=None):
        x, ys, yc = _batch(rng, batch)
        ls, lc = net(augment(x, gen))
        loss = F.cross_entropy(ls, ys) + F.cross_entropy(lc, yc, ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0:
            log.info("detector step %d loss %.4f", step, loss.item())
    net.eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out),
              metadata={"width": str(width), "shape_classes": json.dumps(SHAPE_CLASSES),
                        "color_classes": json.dumps(COLOR_CLASSES)})
    acc = accuracy_on_renders(load_detector(out), 2000, seed=10_000 + seed)
    log.info("detector held-out accuracy on 2000 fresh renders: shape %.4f, colour %.4f", acc["shape"], acc["color"])
    return acc
