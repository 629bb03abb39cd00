"""All but One (Hong, Lee, Woo; AAAI 2024): surgical concept erasing with model preservation.

Algorithm 1 of the paper with the explicit erasing signal (Eq. 12-13, "Explicit Erasing Signal"):

* z_t is sampled with the frozen teacher theta* (Algorithm 1, lines 3-10):
  eps_hat = eps*(z, ∅) + gamma1 (eps*(z, c) - eps*(z, ∅)) + delta(C_I, z, theta*), DDIM (eta = 0), T steps,
  stopped at t ~ U{1..T}.
* concept loss (Algorithm 1, line 11):
  || gamma2 (eps_theta(z_t, c) - sg[eps_theta(z_t, ∅)]) - (gamma1 (eps*(z_t, c) - eps*(z_t, ∅)) + delta) ||^2
* penalty (Eq. 12, Algorithm 1, line 12): lambda || eps_theta(z_t, ∅) - eps*(z_t, ∅) ||^2.
* delta = sum over instruction concepts c'' of g_c'' * beta * (eps*(z, c'') - eps*(z, ∅)), where beta keeps
  the elements at or above the kappa-th percentile of |eps*(z, c'') - eps*(z, ∅)| per sample and channel over
  the spatial positions (SEGA's implementation: diffusers' pipeline_semantic_stable_diffusion.py,
  ``torch.quantile(abs(guidance).flatten(start_dim=2), threshold, dim=2)``), and is zero outside the concept's
  step window and before the warm-up.

With ``method.signal=implicit`` (paper, "Implicit Erasing Signal"; Supplementary "Implicit guidance with
Prompt-to-Prompt") delta is instead gamma1 (eps*_sup(z, c) - eps*(z, c)), where eps*_sup is the teacher with the
cross-attention probabilities of the target's words re-weighted as in Prompt-to-Prompt (Hertz et al. 2022), inside
``method.implicit.window`` and after the warm-up: the guidance target becomes gamma1 (eps*_sup(z, c) - eps*(z, ∅))
there, and z_t is sampled with the same delta. The instruction concepts are not used. Mechanism, defaults and
sources: erasure/allbutone/implicit.py.

Sign of delta: Algorithm 1 adds delta to the guidance target (line 11) and to the sampling epsilon (line 7);
Eq. 13 prints "- gamma1(...) + delta" inside the norm, i.e. the opposite sign on delta. We follow Algorithm 1,
which is consistent with how z_t is sampled.

Norms: ||.||^2 is implemented as the mean of squared elements (as torch's MSELoss and every baseline's code do);
this only rescales the loss, i.e. the learning rate, identically for both terms.
"""
from __future__ import annotations

import dataclasses
import logging
import math

import torch
import torch.nn.functional as F

from ..adversarial import random_prefix, soft_prompt, soft_prompt_attack
from ..errors import UserError
from ..method import BaseMethodConfig, ErasureMethod
from ..registry import register
from ..sampling import eps_all, sample_to_step
from ..teacher import student_eps
from . import implicit as p2p

log = logging.getLogger(__name__)

SIGNALS = ("explicit", "implicit", "none")


@dataclasses.dataclass
class Instruction:
    """One instruction concept of ``concept.instructions`` (paper, Training Setup and Supplementary Eq. 23)."""

    text: str = "???"  # the concept's text, e.g. "sexual", "bikini"
    guidance: float = "???"  # type: ignore[assignment]  # g: negative steers away, positive towards
    window: list[float] = dataclasses.field(default_factory=lambda: [0.0, 1.0])  # [low, high], fractions of T
    kappa: float = "???"  # type: ignore[assignment]  # percentile threshold of beta (SEGA), in (0, 1]


