"""ESD: Erasing Concepts from Diffusion Models (Gandikota, Materzynska, Fiotto-Kaufman, Bau; ICCV 2023).

Official code: rohitgandikota/erasing. The paper's models (the released ESD-u nudity model among them) come from
the original CompVis script ``train-scripts/train-esd.py``; the repository was later rewritten on diffusers
(``esd_diffusers.py``, then ``esd_sd.py``) and the CompVis code removed (414dc94). Line numbers below: train-esd.py
and its ldm code at 6eb7dc8f266e3cdcbbf6ae9e030fbd44f03bb2ab, the last commit that holds them (train-esd.py last
changed in b8aeab6); esd_sd.py and utils/sd_utils.py at 25613d27892326e0c7770f7f3555bea4be150089.

One iteration of train-esd.py (``train_esd``, l.217-253), with S = ``ddim_steps`` = 50 and N = 1000 DDPM steps:

* ``t_enc`` ~ U{0..S-1} (l.226) and ``t_enc_ddpm`` ~ U{round(N t_enc / S) .. round(N (t_enc+1) / S) - 1} (l.228-231:
  ``og_num``, ``og_num_lim``; for S = 50 the bin 20 t_enc .. 20 t_enc + 19), then x_T ~ N(0, I) (l.233);
* z = ``quick_sample_till_t(emb_p, start_guidance, x_T, t_enc)`` (l.205-207, l.237): ldm's DDIMSampler, eta 0,
  guidance ``start_guidance`` = 3 on the concept prompt. Its schedule is 1, 21, ..., 981 (util.py l.46-60:
  ``range(0, N, N // S)`` plus 1), and ``t_start=-1`` (train-esd.py l.40, l.59; ddim.py l.155) drops the last
  entry, 981: x_T is taken to lie at 961 and the loop (ddim.py l.158-195) steps 961 -> 941 -> ... and stops after
  the step whose index (ddim.py l.171) is ``t_enc - 1`` (l.194-195). It takes S - t_enc steps for t_enc >= 1 and,
  since the stop never fires for t_enc = 0, all S - 1 = 49 steps for t_enc = 0; t_enc in {0, 1} gives the fully
  denoised z (at alphas_cumprod[0], util.py l.66), t_enc >= 2 a z at DDPM timestep 20 t_enc - 39;
* teacher (frozen theta*) eps*(z, ∅), eps*(z, c) and the student eps_theta(z, c), all at ``t_enc_ddpm``
  (l.239-243) — 39 to 58 DDPM steps noisier than z for t_enc >= 2 (0 to 19 and 20 to 39 for t_enc = 0, 1);
* loss  MSE( eps_theta(z, c),  eps*(z, ∅) - eta (eps*(z, c) - eps*(z, ∅)) ),  eta = negative_guidance = 1 (l.247).

``timesteps`` chooses how z and the query timestep are drawn:

* ``compvis`` (default; train-esd.py, the script behind the released models and the All-but-One comparison): the
  above. We step along ldm's list (:func:`compvis_ddim_timesteps`, 961, 941, ..., 1 for S = 50) for
  :func:`compvis_steps_taken` steps with the diffusers DDIMScheduler's own ``step``
  (:func:`erasure.sampling.sample_along`): after ``set_timesteps(S)`` it goes from t to t - N // S, ldm's stride,
  with alpha_t = alphas_cumprod[t] and, below 0, alphas_cumprod[0] (``set_alpha_to_one`` false, as SD v1.4's
  scheduler sets), as ldm's alphas / alphas_prev do (util.py l.65-66). For SD v1.4 (``steps_offset`` 1, "leading")
  the scheduler's own 50 timesteps are 981, ..., 1, so this is its schedule without its first entry. Remaining
  differences: where ldm's list reaches N (N // S dividing N - 1, e.g. S = 3) the script fails indexing
  alphas_cumprod and we run; a scheduler with ``set_alpha_to_one`` ends the last step at alpha 1; N is the
  scheduler's ``num_train_timesteps`` where the script writes 1000 (SD v1.4's num_timesteps); the noise schedule
  is the scheduler's float32 one (ldm builds it in float64 and stores float32).
* ``diffusers`` (esd_sd.py l.128-129 and utils/sd_utils.py l.209): k ~ U{0..S-1}, z after k steps of the
  scheduler's own S-step schedule from x_T at its first timestep (981 for SD v1.4), and every UNet query at z's own
  timestep ``timesteps[k]`` (:func:`erasure.sampling.sample_to_step`).

Where the versions disagree otherwise, we follow train-esd.py unless said otherwise:

* sampler: train-esd.py samples z with the model being trained (``quick_sample_till_t`` wraps ``model``,
  not ``model_orig``), and so does esd_diffusers.py (``with finetuner:``); esd_sd.py (2024) samples with the
  frozen base (``pipe.unet = base_unet``). ``sampler: student`` (default) or ``teacher``.
* target: train-esd.py and the paper use eps*(z, ∅) - eta(...); esd_sd.py writes eps*(z, c) - eta(...)
  (its ``noise_pred_erase_from``). We use the former.
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
from erasure.sampling import eps_all, sample_along, sample_to_step
from erasure.teacher import student_eps

SAMPLERS = ("student", "teacher")
TIMESTEPS = ("compvis", "diffusers")


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
    # How z_t and the query timestep are drawn (module docstring). compvis: train-esd.py (6eb7dc8) l.226-243, t_enc
    # ~ U{0..S-1}, ldm DDIM with t_start=-1 to t_enc, every UNet query at t_enc_ddpm drawn in [og_num, og_num_lim);
    # diffusers: esd_sd.py (25613d2) l.128-129 + sd_utils.py l.209, k ~ U{0..S-1}, queries at z's own timestep.
    # Default compvis: train-esd.py trained the released models that papers (All but One included) compare against.
    timesteps: str = "compvis"


def esd_loss(student_c: torch.Tensor, teacher_u: torch.Tensor, teacher_c: torch.Tensor, eta: float) -> torch.Tensor:
    """MSE(eps_theta(z_t, c), eps*(z_t, ∅) - eta (eps*(z_t, c) - eps*(z_t, ∅))): the negatively guided target."""
    target = teacher_u - eta * (teacher_c - teacher_u)
    return F.mse_loss(student_c, target.detach())


def compvis_ddim_timesteps(ddim_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The timesteps quick_sample_till_t steps through, noisiest first. ldm's make_ddim_timesteps('uniform')
    (rohitgandikota/erasing 6eb7dc8, ldm/modules/diffusionmodules/util.py l.48-49, l.57): range(0, N, N // S) + 1
    (S = 50: 1, 21, ..., 981); ddim_sampling keeps ``timesteps[:t_start]`` with t_start = -1 (ldm/models/diffusion/
    ddim.py l.155; train-esd.py l.40 default, passed at l.59), dropping the noisiest entry, and flips it (l.158):
    961, 941, ..., 1."""
    stride = num_train_timesteps // ddim_steps
    return [t + 1 for t in range(0, num_train_timesteps, stride)][:-1][::-1]


