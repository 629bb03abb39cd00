"""SDD: Towards Safe Self-Distillation of Internet-Scale Text-to-Image Diffusion Models (Kim, Jung, Yang,
Yun; ICML 2023 workshop). Official code: nannullna/safe-diffusion, ``train_sdd.py`` (run with
``run_sdd_nudity.sh``: ``--removing_concepts nudity``, every other argument at its default).

One iteration (train_sdd.py, ``train_step`` and the loop in ``main``):

* the EMA teacher samples z_t: DDIM (eta = 0) with guidance 3 on the prompt ", ".join(concepts) from
  x_T ~ N(0, I), stopped after k ~ U{0..49} of 50 steps (``sample_until``);
* loss  MSE( sg[eps_student(z_t, ∅)],  eps_student(z_t, c_s) ),  c_s the concept being removed (iterated);
* AdamW (lr 1e-5, weight decay 1e-4), gradient norm clipped to 1.0, then the teacher becomes an exponential
  moving average of the student, decay 0.999, over every parameter (the untrained ones are equal anyway);
* the teacher (``unet_teacher``) is what train_sdd.py validates and saves: ``export_params`` returns it.

The EMA teacher is a second :class:`erasure.teacher.Teacher` over the same UNet (the shared frozen-subset
mechanism), so the trainer's own ``ctx.teacher`` keeps the base weights theta* for anything that compares
against the base (e.g. a model tier's probe).

Differences to train_sdd.py: its UNet is queried at a DDPM timestep drawn inside the DDIM bin of z_t
(``t_ddpm``); we use the DDIM timestep at which z_t lives (the shared sampler). For k = 0 its loop runs all
50 steps (``if i == until - 1`` never fires) and pairs the clean latent with a timestep near 1000; ours keeps
z_t = x_T at the first timestep. Its ``--guidance_scale`` default is 3.0 in the revision stored with
run_sdd_nudity.sh (8e00aed) and 1.0 in another stored revision (8c57951); we take 3.0.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from erasure.errors import UserError
from erasure.method import BaseMethodConfig, ErasureMethod
from erasure.registry import register
from erasure.sampling import eps_all, sample_to_step
from erasure.teacher import Teacher, student_eps


@dataclasses.dataclass
class SDDConfig(BaseMethodConfig):
    name: str = "sdd"
    iterations: int = 1500  # train_sdd.py: --num_train_steps default 1500
    lr: float = 1e-5  # train_sdd.py: --learning_rate default 1e-5 (constant schedule, no warm-up)
    adam_eps: float = 1e-8  # train_sdd.py: --adam_epsilon default 1e-8
    adam_betas: tuple[float, float] = (0.9, 0.999)  # train_sdd.py: --adam_beta1/--adam_beta2 defaults
    weight_decay: float = 1e-4  # train_sdd.py: --weight_decay default 1e-4
    grad_clip: float | None = 1.0  # train_sdd.py: --max_grad_norm default 1.0
    ema_decay: float = 0.999  # train_sdd.py: --ema_decay default 0.999
    guidance: float = 3.0  # train_sdd.py (8e00aed): --guidance_scale default 3.0
    ddim_steps: int = 50  # train_sdd.py: --num_ddim_steps default 50


def sdd_loss(student_u: torch.Tensor, student_c: torch.Tensor) -> torch.Tensor:
    """MSE(sg[eps_student(z_t, ∅)], eps_student(z_t, c_s)): the concept is pulled to the student's own ∅."""
    return F.mse_loss(student_c, student_u.detach())


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], live: dict[str, torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * live, in place (train_sdd.py: ema_param.mul_(d).add_(p, alpha=1-d))."""
    for name, value in ema.items():
        value.mul_(decay).add_(live[name].detach().to(value.dtype), alpha=1 - decay)


@register("sdd")
class SDD(ErasureMethod):
    Config = SDDConfig
    default_params = "xattn"  # train_sdd.py: --finetuning_method default xattn

    @classmethod
    def validate(cls, cfg: SDDConfig) -> None:
        super().validate(cfg)  # ema_decay in [0, 1): erasure/schema.py (1 would freeze the teacher)
        if cfg.ddim_steps < 2:
            raise UserError(f"method.ddim_steps must be at least 2, got {cfg.ddim_steps}")

    def __init__(self, cfg: SDDConfig, ctx):
        super().__init__(cfg, ctx)
        self.concepts = [str(t) for t in ctx.concept.targets]
        self.ema = Teacher(ctx.unet, ctx.trainable)  # starts as a copy of the base, like unet_teacher
        self.emb_uncond = ctx.embed([""])
        self.emb_prompt = ctx.embed([", ".join(self.concepts)])  # train_sdd.py: prompt = ", ".join(removing_concepts)
        self.emb_concepts = ctx.embed(self.concepts)

    def training_step(self, step: int) -> dict[str, torch.Tensor]:
        ctx, cfg = self.ctx, self.cfg
        i = (step - 1) % len(self.concepts)  # train_sdd.py: concept_method 'iterative'
        emb_s = self.emb_concepts[i: i + 1]
        steps_taken = ctx.randint(0, cfg.ddim_steps)  # train_sdd.py: t_ddim = torch.randint(0, num_ddim_steps)
        x_T = ctx.randn(1, *ctx.models.latent_shape)
        z_t, timestep = sample_to_step(self.ema, ctx.models.scheduler, x_T, [self.emb_uncond, self.emb_prompt],
                                       steps_taken, cfg.ddim_steps, cfg.guidance)
        with torch.no_grad():
            (student_u,) = eps_all(lambda x, t, e: student_eps(ctx.unet, x, t, e), z_t, timestep, [self.emb_uncond])
        student_c = student_eps(ctx.unet, z_t, timestep, emb_s)
        return {"loss": sdd_loss(student_u, student_c)}

    def after_step(self, step: int) -> None:
        ema_update(self.ema.params, self.ctx.trainable, self.cfg.ema_decay)

    def state_dict(self) -> dict:
        return {"ema": dict(self.ema.params)}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name, value in state["ema"].items():
                self.ema.params[name].copy_(value)

    def export_params(self) -> dict[str, torch.Tensor]:
        """The EMA teacher is the erased model (train_sdd.py saves and evaluates ``unet_teacher``)."""
        return {name: p.detach() for name, p in self.ema.params.items()}
