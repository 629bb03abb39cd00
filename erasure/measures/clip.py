"""CLIPScore on the paper's scale: torchmetrics ``CLIPScore`` (100 × cosine, mean over images) / 100.

The CLIP model is read from a local folder (``transformers`` ``CLIPModel`` + ``CLIPProcessor``
saved with ``save_pretrained``); nothing is fetched from a hub. For SD v1.4 that is
openai/clip-vit-large-patch14 where the user has it; tests and the toy world use small local CLIPs.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from erasure.errors import UserError


@functools.lru_cache(maxsize=2)
def load_clip(model_path: str):
    """(CLIPModel, CLIPProcessor) from a local folder, eval mode."""
    from transformers import CLIPModel, CLIPProcessor

    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise UserError(f"CLIP model folder '{model_path}' has no config.json: set suite.metrics.clip.model to a local "
                        "folder holding a transformers CLIPModel and CLIPProcessor (save_pretrained)")
    model = CLIPModel.from_pretrained(str(path), local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
    return model, processor


class _ProjectedFeatures(torch.nn.Module):
    """Adapter for torchmetrics: transformers 5 returns ``get_*_features`` as an output object whose
    ``pooler_output`` holds the projected embedding; torchmetrics 1.9 expects the tensor itself."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _tensor(self.model.get_text_features(*args, **kwargs))


def _tensor(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _as_nchw(images) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
        if images.ndim == 4 and images.shape[-1] == 3:
            images = images.permute(0, 3, 1, 2)
    return images


@torch.no_grad()
def clip_score(images_uint8, captions: list[str], model_path: str | Path, batch_size: int = 32) -> float:
    """Mean CLIPScore / 100 of uint8 images (N×3×H×W torch or N×H×W×3 numpy) against their captions."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    images = _as_nchw(images_uint8)
    captions = list(captions)
    if len(images) != len(captions):
        raise UserError(f"CLIPScore needs one caption per image, got {len(images)} images and {len(captions)} captions")
    if not len(images):
        raise UserError("CLIPScore needs at least one image")
    model, processor = load_clip(str(model_path))
    metric = CLIPScore(model_name_or_path=lambda: (_ProjectedFeatures(model), processor))
    for i in range(0, len(images), batch_size):
        metric.update(images[i:i + batch_size], captions[i:i + batch_size])
    return float(metric.compute()) / 100.0
