"""RECE, Reliable and Efficient Concept Erasure (Gong, Chen, Wei, Chen, Jiang; ECCV 2024): a UCE edit, then a few epochs
that each derive, in closed form, an embedding which the edited model still maps to the erased concept's outputs, and
erase that embedding too with UCE's closed form. Official code: CharlesGong12/RECE at commit
403a67fd86dce6c124b88798340e001e625b28c9, cited below as "train.py l.N" (the nudity/I2P trainer), "emb.py l.N"
(``utils/embedding_calculation/close_form_emb.py``), "adv.py l.N" (``erase_methods/uce.py``: the re-erasure,
``edit_model_adversarial``), "train_uce.py l.N" (``erase_methods/train_uce.py``: the UCE stage), "nudity.sh l.N"
(``scripts/nudity.sh``) and "README l.N".

The method (all edits on every attn2 ``to_k`` and ``to_v``, emb.py l.42-50 and adv.py l.26-31):

1. UCE stage. RECE starts from a UCE checkpoint (train.py l.49, l.209-210; nudity.sh l.7 names
   ``erased-nudity-towards_uncond-preserve_false-sd_1_4-method_replace-1-1.0.pt``). That file name is the pattern of
   train_uce.py l.360 (``-{erase_scale}-{preserve_scale}``), whose edit is UCE's older ``train_erase.py`` one:
   every target position from the last subject token on (train_uce.py l.110-117), the empty prompt always preserved on
   all positions (l.286, l.146-167), preservation scale max(0.1, 1/number preserved) = 1.0 (l.291-294), λ 0.5
   (l.186), erase scale 1 (l.187), guide " " (l.254-255). Those are the ``uce_*`` defaults here; the edit itself is
   :func:`baselines.uce.uce_weight` on :func:`baselines.uce.concept_rows` (``uce_tokens=trailing``).

2. Each epoch (train.py l.228-260), with W_l the current weights of projection l and W*_l the base model's:

   - the adversarial embedding of each target, one row per token position of its whole 77-token encoder output c
     (train.py l.245; emb.py l.188-196, the last-token slice l.197-200 is commented out), from all projections at once:

         a = argmin_a Σ_l ‖W_l a − W*_l c‖² + λ_r ‖a‖²  =  (λ_r I + Σ_l W_lᵀ W_l)⁻¹ (Σ_l W_lᵀ W*_l) c

     (``regularizer=zero``: ``close_form_emb_regzero``, emb.py l.202-209; train.py l.255-256), :func:`adversarial_embedding`;
   - the re-erasure of every projection from the *current* weights (adv.py l.53-54: λ W_l, λ I), each adversarial
     position paired with the same position of the guide's encoder output, the guide's value taken under the current
     weights (adv.py l.56-82, technique 'replace'), and the empty prompt preserved on all positions, once per target
     (train.py l.154-155; adv.py l.84-107):

         W_l ← (λ W_l + s_e Σ_k W_l g_k a_kᵀ + s_p Σ_j W_l p_j p_jᵀ)(λ I + s_e Σ_k a_k a_kᵀ + s_p Σ_j p_j p_jᵀ)⁻¹,

     i.e. :func:`baselines.uce.uce_weight` with W_old = the current W_l: λ = 0.1, s_e = 1, s_p = 0.1 (train.py l.50-53,
     nudity.sh l.8-9; README l.50: "λ1 = 0.1 and λ2 = 0.1"). Every target's adversarial embedding comes from the same
     weights; one edit takes them all (train.py l.233-260).

The official code's other regularisers are configurable (:func:`regulariser_terms`): ``standard``
(``close_form_emb`` with an old target concept, emb.py l.99-117: λ_r ‖a − b‖², b the anchor prompt's encoder output;
we take each target's guide, as the commented command nudity.sh l.10 passes ``--old_target_concept ' '``) and
``surrogate`` (emb.py l.78-98, ``reg_item`` 1st: λ_r Σ_l ‖W_l a − W_l c‖²; 2nd: λ_r ‖a − c‖²; both: the two).

Choices where the sources leave room (docs/METHODS.md, "RECE"):

- *paper vs code*: the paper's text was not available to this implementation; the README (l.50-56) gives the settings
  by the paper's names (λ1, λ2 of its Eq. 3, the regularisation coefficient λ, epochs), which agree with nudity.sh.
  We follow the code; the regulariser, the epochs and every coefficient are configurable.
- *epoch selection*: train.py generates its validation prompts after every epoch and keeps the epoch with the lowest
  detected rate (l.262-275), so its released model may be an earlier epoch. We keep the last epoch (``epochs`` picks
  how many); choosing by an evaluation set is left to the evaluation.
- *preserved prompts given*: with ``--preserve_concepts`` train.py draws len(targets) characters of the unsplit
  argument string (l.158: ``random.sample`` on a str, a bug); when the concept yaml lists ``uce.preserve`` we preserve
  every listed prompt (all positions) in the re-erasure instead of the empty prompt, and, as train_uce.py l.286 does,
  the empty prompt plus those prompts in the UCE stage.
- *timing*: train.py times only its epochs (l.226, l.281-283; the UCE checkpoint is made beforehand); our
  ``train_time_s`` is the whole edit, UCE stage included. The log line of each epoch gives its own time.

Numerics: the official code works in float32 with ``torch.inverse``; we solve the same systems in float64 and keep the
weights in float64 between epochs, which only changes rounding.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import torch

from baselines.uce import UCE, concept_prompts, concept_rows, encode, require_attn2_kv, uce_weight
from erasure.errors import UserError
from erasure.method import ClosedFormConfig, ClosedFormMethod
from erasure.registry import register

log = logging.getLogger(__name__)

REGULARIZERS = ("zero", "standard", "surrogate")
REG_ITEMS = ("1st", "2nd", "both")


@dataclasses.dataclass
class RECEConfig(ClosedFormConfig):
    name: str = "rece"
    iterations: int = 1  # UCE stage and every epoch make one closed-form step (ClosedFormConfig)
    epochs: int = 3  # train.py l.43: --epochs default 3; nudity.sh l.6: 3; README l.52: nudity 3, unsafe 2 (others 1)
    # how the adversarial embedding is regularised: zero = λ_r‖a‖² (train.py l.56 --emb_computing, choices
    # close_standardreg / close_surrogatereg / close_regzero, default close_regzero; nudity.sh l.4: close_regzero)
    regularizer: str = "zero"
    reg_item: str = "1st"  # surrogate only: train.py l.57: --reg_item default '1st' (emb.py l.80-96)
    regular_scale: float = 0.1  # λ_r; train.py l.58: --regular_scale default 1e-1; nudity.sh l.5: 0.1; README l.52
    lamb: float = 0.1  # λ of the re-erasure; train.py l.53: --lamb default 0.1; nudity.sh l.9: 0.1 (README l.50: λ2)
    erase_scale: float = 1.0  # s_e of the re-erasure; train.py l.52: --erase_scale default 1
    preserve_scale: float = 0.1  # s_p of the re-erasure; train.py l.50: --preserve_scale default 0.1; nudity.sh l.8 (README l.50: λ1)
    # The UCE stage (the checkpoint RECE starts from, nudity.sh l.7): train_uce.py's edit
    uce_lamb: float = 0.5  # train_uce.py l.186: --lamb default 0.5
    uce_erase_scale: float = 1.0  # train_uce.py l.187: --erase_scale default 1
    # null = max(0.1, 1 / number of preserved prompts), rounded to 3 decimals (train_uce.py l.184 default None, l.291-294)
    uce_preserve_scale: float | None = None
    uce_tokens: str = "trailing"  # train_uce.py l.110-117: the target's positions from its last subject token on (baselines/uce.py)
    uce_preserve_empty: bool = True  # train_uce.py l.286: retain_texts = [''] + preserve_concepts


def regulariser_terms(regularizer: str, reg_item: str, scale: float) -> tuple[float, str | None, float]:
    """The official regularisers as (ridge, anchor, surrogate) of :func:`adversarial_embedding`; ``anchor`` names
    the rows b of ridge·‖a − b‖²: None (zero), "guide" or "concept".

    zero (emb.py l.202-209): λ_r‖a‖². standard (emb.py l.101-117): λ_r‖a − b‖², b the old target concept (here the
    guide). surrogate (emb.py l.80-97): 1st λ_r Σ_l‖W_l a − W_l c‖²; 2nd λ_r‖a − c‖²; both the sum of the two.
    """
    if regularizer == "zero":
        return scale, None, 0.0
    if regularizer == "standard":
        return scale, "guide", 0.0
    return {"1st": (0.0, None, scale), "2nd": (scale, "concept", 0.0), "both": (scale, "concept", scale)}[reg_item]


def adversarial_embedding(edited: list[torch.Tensor], base: list[torch.Tensor], concept: torch.Tensor,
                          ridge: float = 0.0, anchor: torch.Tensor | None = None, surrogate: float = 0.0) -> torch.Tensor:
    """The embedding the edited projections map closest to the base projections' outputs of ``concept``, in float64.

    ``edited``, ``base``: matching lists of (out_l, d) weights W_l, W*_l (every projection shares the input d);
    ``concept``: (n, d) rows c; ``anchor``: (n, d) rows b or None (zeros). Row by row, returns the minimiser of

        Σ_l ‖W_l a − W*_l c‖² + ridge ‖a − b‖² + surrogate Σ_l ‖W_l a − W_l c‖²,

    from its normal equations (ridge I + (1 + surrogate) G) a = H c + surrogate G c + ridge b, G = Σ_l W_lᵀ W_l,
    H = Σ_l W_lᵀ W*_l (emb.py l.205-209: mat1 = λ I + G, mat2 = H, a = c (mat1⁻¹ mat2)ᵀ).
    """
    c = concept.double()
    d = c.shape[1]
    gram = c.new_zeros(d, d)
    cross = c.new_zeros(d, d)
    for w, w_star in zip(edited, base, strict=True):
        w = w.double().to(c.device)
        gram += w.T @ w
        cross += w.T @ w_star.double().to(c.device)
    lhs = ridge * torch.eye(d, dtype=c.dtype, device=c.device) + (1.0 + surrogate) * gram
    rhs = (cross + surrogate * gram) @ c.T
    if anchor is not None and ridge:
        rhs = rhs + ridge * anchor.double().to(c.device).T
    try:
        return torch.linalg.solve(lhs, rhs).T
    except torch.linalg.LinAlgError:
        raise UserError("RECE's adversarial-embedding system is singular: raise method.regular_scale (> 0) or use "
                        "method.regularizer=zero") from None


def output_gap(weights: list[torch.Tensor], rows: torch.Tensor, targets: list[torch.Tensor]) -> float:
    """Σ_l ‖rows W_lᵀ − targets_l‖² (Frobenius), summed over projections: how far the projections send ``rows`` from
    the given outputs."""
    return float(sum((rows @ w.double().T - t).pow(2).sum() for w, t in zip(weights, targets, strict=True)))


@register("rece")
class RECE(ClosedFormMethod):
    Config = RECEConfig
    default_params = "xattn_kv"  # emb.py l.42-50, adv.py l.26-31: to_v and to_k of every attn2
    # the erasure curve's knobs (erasure.method.ClosedFormMethod): both official --erase_scale values, the UCE stage's
    # (train_uce.py l.187) and the re-erasure's (train.py l.52), scaled together; both -> 0 give the base weights back
    strength_keys = ("uce_erase_scale", "erase_scale")

    @classmethod
    def validate(cls, cfg: RECEConfig) -> None:
        super().validate(cfg)
        if cfg.epochs < 0:
            raise UserError(f"method.epochs must be >= 0 (0 = the UCE stage alone), got {cfg.epochs}")
        if cfg.regularizer not in REGULARIZERS:
            raise UserError(f"method.regularizer must be one of {', '.join(REGULARIZERS)}, got '{cfg.regularizer}'")
        if cfg.reg_item not in REG_ITEMS:
            raise UserError(f"method.reg_item must be one of {', '.join(REG_ITEMS)}, got '{cfg.reg_item}'")
        if not cfg.regular_scale >= 0:
            raise UserError(f"method.regular_scale must be >= 0, got {cfg.regular_scale}")
        for key in ("lamb", "uce_lamb"):
            if not getattr(cfg, key) > 0:
                raise UserError(f"method.{key} must be > 0 (λI keeps the edit's linear system invertible), got {getattr(cfg, key)}")
        for key in ("erase_scale", "uce_erase_scale"):
            if not getattr(cfg, key) > 0:
                raise UserError(f"method.{key} must be > 0, got {getattr(cfg, key)}")
        for key in ("preserve_scale", "uce_preserve_scale"):
            value = getattr(cfg, key)
            if value is not None and not value >= 0:
                raise UserError(f"method.{key} must be >= 0, got {value}")
        if cfg.uce_tokens not in ("last", "trailing"):
            raise UserError(f"method.uce_tokens must be last or trailing, got '{cfg.uce_tokens}'")

    @classmethod
    def validate_concept(cls, concept) -> None:
        """RECE reads the concept's ``uce:`` section (guides, preserve), checked as UCE checks it."""
        UCE.validate_concept(concept)

    def __init__(self, cfg: RECEConfig, ctx):
        super().__init__(cfg, ctx)
        require_attn2_kv(ctx, "RECE")
        self.targets, self.guides, self.preserve = concept_prompts(ctx.concept)
        # the UCE stage's preserved prompts (train_uce.py l.286) and the re-erasure's (train.py l.154-158; module docstring)
        self.uce_preserve = ([""] if cfg.uce_preserve_empty else []) + self.preserve
        self.rece_preserve = self.preserve or [""] * len(self.targets)
        # W* in float32, kept apart from the live parameters: the edit always starts from the base weights
        self.base = {name: p.detach().float().clone() for name, p in ctx.trainable.items()}
        self.history: list[dict] = []  # per epoch: what the adversarial embedding does before and after its erasure

    def _uce_preserve_scale(self) -> float:
        if self.cfg.uce_preserve_scale is not None:
            return float(self.cfg.uce_preserve_scale)
        return round(max(0.1, 1.0 / max(1, len(self.uce_preserve))), 3)  # train_uce.py l.291-294

    def closed_form(self) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        texts = list(dict.fromkeys(self.targets + self.guides + self.uce_preserve + self.rece_preserve))
        emb, index = encode(self.ctx.models, texts)
        emb = {t: e.double() for t, e in zip(texts, emb)}
        index = dict(zip(texts, index))
        names = list(self.base)
        base = [self.base[n].double() for n in names]

        # 1. the UCE stage, from the base weights
        erase, guide, preserve = concept_rows(emb, index, self.targets, self.guides, self.uce_preserve, cfg.uce_tokens)
        scale = self._uce_preserve_scale()
        weights = [uce_weight(w, erase, guide, preserve, cfg.uce_lamb, cfg.uce_erase_scale, scale) for w in base]

        # 2. the epochs: every position of each target's and guide's encoder output (train.py l.245-247)
        concept = torch.cat([emb[t] for t in self.targets])
        guide = torch.cat([emb[g] for g in self.guides])
        preserve = torch.cat([emb[p] for p in self.rece_preserve])
        ridge, anchor_kind, surrogate = regulariser_terms(cfg.regularizer, cfg.reg_item, cfg.regular_scale)
        anchor = {None: None, "guide": guide, "concept": concept}[anchor_kind]
        concept_out = [concept @ w.T for w in base]  # W*_l c: what the base model makes of the concept
        norm = float(sum(t.pow(2).sum() for t in concept_out))
        self.history = []
        for epoch in range(cfg.epochs):
            start = time.perf_counter()
            adv = adversarial_embedding(weights, base, concept, ridge, anchor, surrogate)
            guide_out = [guide @ w.T for w in weights]  # the re-erasure's targets: the guide under the current weights
            new = [uce_weight(w, adv, guide, preserve, cfg.lamb, cfg.erase_scale, cfg.preserve_scale) for w in weights]
            record = {
                "epoch": epoch + 1,
                # Σ_l ‖W_l a − W*_l c‖² / Σ_l ‖W*_l c‖²: how well a regenerates the concept, before and after
                "regenerate_before": output_gap(weights, adv, concept_out) / norm,
                "regenerate_after": output_gap(new, adv, concept_out) / norm,
                # Σ_l ‖W_l a − W_l g‖²: a's distance from the guide's outputs, before and after its erasure
                "guide_gap_before": output_gap(weights, adv, guide_out),
                "guide_gap_after": output_gap(new, adv, guide_out),
                "adv_norm": float(adv.norm(dim=1).mean()),
                "concept_norm": float(concept.norm(dim=1).mean()),
            }
            weights = new
            record["seconds"] = time.perf_counter() - start
            self.history.append(record)
            log.info("RECE epoch %d: adversarial embedding regenerates the concept's outputs to %.4f (relative squared "
                     "error) before its erasure, %.4f after; its distance to the guide's outputs %.4g -> %.4g (%.2f s)",
                     record["epoch"], record["regenerate_before"], record["regenerate_after"],
                     record["guide_gap_before"], record["guide_gap_after"], record["seconds"])
        return {n: w.to(self.base[n].dtype) for n, w in zip(names, weights)}
