"""The toy world: labelled 32x32 RGB renders of coloured shapes, with plain-English captions.

Everything is a pure function of a seed (numpy ``Generator``), so a dataset, a prompt set or a
held-out test set is reproduced exactly from its seed.

Design (issue 3, "the world"): the object to erase in the default concept is the *circle*. It shares
every colour and background with the shapes that must survive (squares, triangles, ...), and it has a
*nearby* shape, the oval (an axis-aligned ellipse with aspect ratio 2.4), so that drift towards a look-alike
can be seen. Captions use synonyms ("disc", "round shape"), sizes and backgrounds, which give the
paper's instruction concepts an analogue: a related word to steer away from ("round", as the paper
steers away from "sexual") and alternatives to steer towards ("square", "triangle", as the paper's
cover-ups "bikini", "pants").
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import UserError

log = logging.getLogger(__name__)

SIZE = 32  # image side in pixels
_SS = 4  # super-sampling factor of the renderer (anti-aliased edges)

OVAL_ASPECT = 2.4  # long axis / short axis (v2 used 1.9 with tilts; its ovals came out as diamonds)
SHAPES = ("circle", "oval", "square", "triangle", "diamond", "cross")
COLORS = ("red", "green", "blue", "yellow", "purple")
BACKGROUNDS = ("white", "black", "gray")

RGB = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 230), "yellow": (245, 215, 20),
    "purple": (150, 50, 190), "white": (250, 250, 250), "black": (10, 10, 10), "gray": (128, 128, 128),
}
# Words a caption may use for each label (the first one is the canonical prompt word).
SHAPE_NOUNS = {
    "circle": ("circle", "disc"), "oval": ("oval", "ellipse"), "square": ("square", "box"),
    "triangle": ("triangle",), "diamond": ("diamond", "rhombus"), "cross": ("cross", "plus sign"),
}
SHAPE_ADJECTIVES = {
    "circle": "round", "oval": "oval", "square": "square", "triangle": "triangular",
    "diamond": "diamond-shaped", "cross": "cross-shaped",
}
COLOR_WORDS = {"red": ("red", "crimson"), "green": ("green",), "blue": ("blue",), "yellow": ("yellow",),
               "purple": ("purple", "violet")}
BACKGROUND_WORDS = {"white": ("white",), "black": ("black",), "gray": ("gray", "grey")}
SMALL, LARGE = 0.54, 0.66  # object extent (fraction of the side) below/above which a caption may say small/large


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    extent: float  # object size as a fraction of the image side
    cx: float  # centre, in pixels
    cy: float
    angle: float  # rotation in degrees
    jitter: tuple[int, int, int]  # small per-channel offset of the object colour

    @property
    def size_word(self) -> str | None:
        return "small" if self.extent < SMALL else "large" if self.extent > LARGE else None


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def sample_scene(rng: np.random.Generator, shape: str | None = None, color: str | None = None,
                 background: str | None = None) -> Scene:
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    color = color or COLORS[rng.integers(len(COLORS))]
    background = background or BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    extent = float(rng.uniform(0.45, 0.75))
    margin = extent * SIZE / 2 + 1
    cx, cy = (float(rng.uniform(margin, SIZE - margin)) for _ in range(2))
    if shape == "oval":  # horizontal or vertical: tilted ovals were read as diamonds by the v2 model
        angle = float(rng.choice([0.0, 90.0]))
    elif shape == "circle":
        angle = 0.0
    else:  # small tilts only: a square tilted by 45 degrees would be a diamond
        angle = float(rng.uniform(-12, 12))
    jitter = tuple(int(v) for v in rng.integers(-12, 13, size=3))
    return Scene(shape, color, background, extent, cx, cy, angle, jitter)


def _outline(scene: Scene) -> list[tuple[float, float]]:
    """Polygon of the shape in super-sampled pixel coordinates (circles and ovals as 64-gons)."""
    r = scene.extent * SIZE * _SS / 2
    s = scene.shape
    if s in ("circle", "oval"):
        ry = r if s == "circle" else r / OVAL_ASPECT
        pts = [(r * math.cos(a), ry * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 64, endpoint=False)]
    elif s == "square":
        h = r * 0.82
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif s == "diamond":
        pts = [(0, -r), (r * 0.8, 0), (0, r), (-r * 0.8, 0)]
    elif s == "triangle":
        pts = [(0, -r), (r * 0.95, r * 0.72), (-r * 0.95, r * 0.72)]
    elif s == "cross":
        a, b = r, r * 0.33
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
    else:
        raise ValueError(f"unknown shape '{s}': choose one of {', '.join(SHAPES)}")
    t = math.radians(scene.angle)
    c, si = math.cos(t), math.sin(t)
    ox, oy = scene.cx * _SS, scene.cy * _SS
    return [(ox + x * c - y * si, oy + x * si + y * c) for x, y in pts]


def render(scene: Scene) -> Image.Image:
    """The scene as a 32x32 RGB image (drawn at 4x and box-filtered down: anti-aliased edges)."""
    big = Image.new("RGB", (SIZE * _SS, SIZE * _SS), RGB[scene.background])
    fill = tuple(int(np.clip(v + j, 0, 255)) for v, j in zip(RGB[scene.color], scene.jitter))
    ImageDraw.Draw(big).polygon(_outline(scene), fill=fill)
    return big.resize((SIZE, SIZE), Image.Resampling.BOX)


def mask(scene: Scene) -> Image.Image:
    """The object's exact mask as an 8-bit grey image: 255 where the shape covers at least half of the pixel, else 0.

    Drawn from the same outline and super-sampling as :func:`render`, so it marks exactly the pixels whose colour is
    mostly the object's (the role Grounded-SAM's masks play for MACE on real images; baselines/mace.py).
    """
    big = Image.new("L", (SIZE * _SS, SIZE * _SS), 0)
    ImageDraw.Draw(big).polygon(_outline(scene), fill=255)
    coverage = big.resize((SIZE, SIZE), Image.Resampling.BOX)
    return coverage.point(lambda v: 255 if v >= 128 else 0)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One of several plain-English phrasings of the scene, with synonyms."""
    return caption_with_facts(scene, rng)[0]