@dataclasses.dataclass
class InstructionConcepts:
    instructions: list[Instruction] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class OursConfig(BaseMethodConfig):
    name: str = "ours"
    iterations: int = 200  # paper, Training Setup: "200 steps of update"
    lr: float = 1e-5  # paper, Training Setup: AdamW, learning rate 1e-5
    adam_eps: float = 1e-8  # paper, Training Setup: adam epsilon 1.0e-8
    weight_decay: float = 0.01  # not stated in the paper: torch.optim.AdamW's default
    grad_clip: float | None = None  # the paper clips nothing
    gamma1: float = 7.5  # paper, Training Setup: gamma1 = 7.5 (guidance of the teacher's target and sampler)
    gamma2: float = 7.5  # paper, Training Setup: gamma2 = 7.5 (scale of the student's guidance term)
    T: int = 35  # paper, Training Setup: DDIM with T = 35
    # Warm-up and instruction windows count denoising steps taken from pure noise x_T (0 at x_T), as SEGA's
    # warm-up does: only then do the paper's t_warmup = 5 (t >= t_warmup) and window floor(0.35T) <= t <= T read
    # coherently ('high' is the noisier bound). The training step t ~ U{1..T} of Algorithm 1 is converted to the
    # same count, T - t, before the window and warm-up are applied.
    warmup: int = 5  # paper, Training Setup: t_warmup = 5
    lam: float = 5.0  # paper, Training Setup: lambda = 5 (set with the top-level shortcut `lambda=`)
    signal: str = "explicit"  # the erasing signal delta: explicit (instruction concepts), implicit (P2P) or none
    implicit: p2p.ImplicitConfig = dataclasses.field(default_factory=p2p.ImplicitConfig)  # signal=implicit only
    # Robust All-but-One (an extension of ours, not in the paper; docs/METHODS.md "Robust All-but-One"): every
    # adv_every iterations from adv_warmup on, the attack core (erasure.adversarial.soft_prompt_attack, AdvUnlearn's
    # inner attack) searches adv_tokens prefix word embeddings that make the current student reproduce the teacher's
    # concept at that iteration's z_t; the concept term of Eq. 12 is then also applied to that adversarial prompt,
    # weighted adv_weight. The attack's settings default to AdvUnlearn's (OPTML-Group/AdvUnlearn @ 9d23124,
    # train-scripts/AdvUnlearn.py l.254-261: adv_prompt_num 1, attack_step 30, attack_lr 1e-3, pgd, warm-up at 20%
    # of the iterations: 200 of 1000 there, 40 of 200 here).
    adversarial: bool = False
    adv_every: int = 10  # iterations between attacks (the prompt is kept in between, and warm-starts the next attack)
    adv_steps: int = 30  # Adam steps per attack (AdvUnlearn --attack_step 30)
    adv_lr: float = 1e-3  # the attack's Adam learning rate (AdvUnlearn --attack_lr 1e-3)
    adv_tokens: int = 1  # adversarial prefix tokens (AdvUnlearn --adv_prompt_num 1)
    adv_warmup: int = 40  # no attack before this iteration (AdvUnlearn --warmup_iter 200 of 1000 iterations)
    adv_weight: float = 1.0  # weight of the adversarial prompt's concept term beside the plain target's