def compvis_steps_taken(t_enc: int, ddim_steps: int, num_train_timesteps: int = 1000) -> int:
    """How many DDIM steps quick_sample_till_t(..., t_enc) takes (train-esd.py l.237). The loop (ddim.py l.170-195)
    gives step i the index M - 1 - i (l.171; M = len(compvis_ddim_timesteps), 49 for S = 50) and breaks after the
    step with index + 1 == t_enc (l.194-195): M - t_enc + 1 steps (50 - t_enc for S = 50), and all M for t_enc = 0,
    whose break never fires (till = 0, l.166-167)."""
    m = len(compvis_ddim_timesteps(ddim_steps, num_train_timesteps))
    return m if t_enc == 0 else m - t_enc + 1


def compvis_query_bin(t_enc: int, ddim_steps: int, num_train_timesteps: int = 1000) -> tuple[int, int]:
    """[og_num, og_num_lim): the DDPM timesteps t_enc_ddpm is drawn from (train-esd.py l.228-231, with 1000 written
    out there; Python's round as in the script). S = 50: [20 t_enc, 20 t_enc + 20)."""
    og_num = round((t_enc / ddim_steps) * num_train_timesteps)
    og_num_lim = round(((t_enc + 1) / ddim_steps) * num_train_timesteps)
    return og_num, og_num_lim


def compvis_draw(ctx, ddim_steps: int, batch: int = 1) -> dict:
    """One CompVis draw from the method's generator, in train-esd.py's order (l.226-233): t_enc, t_enc_ddpm inside
    its bin (``query``, a long tensor), start codes x_T (``batch`` of them). Shared by methods that sample as
    train-esd.py does (AdvUnlearn's get_loss.py / attack_util.py repeat these lines)."""
    n = int(ctx.models.scheduler.config.num_train_timesteps)
    t_enc = ctx.randint(0, ddim_steps)
    query = ctx.randint(*compvis_query_bin(t_enc, ddim_steps, n))
    return dict(t_enc=t_enc, query=torch.tensor(query, dtype=torch.long), x_T=ctx.randn(batch, *ctx.models.latent_shape))


