"""Model tiers: ``tiny`` (random weights, SD architecture, built in code), and diffusers folders
(``toyworld``, shipped by the project; ``sd14``, CompVis/stable-diffusion-v1-4 on users' machines).

Every tier yields the same :class:`Models` bundle (UNet, VAE, CLIP text encoder, tokenizer and a
DDIM scheduler for the erasing sampler), so that the trainer, the methods and the evaluation run
the same code for all of them; only the config differs.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

log = logging.getLogger(__name__)

# SD v1.4's scheduler settings (CompVis/stable-diffusion-v1-4, scheduler/scheduler_config.json).
# Hand-built schedulers must set clip_sample=False explicitly: diffusers defaults to True, which
# clips the predicted x0 to [-1, 1] at every step and ruins unit-variance latents.
SD_SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclasses.dataclass
class Models:
    """The parts of a latent text-to-image diffusion model that erasure and evaluation need."""

    name: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler: Any  # DDIMScheduler with the model's noise schedule (the erasing sampler, DDIM eta=0)
    generation_scheduler: Any  # the scheduler shipped with the model (used for evaluation images)
    resolution: int  # image side in pixels
    device: torch.device
    dtype: torch.dtype  # compute dtype of frozen parts (fp32 on CPU)
    source: str  # where the weights came from (hub id, folder or "built-in tiny")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.vae_scale_factor
        return (self.unet.config.in_channels, side, side)

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 (first 16 hex digits) of the base UNet's weights, as float32, names and shapes included.

        Computed once at load time, before any training; deltas and evaluation caches are keyed by it.
        """
        return unet_fingerprint(self.unet)

    @functools.cached_property
    def text_encoder_fingerprint(self) -> str:
        """The same hash of the base text encoder's weights (also computed at load time). A delta records both; one
        that holds text-encoder tensors is refused on a base whose text encoder differs (:mod:`erasure.delta`).
        (``fingerprint`` stays the UNet's alone: it keys the evaluation caches and every delta written before text
        encoders could be trained, and the text encoder of the three tiers comes from the same source as the UNet.)"""
        return module_fingerprint(self.text_encoder)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """CLIP text embeddings (last hidden state), padded to the tokenizer's max length, as SD does."""
        ids = self.tokenizer(list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0].float()

    def pipeline(self, unet: torch.nn.Module | None = None, scheduler=None, text_encoder: bool = True):
        """A standard diffusers ``StableDiffusionPipeline`` around these parts (inference only).

        ``text_encoder=False`` leaves the encoder out, for callers that pass float32 ``prompt_embeds`` themselves
        (:func:`erasure.generation.generate`): the pipeline then keeps them in the UNet's dtype instead of casting
        them to a half-precision encoder's."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder if text_encoder else None, tokenizer=self.tokenizer,
            unet=unet if unet is not None else self.unet,
            scheduler=scheduler if scheduler is not None else self.generation_scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )


def unet_fingerprint(unet: torch.nn.Module) -> str:
    """The base UNet's fingerprint; attached adapters (:mod:`erasure.adapters`) are not part of the base."""
    from .adapters import is_adapter_parameter

    return module_fingerprint(unet, skip=is_adapter_parameter)


def module_fingerprint(module: torch.nn.Module, skip=lambda name: False) -> str:
    """sha256 (first 16 hex digits) of a module's state, as float32, names and shapes included."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if skip(name):
            continue
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():  # one GPU per process under `accelerate launch` / torchrun
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' was requested but no CUDA GPU is visible: use trainer.device=cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, key: str = "model.dtype") -> torch.dtype:
    """The torch dtype named by config ``key``; low precision falls back to float32 on the CPU."""
    if name not in DTYPES:
        raise UserError(f"unknown {key} '{name}': choose one of float32, bfloat16, float16")
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype != torch.float32:
        log.info("%s=%s is for GPUs; using float32 on the CPU", key, name)
        dtype = torch.float32
    return dtype


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_tiny(cfg) -> dict[str, Any]:
    """Random-weight parts in SD's exact architecture classes, tiny sizes (diffusers' fast-test style)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer import build_clip_tokenizer

    width = int(cfg.get("width", 32))
    latent_side = int(cfg.resolution) // 2  # two VAE blocks: one 2x down-sampling
    unet = _seeded(cfg.seed, lambda: UNet2DConditionModel(
        sample_size=latent_side, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(width, 2 * width),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width, attention_head_dim=8, norm_num_groups=min(32, width),
    ))
    vae = _seeded(cfg.seed + 1, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(width, 2 * width),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=min(32, width), sample_size=int(cfg.resolution),
    ))
    text_encoder = _seeded(cfg.seed + 2, lambda: CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, projection_dim=width,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )))
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(),
                scheduler=scheduler, generation_scheduler=scheduler, source="built-in tiny (random weights)")