def concept_and_penalty(eps_c: torch.Tensor, eps_u: torch.Tensor, guidance_target: torch.Tensor,
                        teacher_u: torch.Tensor, gamma2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The two loss terms of Eq. 12 / Algorithm 1 lines 11-12.

    ``eps_c``/``eps_u``: student epsilon at z_t for the target prompt / the empty prompt (with gradient).
    ``guidance_target``: gamma1 (eps*(z_t, c) - eps*(z_t, ∅)) + delta. ``teacher_u``: eps*(z_t, ∅).
    The stop-gradient on the student's unconditional term keeps the concept loss from moving it;
    only the penalty does.
    """
    concept = F.mse_loss(gamma2 * (eps_c - eps_u.detach()), guidance_target)
    penalty = F.mse_loss(eps_u, teacher_u)
    return concept, penalty


def percentile_mask(d: torch.Tensor, kappa: float) -> torch.Tensor:
    """beta: True where |d| is at or above its kappa-quantile, per sample and channel over space (SEGA)."""
    mag = d.abs()
    threshold = torch.quantile(mag.flatten(start_dim=2).float(), kappa, dim=2)
    return mag >= threshold[:, :, None, None].to(mag.dtype)


def instruction_delta(steps_taken: int, eps_u: torch.Tensor, eps_instr: list[torch.Tensor],
                      instructions: list[dict], warmup: int) -> torch.Tensor | None:
    """delta(C_I, z, theta*) at a point ``steps_taken`` denoising steps from x_T.

    ``instructions``: dicts with ``guidance`` g, ``kappa`` and the step window ``lo``..``hi`` (inclusive).
    Returns None where no instruction concept is active.
    """
    delta = None
    if steps_taken < warmup:
        return None
    for inst, eps_i in zip(instructions, eps_instr):
        if not inst["lo"] <= steps_taken <= inst["hi"]:
            continue
        d = eps_i - eps_u
        term = inst["guidance"] * d * percentile_mask(d, inst["kappa"])
        delta = term if delta is None else delta + term
    return delta


def resolve_window(window, T: int) -> tuple[int, int]:
    """A window given as fractions of T, floored (the paper writes floor(0.35 T) .. floor(T))."""
    lo, hi = (math.floor(float(f) * T) for f in window)
    return lo, hi


@register("ours")
class AllButOne(ErasureMethod):
    Config = OursConfig
    default_params = "to_out"  # paper, Supplementary "Parameter Selection"
    shortcuts = {"lambda": "lam"}  # `lambda=5` on the command line, as the paper names it

    @classmethod
    def validate(cls, cfg: OursConfig) -> None:
        super().validate(cfg)
        if cfg.lam < 0:
            raise UserError(f"lambda must be >= 0 (the paper's Eq. 10 requires lambda >= 0), got {cfg.lam}")
        if cfg.T < 2:
            raise UserError(f"method.T (DDIM steps) must be at least 2, got {cfg.T}")
        if cfg.signal not in SIGNALS:
            raise UserError(f"method.signal must be 'explicit', 'implicit' or 'none', got '{cfg.signal}'")
        p2p.validate_implicit(cfg.implicit)
        for key in ("adv_every", "adv_steps", "adv_tokens"):
            if getattr(cfg, key) < 1:
                raise UserError(f"method.{key} must be at least 1, got {getattr(cfg, key)}")
        if cfg.adv_warmup < 0 or not (math.isfinite(cfg.adv_lr) and cfg.adv_lr > 0) or cfg.adv_weight < 0:
            raise UserError("method.adv_warmup and method.adv_weight must be 0 or more and method.adv_lr a positive "
                            f"number, got {cfg.adv_warmup}, {cfg.adv_weight} and {cfg.adv_lr}")

    @classmethod
    def validate_concept(cls, concept) -> None:
        """The concept's instruction concepts C_I (``concept.instructions``), each {text, guidance, window, kappa}."""
        from ..config import check

        nodes = concept.get("instructions") or []
        for inst in check("concept", {"instructions": nodes}, InstructionConcepts, extra_ok=False).instructions:
            if not 0 < float(inst.kappa) <= 1:
                raise UserError(f"instruction concept '{inst.text}' has kappa {inst.kappa}: kappa must be in (0, 1]")
            window = [float(x) for x in inst.window]  # [low, high]: two numbers (checked before they are read)
            if len(window) != 2 or not 0 <= window[0] <= window[1] <= 1:
                raise UserError(f"instruction concept '{inst.text}' has window {list(inst.window)}: use fractions of T "
                                "with 0 <= low <= high <= 1")

    def __init__(self, cfg: OursConfig, ctx):
        super().__init__(cfg, ctx)
        self.adv_step = 0  # iterations seen by adversarial_prompt (robust All-but-One)
        self.adv_prompts: dict = {}  # target index -> its current adversarial prompt (erasure.adversarial.SoftPrompt)
        concept = ctx.concept
        targets = list(concept.targets)
        self.instructions = []
        if cfg.signal == "explicit":
            for inst in concept.get("instructions") or []:
                lo, hi = resolve_window(inst.window, cfg.T)
                self.instructions.append(dict(text=str(inst.text), guidance=float(inst.guidance),
                                              kappa=float(inst.kappa), lo=lo, hi=hi))
        self.emb_uncond = ctx.embed([""])
        self.emb_targets = ctx.embed(targets)
        self.emb_instr = ctx.embed([i["text"] for i in self.instructions]) if self.instructions else None
        self.targets = targets
        self.implicit = cfg.signal == "implicit"
        if self.implicit:
            self._setup_implicit(cfg.implicit, ctx)

    def _setup_implicit(self, icfg: p2p.ImplicitConfig, ctx) -> None:
        """P2P re-weighting processors on the teacher's (shared) UNet, switched off, and each target's equalizer."""
        self.implicit_window = resolve_window(icfg.window, self.cfg.T)
        tok = ctx.models.tokenizer
        weights = []
        for text in self.targets:
            words = [str(w) for w in icfg.words] if icfg.words is not None else [text]
            positions = p2p.token_positions(tok, text, words)
            if not positions:
                raise UserError(f"method.implicit.words {words} do not occur in the target prompt '{text}' "
                                f"(as CLIP tokens): name words of every target")
            ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
            log.info("implicit signal: target '%s' re-weights tokens %s (%s) by %g", text, positions,
                     " ".join(tok.convert_ids_to_tokens([ids[i] for i in positions])), icfg.reweight)
            weights.append(p2p.token_weights(positions, len(ids), icfg.reweight))
        self.token_weights = torch.stack(weights).to(ctx.device)  # (targets, tokens)
        self.reweighting = p2p.TokenReweighting()
        layers = p2p.install(ctx.unet, icfg.layers, self.reweighting)
        log.info("implicit signal: P2P re-weighting on %d cross-attention layers, steps %d..%d from x_T (warm-up %d)",
                 len(layers), *self.implicit_window, self.cfg.warmup)
        lo, hi = self.implicit_window
        if max(lo, self.cfg.warmup) > min(hi, self.cfg.T - 1):
            log.warning("implicit signal: no step is both in method.implicit.window (steps %d..%d) and after the "
                        "warm-up (%d) with T = %d, so delta is always zero", lo, hi, self.cfg.warmup, self.cfg.T)
        self.reweighted_teacher = p2p.ReweightedEps(lambda: self.ctx.teacher, self.reweighting)
        if ctx.concept.get("instructions"):  # (self.instructions is filled for the explicit signal only)
            log.info("implicit signal: the concept's instruction concepts are not used")

    supports_teacher_bank = True  # Algorithm 1, lines 3-10 use theta* only

    def delta(self, steps_taken: int, eps: list[torch.Tensor]) -> torch.Tensor | None:
        """delta at ``steps_taken`` from the epsilons of the conditions (∅, c, then the extra ones, None if idle)."""
        if self.implicit:  # condition 2: the target prompt with its words' attention re-weighted
            if not self.active(steps_taken) or eps[2] is None:
                return None
            return self.cfg.gamma1 * (eps[2] - eps[1])
        return instruction_delta(steps_taken, eps[0], eps[2:], self.instructions, self.cfg.warmup)

    def active(self, steps_taken: int) -> list[int]:
        """Condition indices (2 + instruction index; 2 for the re-weighted target) whose epsilon delta reads at
        ``steps_taken``: only these are evaluated (outside a window, or before the warm-up, they add nothing)."""
        if steps_taken < self.cfg.warmup:
            return []
        if self.implicit:
            lo, hi = self.implicit_window
            return [2] if lo <= steps_taken <= hi else []
        return [2 + k for k, inst in enumerate(self.instructions) if inst["lo"] <= steps_taken <= inst["hi"]]

    def conditions(self, target_index: torch.Tensor) -> tuple[list[torch.Tensor], object]:
        """The sampler's conditions [∅, c, extra...] for samples with these targets, and the epsilon function.

        Explicit: the instruction concepts follow, through the plain teacher. Implicit: c again, carrying its
        P2P equalizer, through the teacher that switches the re-weighting on for those rows (erasure/allbutone/implicit.py).
        """
        conds = [self.emb_uncond, self.emb_targets[target_index]]
        if not self.implicit:
            if self.emb_instr is not None:
                conds += list(self.emb_instr.split(1))
            return conds, self.ctx.teacher
        ones = torch.ones(1, self.token_weights.shape[1], device=self.token_weights.device)
        conds = [p2p.with_weights(conds[0], ones), p2p.with_weights(conds[1], ones),
                 p2p.with_weights(conds[1], self.token_weights[target_index])]
        return conds, self.reweighted_teacher

    def draw(self, step: int) -> dict:
        """Algorithm 1, line 3: t ~ U{1..T}, c_s ~ C_s, x_T ~ N(0, I) (in this order, from the run's generator)."""
        ctx = self.ctx
        t = ctx.randint(1, self.cfg.T + 1)
        target_index = ctx.randint(0, len(self.targets))
        x_T = ctx.randn(1, *ctx.models.latent_shape)
        return dict(t=t, target_index=target_index, x_T=x_T)

    @torch.no_grad()
    def teacher_work(self, draws: list[dict]) -> list[dict]:
        """Algorithm 1, lines 4-10 and the teacher half of line 11, for several iterations in one batch."""
        ctx, cfg = self.ctx, self.cfg
        x_T = torch.cat([d["x_T"] for d in draws])
        steps = [cfg.T - d["t"] for d in draws]
        index = torch.tensor([d["target_index"] for d in draws], device=ctx.device)
        conds, teacher = self.conditions(index)
        z_t, timesteps = sample_to_step(teacher, ctx.models.scheduler, x_T, conds, steps, cfg.T, cfg.gamma1,
                                        extra=self.delta, needed=self.active)
        eps = eps_all(teacher, z_t, timesteps, conds[:2])
        guidance_target = cfg.gamma1 * (eps[1] - eps[0])
        # the extra conditions only for the (sample, condition) pairs whose window holds the sample's step: one call
        pairs = [(i, k) for i in range(len(draws)) for k in self.active(steps[i])]
        instr_eps: dict[tuple[int, int], torch.Tensor] = {}
        if pairs:
            rows = torch.tensor([i for i, _ in pairs], device=z_t.device)
            out = teacher(z_t[rows], timesteps.to(z_t.device)[rows],
                          torch.cat([conds[k] if conds[k].shape[0] == 1 else conds[k][i: i + 1] for i, k in pairs]))
            instr_eps = {pair: out[j: j + 1] for j, pair in enumerate(pairs)}
        work = []
        for i, d in enumerate(draws):
            target = guidance_target[i: i + 1]
            row = [eps[0][i: i + 1], eps[1][i: i + 1]] + [instr_eps.get((i, k)) for k in range(2, len(conds))]
            delta = self.delta(steps[i], row)  # the window depends on each sample's step
            if delta is not None:
                target = target + delta
            work.append(dict(z_t=z_t[i: i + 1], timestep=timesteps[i], target_index=d["target_index"],
                             guidance_target=target, teacher_u=eps[0][i: i + 1]))
        return work

    def student_loss(self, work: dict) -> dict[str, torch.Tensor]:
        """Algorithm 1, lines 11-12: one student forward on [z_t; z_t] x [c; ∅] (with ``adversarial``: and on the
        target's current adversarial prompt, whose concept term joins the loss)."""
        i = work["target_index"]
        emb_c = self.emb_targets[i: i + 1]
        conds = [emb_c, self.emb_uncond]
        adv = self.adversarial_prompt(work) if self.cfg.adversarial else None
        if adv is not None:
            conds.append(adv)
        eps = eps_all(lambda x, t, e: student_eps(self.ctx.unet, x, t, e), work["z_t"], work["timestep"], conds)
        concept, penalty = concept_and_penalty(eps[0], eps[1], work["guidance_target"], work["teacher_u"], self.cfg.gamma2)
        terms = {"concept": concept, "penalty": penalty}
        loss = concept + self.cfg.lam * penalty
        if adv is not None:  # the same concept term for the adversarial prompt (its eps_u: the plain one's)
            concept_adv, _ = concept_and_penalty(eps[2], eps[1], work["guidance_target"], work["teacher_u"],
                                                 self.cfg.gamma2)
            terms["concept_adv"] = concept_adv
            loss = loss + self.cfg.adv_weight * concept_adv
        return {"loss": loss, **terms}

    def adversarial_prompt(self, work: dict) -> torch.Tensor | None:
        """The encoding (1 x 77 x D, base text encoder) of the current adversarial prompt of the work's target, after
        attacking the student again if this iteration is due (``adv_every`` from ``adv_warmup``); None before the
        first attack. The attack: :func:`erasure.adversarial.soft_prompt_attack` on this iteration's z_t and
        timestep, loss MSE(eps_student(z_t, t, E(adv prompt)), eps*(z_t, t, c)), all trained weights frozen, warm-
        started from the target's previous adversarial embeddings (k random vocabulary words the first time)."""
        cfg, ctx = self.cfg, self.ctx
        self.adv_step += 1  # student_loss runs once per iteration, in order: this is the iteration number
        i = work["target_index"]
        if self.adv_step >= cfg.adv_warmup and (self.adv_step - cfg.adv_warmup) % cfg.adv_every == 0:
            z_t, t = work["z_t"], work["timestep"]
            emb_c = self.emb_targets[i: i + 1]
            with torch.no_grad():
                target = ctx.teacher(z_t, t, emb_c)

            def loss_fn(hidden: torch.Tensor) -> torch.Tensor:
                return F.mse_loss(student_eps(ctx.unet, z_t, t, hidden), target)

            init = self.adv_prompts.get(i)
            init = init.adv if init is not None else random_prefix(ctx.models.text_encoder, cfg.adv_tokens, ctx.generator)
            self.adv_prompts[i] = soft_prompt_attack(ctx.models.text_encoder, ctx.models.tokenizer, self.targets[i],
                                                     init, cfg.adv_steps, cfg.adv_lr, loss_fn,
                                                     frozen=ctx.trainable.values())
        prompt = self.adv_prompts.get(i)
        if prompt is None:
            return None
        with torch.no_grad():  # ours trains UNet weights only: the encoding is a constant for the student
            return prompt.encode(ctx.models.text_encoder)

    def state_dict(self) -> dict:
        if not self.cfg.adversarial:
            return {}
        return {"adv_step": self.adv_step, **{f"adv_{i}": p.adv for i, p in self.adv_prompts.items()}}

    def load_state_dict(self, state: dict) -> None:
        if not self.cfg.adversarial:
            return
        self.adv_step = int(state.get("adv_step", 0))
        for key, adv in state.items():
            if key.startswith("adv_") and key != "adv_step":
                i = int(key[4:])
                self.adv_prompts[i] = soft_prompt(self.ctx.models.text_encoder, self.ctx.models.tokenizer,
                                                  self.targets[i], adv.to(self.ctx.device))