@torch.no_grad()
def compvis_sample(eps_fn, scheduler, draw: dict, emb_uncond: torch.Tensor, emb_c: torch.Tensor, ddim_steps: int,
                   guidance: float) -> torch.Tensor:
    """z of a :func:`compvis_draw`: quick_sample_till_t(emb_c, guidance, x_T, t_enc) with ``eps_fn`` as the model."""
    n = int(scheduler.config.num_train_timesteps)
    steps = compvis_steps_taken(draw["t_enc"], ddim_steps, n)
    z, _ = sample_along(eps_fn, scheduler, draw["x_T"], [emb_uncond, emb_c], compvis_ddim_timesteps(ddim_steps, n),
                        [steps] * draw["x_T"].shape[0], ddim_steps, guidance)
    return z


@register("esd")
class ESD(ErasureMethod):
    Config = ESDConfig
    default_params = "noxattn"  # ESD-u, the released nudity model (conf/method/esd.yaml)

    @classmethod
    def validate(cls, cfg: ESDConfig) -> None:
        super().validate(cfg)
        if cfg.sampler not in SAMPLERS:
            raise UserError(f"method.sampler must be one of {', '.join(SAMPLERS)}, got '{cfg.sampler}'")
        if cfg.timesteps not in TIMESTEPS:
            raise UserError(f"method.timesteps must be one of {', '.join(TIMESTEPS)}, got '{cfg.timesteps}'")
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
        i = ctx.randint(0, len(self.targets))  # train-esd.py l.218: word = random.sample(words, 1)[0]
        if cfg.timesteps == "diffusers":
            steps_taken = ctx.randint(0, cfg.ddim_steps)  # esd_sd.py l.128: random.randint(0, num_inference_steps-1)
            x_T = ctx.randn(1, *ctx.models.latent_shape)
            return dict(target_index=i, steps_taken=steps_taken, x_T=x_T)
        d = compvis_draw(ctx, cfg.ddim_steps)  # train-esd.py l.226-233: t_enc, t_enc_ddpm, start_code
        return dict(target_index=i, t_enc=d["t_enc"], query_timestep=int(d["query"]), x_T=d["x_T"])

    @property
    def _num_train(self) -> int:
        """N, the DDPM steps (train-esd.py l.228-229 writes 1000, SD v1.4's num_timesteps)."""
        return int(self.ctx.models.scheduler.config.num_train_timesteps)

    @torch.no_grad()
    def _work(self, draws: list[dict], sampler) -> list[dict]:
        """z_t (DDIM with guidance start_guidance, sampled by ``sampler``) and the teacher's eps, per draw, at the
        query timestep: t_enc_ddpm (compvis) or z_t's own timestep (diffusers)."""
        ctx, cfg = self.ctx, self.cfg
        index = torch.tensor([d["target_index"] for d in draws], device=ctx.device)
        emb_c = self.emb_targets[index]
        x_T = torch.cat([d["x_T"] for d in draws])
        if cfg.timesteps == "diffusers":
            z_t, z_timesteps = sample_to_step(sampler, ctx.models.scheduler, x_T, [self.emb_uncond, emb_c],
                                              [d["steps_taken"] for d in draws], cfg.ddim_steps, cfg.start_guidance)
            queries = z_timesteps
        else:  # train-esd.py l.237 (z), l.239-240 (teacher at t_enc_ddpm)
            z_t, z_timesteps = sample_along(
                sampler, ctx.models.scheduler, x_T, [self.emb_uncond, emb_c],
                compvis_ddim_timesteps(cfg.ddim_steps, self._num_train),
                [compvis_steps_taken(d["t_enc"], cfg.ddim_steps, self._num_train) for d in draws],
                cfg.ddim_steps, cfg.start_guidance)
            queries = torch.tensor([d["query_timestep"] for d in draws], dtype=torch.long)
        teacher_u, teacher_c = eps_all(ctx.teacher, z_t, queries, [self.emb_uncond, emb_c])
        return [dict(z_t=z_t[k: k + 1], timestep=queries[k], z_timestep=z_timesteps[k], target_index=d["target_index"],
                     teacher_u=teacher_u[k: k + 1], teacher_c=teacher_c[k: k + 1]) for k, d in enumerate(draws)]

    def teacher_work(self, draws: list[dict]) -> list[dict]:
        return self._work(draws, self.ctx.teacher)

    def student_loss(self, work: dict) -> dict[str, torch.Tensor]:
        i = work["target_index"]
        # train-esd.py l.243: the student at the same query timestep (t_enc_ddpm) as the teacher
        student_c = self._student(work["z_t"], work["timestep"], self.emb_targets[i: i + 1])
        return {"loss": esd_loss(student_c, work["teacher_u"], work["teacher_c"], self.cfg.eta)}

    def training_step(self, step: int) -> dict[str, torch.Tensor]:
        sampler = self._student if self.cfg.sampler == "student" else self.ctx.teacher
        return self.student_loss(self._work([self.draw(step)], sampler)[0])
