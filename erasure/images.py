"""Image helpers: atomic PNG writes and labelled grids."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from .io import atomic_write


def save_png(image: Image.Image, path: str | Path, text: dict[str, str] | None = None) -> Path:
    """Write a PNG atomically (temporary name, then rename): a kill never leaves a truncated file. ``text``: tEXt/iTXt
    chunks (e.g. the exact prompt), read back with ``Image.open(path).text``."""
    info = None
    if text:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for key, value in text.items():
            info.add_itxt(key, str(value))  # iTXt: UTF-8, so any prompt survives
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def grid(rows: list[list[Image.Image]], row_labels: list[str] | None = None, col_labels: list[str] | None = None,
         pad: int = 2) -> Image.Image:
    """Images in a grid, with optional text labels on the left and on top."""
    h = max(im.height for r in rows for im in r)
    w = max(im.width for r in rows for im in r)
    left = 8 + 6 * max((len(s) for s in row_labels), default=0) if row_labels else 0
    top = 14 if col_labels else 0
    ncols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (left + ncols * (w + pad), top + len(rows) * (h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(col_labels or []):
        draw.text((left + j * (w + pad) + 2, 1), label, fill="black")
    for i, row in enumerate(rows):
        if row_labels:
            draw.text((2, top + i * (h + pad) + h // 2 - 5), row_labels[i], fill="black")
        for j, im in enumerate(row):
            canvas.paste(im, (left + j * (w + pad), top + i * (h + pad)))
    return canvas


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (figures are written to files, never shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
