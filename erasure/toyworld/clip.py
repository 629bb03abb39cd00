"""The toy world's tiny CLIP: a transformers ``CLIPModel`` trained contrastively on renders and captions.

Its text tower is the diffusion model's text encoder (frozen under the UNet, as in SD), and the
whole model (with a ``CLIPProcessor``) is saved in Hugging Face format as the world's CLIP-score model.
Batches hold repeated descriptions ("a red circle" twice), so the contrastive targets are
multi-positive: every caption whose facts hold for an image counts as a match.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..tokenizer import build_clip_tokenizer, slim_tokenizer_files
from . import world

log = logging.getLogger(__name__)

# CLIP's image normalisation (openai/clip-vit-*/preprocessor_config.json)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_config(text_width: int = 32, vision_width: int = 64, projection_dim: int = 32):
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(vocab_size=49408, hidden_size=text_width, intermediate_size=4 * text_width,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                          projection_dim=projection_dim, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = CLIPVisionConfig(hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=2,
                              num_attention_heads=4, image_size=world.SIZE, patch_size=4, projection_dim=projection_dim)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection_dim)


def build_processor():
    from transformers import CLIPImageProcessor, CLIPProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": world.SIZE}, crop_size={"height": world.SIZE, "width": world.SIZE},
                                         image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)
    return CLIPProcessor(image_processor=image_processor, tokenizer=build_clip_tokenizer())


def pixel_values(x_uint8: torch.Tensor) -> torch.Tensor:
    """What ``CLIPImageProcessor`` makes of a 32x32 uint8 batch (no resize needed at the native size)."""
    x = x_uint8.float() / 255
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def train_clip(out_dir: str | Path, steps: int = 1500, batch: int = 128, seed: int = 0, lr: float = 2e-3) -> dict:
    """Contrastive training from a seed; saves CLIPModel + CLIPProcessor to ``out_dir``; returns held-out retrieval accuracy."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = CLIPModel(clip_config())
    tok = build_clip_tokenizer()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in tqdm(range(steps), desc="tiny CLIP", dynamic_ncols=True, disable=None):
        scenes = [world.sample_scene(rng) for _ in range(batch)]
        caps = [world.caption_with_facts(s, rng) for s in scenes]
        x = torch.from_numpy(world.to_uint8([world.render(s) for s in scenes]))
        ids = tok([c for c, _ in caps], padding=True, return_tensors="pt")
        out = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=pixel_values(x))
        match = torch.tensor([[world.consistent(f, s) for _, f in caps] for s in scenes], dtype=torch.float32)
        logits = out.logits_per_image  # images x texts
        loss = 0.5 * (-(F.log_softmax(logits, 1) * match / match.sum(1, keepdim=True)).sum(1).mean()
                      - (F.log_softmax(logits.T, 1) * match.T / match.T.sum(1, keepdim=True)).sum(1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0:
            log.info("CLIP step %d loss %.4f (logit scale %.2f)", step, loss.item(), model.logit_scale.exp().item())
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    build_processor().save_pretrained(out_dir)
    slim_tokenizer_files(out_dir)
    acc = retrieval_accuracy(model, tok, seed=20_000 + seed)
    log.info("tiny CLIP held-out zero-shot accuracy: shape %.4f, colour %.4f", acc["shape"], acc["color"])
    return acc


@torch.no_grad()
def retrieval_accuracy(model, tok, seed: int, n: int = 500) -> dict:
    """Zero-shot classification of fresh renders with prompts 'a <colour> <shape>' (argmax over all pairs)."""
    scenes, images, _ = world.sample(n, seed, with_captions=False)
    pairs = [(s, c) for s in world.SHAPES for c in world.COLORS]
    ids = tok([world.prompt(s, c) for s, c in pairs], padding=True, return_tensors="pt")
    t = F.normalize(model.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask).pooler_output, dim=-1)
    v = F.normalize(model.get_image_features(pixel_values=pixel_values(torch.from_numpy(world.to_uint8(images)))).pooler_output, dim=-1)
    best = (v @ t.T).argmax(1).tolist()
    return {"shape": float(np.mean([pairs[b][0] == s.shape for b, s in zip(best, scenes)])),
            "color": float(np.mean([pairs[b][1] == s.color for b, s in zip(best, scenes)]))}