def build_sd14_random(cfg) -> dict[str, Any]:
    """SD v1.4's exact UNet / VAE / CLIP ViT-L/14 text-encoder architecture with random weights.

    Configs as in CompVis/stable-diffusion-v1-4 (unet/, vae/, text_encoder/ config.json). No download:
    for faithful speed and memory measurements, and for parameter counts. Never a stand-in for SD's results.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer import build_clip_tokenizer

    unet = _seeded(cfg.seed, lambda: UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8,
    ))
    vae = _seeded(cfg.seed + 1, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, sample_size=512,
    ))
    text_encoder = _seeded(cfg.seed + 2, lambda: CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    )))
    # SD v1.4 ships a PNDM scheduler (scheduler/scheduler_config.json) with the same noise schedule
    generation = PNDMScheduler(**{k: v for k, v in SD_SCHEDULER_CONFIG.items() if k not in ("clip_sample",)},
                               skip_prk_steps=True)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(),
                scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG), generation_scheduler=generation,
                source="SD v1.4 architecture, random weights")


def _pretrained_location(cfg) -> str:
    path = str(cfg.path)
    if path.startswith("pkg://"):  # a folder shipped inside this package, e.g. pkg://erasure/toyworld/model
        import importlib.resources
        pkg, _, rel = path[len("pkg://"):].partition("/")
        path = str(importlib.resources.files(pkg).joinpath(rel))
    return path


def load_pretrained(cfg) -> dict[str, Any]:
    """A diffusers Stable Diffusion folder (local, or a hub id already in the local cache)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    location = _pretrained_location(cfg)
    kw: dict[str, Any] = dict(local_files_only=True)
    if cfg.get("revision"):
        kw["revision"] = cfg.revision
    is_dir = Path(location).is_dir()
    if not is_dir and str(cfg.path).startswith("pkg://"):
        raise UserError(f"the model '{cfg.name}' shipped with this package is not built at '{location}': "
                        f"run `make {cfg.name}` to build it, or choose another model (model=tiny)")
    if not is_dir and (location.startswith((".", "/")) or Path(location).suffix):
        raise UserError(f"model folder '{location}' does not exist: pass model.path=<a diffusers Stable Diffusion folder>")
    try:
        unet = UNet2DConditionModel.from_pretrained(location, subfolder="unet", use_safetensors=True, **kw)
        vae = AutoencoderKL.from_pretrained(location, subfolder="vae", use_safetensors=True, **kw)
        text_encoder = CLIPTextModel.from_pretrained(location, subfolder="text_encoder", use_safetensors=True, **kw)
        tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer", **kw)
        generation_scheduler = _load_scheduler(location, kw)
    except (OSError, EnvironmentError, ValueError) as exc:
        if is_dir:
            raise UserError(f"could not load a diffusers Stable Diffusion model (safetensors weights) from '{location}': {str(exc).splitlines()[0]}") from None
        raise UserError(
            f"the weights of '{location}' are not on this machine and no model hub is reachable: download them where you have "
            f"hub access (`huggingface-cli download {location}`) and pass model.path=<that folder>") from None
    scheduler = DDIMScheduler.from_config(generation_scheduler.config, clip_sample=False)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                generation_scheduler=generation_scheduler, source=location)


def _load_scheduler(location: str, kw: dict):
    import json

    import diffusers

    if Path(location).is_dir():
        path = Path(location) / "scheduler" / "scheduler_config.json"
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(location, "scheduler/scheduler_config.json", **kw))
    try:
        sched_config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"the model's scheduler config '{path}' is missing or not JSON ({exc}): restore the diffusers "
                        "folder's scheduler/scheduler_config.json") from None
    name = sched_config.get("_class_name") if isinstance(sched_config, dict) else None
    cls = getattr(diffusers, str(name), None) if name else None
    if cls is None or not hasattr(cls, "from_config"):
        raise UserError(f"the model's scheduler config '{path}' names no diffusers scheduler (_class_name: {name!r}): "
                        "set it, e.g. \"_class_name\": \"PNDMScheduler\"")
    return cls.from_config(sched_config)


BUILDERS = {"tiny": build_tiny, "sd14_random": build_sd14_random, "pretrained": load_pretrained}


def load_models(model_cfg, device: str | torch.device = "auto") -> Models:
    """Build or load the model named by ``model_cfg`` (a ``conf/model/*.yaml`` node)."""
    kind = str(model_cfg.kind)
    if kind not in BUILDERS:
        raise UserError(f"unknown model.kind '{kind}': choose one of {', '.join(sorted(BUILDERS))}")
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    dtype = resolve_dtype(str(model_cfg.get("dtype", "float32")), device)
    parts = BUILDERS[kind](model_cfg)
    for key in ("unet", "vae", "text_encoder"):
        parts[key].requires_grad_(False).eval()
    parts["unet"].to(device)  # the UNet stays float32: trained parameters and optimizer state are fp32
    for key in ("vae", "text_encoder"):
        parts[key].to(device) if dtype == torch.float32 else parts[key].to(device, dtype)
    resolution = int(model_cfg.get("resolution") or parts["unet"].config.sample_size * 2 ** (len(parts["vae"].config.block_out_channels) - 1))
    models = Models(name=str(model_cfg.name), resolution=resolution, device=device, dtype=dtype, **parts)
    log.info("loaded model '%s' from %s (UNet %.2fM parameters, fingerprint %s; text encoder %s)", models.name,
             models.source, sum(p.numel() for p in models.unet.parameters()) / 1e6, models.fingerprint,
             models.text_encoder_fingerprint)
    return models
