"""ESD: Erasing Concepts from Diffusion Models (Gandikota, Materzynska, Fiotto-Kaufman, Bau; ICCV 2023).

Official code: rohitgandikota/erasing. The paper's models (the released ESD-u nudity model among them)
come from the original CompVis script ``train-scripts/train-esd.py``; the repository was later rewritten
on diffusers (``esd_diffusers.py``, then ``esd_sd.py``). One iteration (train-esd.py, ``train_esd``):

* draw a DDIM step of a ``ddim_steps`` = 50 schedule and run DDIM (eta = 0) with classifier-free guidance
  ``start_guidance`` = 3 on the concept prompt from x_T ~ N(0, I) down to it: z_t;
* teacher (frozen theta*): eps*(z_t, ∅) and eps*(z_t, c);
* loss  MSE( eps_theta(z_t, c),  eps*(z_t, ∅) - eta (eps*(z_t, c) - eps*(z_t, ∅)) ),  eta = negative_guidance = 1.

Where the versions disagree, we follow train-esd.py (the released models) unless said otherwise:

* sampler: train-esd.py samples z_t with the model being trained (``quick_sample_till_t`` wraps ``model``,
  not ``model_orig``), and so does esd_diffusers.py (``with finetuner:``); esd_sd.py (2024) samples with the
  frozen base (``pipe.unet = base_unet``). ``sampler: student`` (default) or ``teacher``.
* target: train-esd.py and the paper use eps*(z_t, ∅) - eta(...); esd_sd.py writes eps*(z_t, c) - eta(...)
  (its ``noise_pred_erase_from``). We use the former.
* timestep: train-esd.py queries the UNet at a DDPM timestep drawn inside the DDIM bin of z_t
  (``t_enc_ddpm``); esd_sd.py and our shared sampler use the DDIM timestep at which z_t lives.
* defaults (1,000 iterations, lr 1e-5, eta 1, guidance 3, 50 steps) are train-esd.py's argparse defaults;
  esd_sd.py's differ (200 iterations, lr 5e-5, eta 2). Adam without weight decay = AdamW with decay 0.
* parameters: ESD-u = ``params=noxattn`` (train_method 'noxattn'), ESD-x = ``params=xattn`` ('xattn').
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from erasure.errors import UserError
from erasure.method import BaseMethodConfig, ErasureMethod
from erasure.registry import register
from erasure.sampling import eps_all, sample_to_step
from erasure.teacher import student_eps

SAMPLERS = ("student", "teacher")


@dataclasses.dataclass
class ESDConfig(BaseMethodConfig):
    name: str = "esd"
    iterations: int = 1000  # train-esd.py: --iterations default 1000
    lr: float = 1e-5  # train-esd.py: --lr default 1e-5
    adam_eps: float = 1e-8  # torch.optim.Adam default (train-esd.py: torch.optim.Adam(parameters, lr=lr))
    adam_betas: tuple[float, float] = (0.9, 0.999)  # torch.optim.Adam default betas (train-esd.py passes none)
    weight_decay: float = 0.0  # torch.optim.Adam default: no weight decay
    grad_clip: float | None = None  # train-esd.py: no gradient clipping
    eta: float = 1.0  # train-esd.py: --negative_guidance default 1
    start_guidance: float = 3.0  # train-esd.py: --start_guidance default 3
    ddim_steps: int = 50  # train-esd.py: --ddim_steps default 50
    # Who samples z_t. student: train-esd.py (quick_sample_till_t uses `model`, the one being trained) and
    # esd_diffusers.py (`with finetuner:`); teacher: esd_sd.py (`pipe.unet = base_unet`). Default student,
    # because train-esd.py produced the released models that papers (All but One included) compare against.
    sampler: str = "student"


def esd_loss(student_c: torch.Tensor, teacher_u: torch.Tensor, teacher_c: torch.Tensor, eta: float) -> torch.Tensor:
    """MSE(eps_theta(z_t, c), eps*(z_t, ∅) - eta (eps*(z_t, c) - eps*(z_t, ∅))): the negatively guided target."""
    target = teacher_u - eta * (teacher_c - teacher_u)
    return F.mse_loss(student_c, target.detach())


@register("esd")
class ESD(ErasureMethod):
    Config = ESDConfig
    default_params = "noxattn"  # ESD-u, the released nudity model (conf/method/esd.yaml)

    @classmethod
    def validate(cls, cfg: ESDConfig) -> None:
        super().validate(cfg)
        if cfg.sampler not in SAMPLERS:
            raise UserError(f"method.sampler must be one of {', '.join(SAMPLERS)}, got '{cfg.sampler}'")
        if cfg.ddim_steps < 2:
            raise UserError(f"method.ddim_steps must be at least 2, got {cfg.ddim_steps}")

    def __init__(self, cfg: ESDConfig, ctx):
        super().__init__(cfg, ctx)
        self.targets = [str(t) for t in ctx.concept.targets]
        self.emb_uncond = ctx.embed([""])
        self.emb_targets = ctx.embed(self.targets)

    def _student(self, x, t, e):
        return student_eps(self.ctx.unet, x, t, e)

    @property
    def supports_teacher_bank(self) -> bool:
        """Batched z_t only where the frozen base samples it (esd_sd.py); train-esd.py's student sampling depends
        on the weights being trained, so it stays one trajectory at a time."""
        return self.cfg.sampler == "teacher"

    def draw(self, step: int) -> dict:
        ctx, cfg = self.ctx, self.cfg
        i = ctx.randint(0, len(self.targets))  # train-esd.py: word = random.sample(words, 1)[0]
        steps_taken = ctx.randint(0, cfg.ddim_steps)  # train-esd.py: t_enc = torch.randint(ddim_steps, (1,))
        x_T = ctx.randn(1, *ctx.models.latent_shape)
        return dict(target_index=i, steps_taken=steps_taken, x_T=x_T)

    @torch.no_grad()
    def _work(self, draws: list[dict], sampler) -> list[dict]:
        """z_t (DDIM with guidance start_guidance, sampled by ``sampler``) and the teacher's eps at z_t, per draw."""
        ctx, cfg = self.ctx, self.cfg
        index = torch.tensor([d["target_index"] for d in draws], device=ctx.device)
        emb_c = self.emb_targets[index]
        z_t, timesteps = sample_to_step(sampler, ctx.models.scheduler, torch.cat([d["x_T"] for d in draws]),
                                        [self.emb_uncond, emb_c], [d["steps_taken"] for d in draws],
                                        cfg.ddim_steps, cfg.start_guidance)
        teacher_u, teacher_c = eps_all(ctx.teacher, z_t, timesteps, [self.emb_uncond, emb_c])
        return [dict(z_t=z_t[k: k + 1], timestep=timesteps[k], target_index=d["target_index"],
                     teacher_u=teacher_u[k: k + 1], teacher_c=teacher_c[k: k + 1]) for k, d in enumerate(draws)]

    def teacher_work(self, draws: list[dict]) -> list[dict]:
        return self._work(draws, self.ctx.teacher)

    def student_loss(self, work: dict) -> dict[str, torch.Tensor]:
        i = work["target_index"]
        student_c = self._student(work["z_t"], work["timestep"], self.emb_targets[i: i + 1])
        return {"loss": esd_loss(student_c, work["teacher_u"], work["teacher_c"], self.cfg.eta)}

    def training_step(self, step: int) -> dict[str, torch.Tensor]:
        sampler = self._student if self.cfg.sampler == "student" else self.ctx.teacher
        return self.student_loss(self._work([self.draw(step)], sampler)[0])