def caption_with_facts(scene: Scene, rng: np.random.Generator) -> tuple[str, dict[str, str]]:
    """A caption and the facts it states (shape, color, and background/size where mentioned)."""
    color = COLOR_WORDS[scene.color][0 if rng.random() < 0.8 else rng.integers(len(COLOR_WORDS[scene.color]))]
    nouns = SHAPE_NOUNS[scene.shape]
    noun = nouns[0 if rng.random() < 0.7 else rng.integers(len(nouns))]
    bg = BACKGROUND_WORDS[scene.background][rng.integers(len(BACKGROUND_WORDS[scene.background]))]
    size = scene.size_word if rng.random() < 0.5 else None
    facts = {"shape": scene.shape, "color": scene.color}
    if size:
        facts["size"] = size
    if rng.random() < 0.2:  # "a round red shape"
        words = [w for w in (size, SHAPE_ADJECTIVES[scene.shape], color, "shape") if w]
    else:
        words = [w for w in (size, color, noun) if w]
    text = f"{article(words[0])} {' '.join(words)}"
    if rng.random() < 0.4:
        text += f" on {article(bg)} {bg} background"
        facts["background"] = scene.background
    return text, facts


def consistent(facts: dict[str, str], scene: Scene) -> bool:
    """Whether a caption's facts hold for a scene."""
    return all((scene.size_word if k == "size" else getattr(scene, k)) == v for k, v in facts.items())


def prompt(shape: str, color: str | None = None) -> str:
    """The canonical prompt of a shape (and colour), e.g. 'a red circle' or 'a circle'."""
    words = [w for w in (color, shape) if w]
    return f"{article(words[0])} {' '.join(words)}"


def sample(n: int, seed: int, with_captions: bool = True, **fixed) -> tuple[list[Scene], list[Image.Image], list[str]]:
    """``n`` scenes, their renders and captions, a pure function of ``seed`` (and ``fixed`` labels)."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, **fixed) for _ in range(n)]
    images = [render(s) for s in scenes]
    captions = [caption(s, rng) for s in scenes] if with_captions else []
    return scenes, images, captions


def to_uint8(images: list[Image.Image]) -> np.ndarray:
    """N x 3 x H x W uint8 array."""
    return np.stack([np.asarray(im.convert("RGB")) for im in images]).transpose(0, 3, 1, 2).copy()


def write_concept_data(out: str | Path, shape: str | None = "circle", n: int = 8, seed: int = 0,
                       color: str | None = None, name: str | None = None) -> dict:
    """Render ``n`` scenes of ``shape`` (and/or ``color``; None: drawn per scene) into ``<out>/<name>/<i>.png`` and
    their masks into ``<out>/<name> mask/<i>_mask.png`` (8-bit grey, 0 or 255); ``name`` defaults to the shape, else
    the colour, or "<colour> <shape>" with both. Returns what was written."""
    if shape is None and color is None:
        raise UserError("give the concept's shape, its colour or both (shape=circle, color=red)")
    if shape is not None and shape not in SHAPES:
        raise UserError(f"unknown shape '{shape}': choose one of {', '.join(SHAPES)}")
    if color is not None and color not in COLORS:
        raise UserError(f"unknown colour '{color}': choose one of {', '.join(COLORS)}")
    if n < 1:
        raise UserError(f"n must be at least 1, got {n}")
    name = name or " ".join(w for w in (color if shape else None, shape) if w) or str(color)
    out = Path(out)
    images_dir, masks_dir = out / name, out / f"{name} mask"
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    fixed = {k: v for k, v in (("shape", shape), ("color", color)) if v is not None}
    scenes, images, _ = sample(n, seed, with_captions=False, **fixed)
    for i, (scene, image) in enumerate(zip(scenes, images)):
        image.save(images_dir / f"{i}.png")
        mask(scene).save(masks_dir / f"{i}_mask.png")
    log.info("wrote %d renders of '%s' and their masks to %s", n, name, out)
    return {"out": str(out), "name": name, "shape": shape, "color": color, "n": n, "seed": seed,
            "scenes": [{"shape": s.shape, "color": s.color, "background": s.background, "extent": round(s.extent, 3)}
                       for s in scenes]}
