"""Unified Concept Editing (Gandikota, Orgad, Belinkov, Materzyńska, Bau; WACV 2024): erasure as one closed-form edit
of the cross-attention key and value projections. Official code: rohitgandikota/unified-concept-editing,
``trainscripts/uce_sd_erase.py`` at commit 28c81ed5a3e41277c1a0dc55f738e7ab188e9718 (cited below as "sd_erase.py
l.N"); its predecessor ``train-scripts/train_erase.py`` at bd5fb515392e986758fa3197e382148227db8f25 ("train_erase.py
l.N") produced the paper's models.

The edit (sd_erase.py l.55-82; the paper's Eq. 7 plus the code's regulariser and scales). For each projection W of
every cross-attention layer (``attn2.to_k`` and ``attn2.to_v``: l.17-20), with W_old its base weights,

    W_new = (λ W_old + s_e Σ_i v*_i c_iᵀ + s_p Σ_j W_old c_j c_jᵀ) (λ I + s_e Σ_i c_i c_iᵀ + s_p Σ_j c_j c_jᵀ)⁻¹,
    v*_i = W_old g_i,

the minimiser of λ‖W − W_old‖² + s_e Σ_i ‖W c_i − v*_i‖² + s_p Σ_j ‖W c_j − W_old c_j‖² (Frobenius / Euclidean):
c_i is a target's text embedding, g_i its guide's (the empty prompt unless the concept says otherwise), c_j a
preserved concept's. Each concept is one vector: the text encoder's last hidden state at the prompt's last subject
token, index (number of attended tokens) − 2, i.e. the token before ``<|endoftext|>`` (l.29-42); for the empty
prompt that is ``<|startoftext|>``.

Where the two official scripts differ we follow ``uce_sd_erase.py`` (the repository's current script, the one its
README documents): one token per concept, no preserved concept unless given, preservation scale 1. The older
``train_erase.py`` keys each target on every position from its last subject token to the end of the padded sequence,
aligned with the guide's positions from its own last subject token (l.253-262), and each preserved concept on all 77
positions (l.297-303): ``method.tokens=trailing`` (:func:`concept_rows`). It also always preserves the empty prompt
(l.422: ``+concept.uce.preserve=['']``) and defaults the preservation scale to max(0.1, 1 / number of preserved
prompts) (l.427-428: ``method.preserve_scale``); its ``technique='tensor'`` variant (l.267-276) is not its default
('replace', l.324) and is not implemented. docs/METHODS.md lists the differences.

Numerics: the official script inverts the (d × d) matrix in float32 (l.82); we solve the same system in float64
(``torch.linalg.solve``), which only changes rounding.
"""
from __future__ import annotations

import dataclasses
import re

import torch

from erasure.config import concept_section
from erasure.errors import UserError
from erasure.method import ClosedFormConfig, ClosedFormMethod
from erasure.registry import register

# sd_erase.py l.18: the modules UCE edits ('attn2' in the name, ending in to_k or to_v); their weights only
# (SD's projections have no bias)
EDITED = re.compile(r"attn2\.to_[kv]\.weight$")


@dataclasses.dataclass
class UCEConfig(ClosedFormConfig):
    name: str = "uce"
    iterations: int = 1  # one closed-form edit (ClosedFormConfig)
    erase_scale: float = 1.0  # s_e; sd_erase.py l.105: --erase_scale default 1 (train_erase.py l.329: 1)
    preserve_scale: float = 1.0  # s_p; sd_erase.py l.106: --preserve_scale default 1 (train_erase.py l.427-428: max(0.1, 1/n))
    lamb: float = 0.5  # λ; sd_erase.py l.107: --lamb default 0.5 (train_erase.py l.442: lamb=0.5)
    # which token positions stand for a concept: last = its last subject token (sd_erase.py l.34-42); trailing = from
    # the last subject token to the end, aligned with the guide's, and all positions of a preserved concept
    # (train_erase.py l.253-262, l.297-303)
    tokens: str = "last"


@dataclasses.dataclass
class UCEConcept:
    """The concept's ``uce:`` section (read by :class:`UCE`, checked by its ``validate_concept``)."""

    # guide prompt of each target: one for all targets or one per target (sd_erase.py l.142-145); default the empty
    # prompt, sd_erase.py l.136-138 (concept_type 'object'; 'art' concepts default to "art", l.139-140)
    guides: list[str] = dataclasses.field(default_factory=lambda: [""])
    # concepts whose outputs are kept: sd_erase.py l.148-149, none unless --preserve_concepts is given
    preserve: list[str] = dataclasses.field(default_factory=list)


def subject_token_index(attention_mask: list[int]) -> int:
    """The last subject token of a padded prompt: (attended tokens) − 2, the position before ``<|endoftext|>``
    (sd_erase.py l.34-39); 0 (``<|startoftext|>``) for the empty prompt."""
    return int(sum(attention_mask)) - 2


@torch.no_grad()
def encode(models, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
    """The prompts' text-encoder outputs (len(texts), 77, d) and each one's last subject token (sd_erase.py l.29-39)."""
    tok = models.tokenizer
    masks = tok(list(texts), padding="max_length", max_length=tok.model_max_length, truncation=True).attention_mask
    return models.encode_text(list(texts)), [subject_token_index(m) for m in masks]


def subject_embeddings(models, texts: list[str]) -> torch.Tensor:
    """(len(texts), d): each prompt's text-encoder output at its last subject token (sd_erase.py l.42)."""
    emb, index = encode(models, texts)
    return emb[torch.arange(len(texts), device=emb.device), torch.tensor(index, device=emb.device)]


def concept_rows(emb: dict[str, torch.Tensor], index: dict[str, int], targets: list[str], guides: list[str],
                 preserve: list[str], tokens: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows c_i, g_i and c_j of the edit from each prompt's (L, d) encoder output ``emb`` and its last subject
    token ``index``: (erase, guide, preserve) for :func:`uce_weight`.

    ``last`` (sd_erase.py l.42): one row per prompt, at its last subject token. ``trailing`` (train_erase.py
    l.253-262): target positions k..L-1-(f-k) paired with the guide's positions m..L-1-(f-m), k and m their last subject
    tokens, f = max(k, m); a preserved prompt gives all L positions (l.297-303).
    """
    if tokens == "last":
        erase = torch.stack([emb[t][index[t]] for t in targets])
        guide = torch.stack([emb[g][index[g]] for g in guides])
        rows = [emb[p][index[p]][None] for p in preserve]
    else:
        erase_parts, guide_parts = [], []
        for t, g in zip(targets, guides):
            k, m = index[t], index[g]
            far, length = max(k, m), emb[t].shape[0]
            erase_parts.append(emb[t][k:length - (far - k)])
            guide_parts.append(emb[g][m:length - (far - m)])
        erase, guide = torch.cat(erase_parts), torch.cat(guide_parts)
        rows = [emb[p] for p in preserve]
    preserve_rows = torch.cat(rows) if rows else erase.new_zeros(0, erase.shape[1])
    return erase, guide, preserve_rows


def uce_weight(w_old: torch.Tensor, erase: torch.Tensor, guide: torch.Tensor, preserve: torch.Tensor, lamb: float,
               erase_scale: float, preserve_scale: float) -> torch.Tensor:
    """The closed-form edit of one projection (sd_erase.py l.56-82), in float64.

    ``w_old``: (out, d); ``erase``, ``guide``: (n_e, d), row i = c_i and g_i; ``preserve``: (n_p, d), rows c_j
    (n_p may be 0). Returns W_new = A B⁻¹ with A = λ W_old + s_e V*ᵀ E + s_p W_old Pᵀ P, B = λ I + s_e EᵀE + s_p PᵀP,
    V* = G W_oldᵀ (the guides' outputs under the base weights, l.45-53), in ``w_old``'s dtype.
    """
    w = w_old.double()
    e, g, p = erase.double(), guide.double(), preserve.double().reshape(-1, w.shape[1])
    v_star = g @ w.T  # (n_e, out): v*_i = W_old g_i
    a = lamb * w + erase_scale * v_star.T @ e + preserve_scale * (w @ p.T) @ p  # l.61, l.70, l.78
    b = lamb * torch.eye(w.shape[1], dtype=w.dtype, device=w.device) + erase_scale * e.T @ e \
        + preserve_scale * p.T @ p  # l.63, l.71, l.79
    return torch.linalg.solve(b, a.T).T.to(w_old.dtype)  # B is symmetric: A B⁻¹ = (B⁻¹ Aᵀ)ᵀ (l.82: mat1 @ inverse(mat2))


def require_attn2_kv(ctx, method: str) -> None:
    """Refuse a parameter subset with anything beyond the attn2 key/value weights (sd_erase.py l.17-20)."""
    other = [n for n in ctx.trainable if not EDITED.search(n)]
    if other:
        raise UserError(f"{method} edits only the cross-attention key/value weights (attn2.to_k/to_v), but "
                        f"params={ctx.cfg.params.name} also selects '{other[0]}': use params=xattn_kv")


def concept_prompts(concept) -> tuple[list[str], list[str], list[str]]:
    """The concept's targets, one guide per target (a single guide serves every target, sd_erase.py l.142-145) and
    its preserved prompts, from ``targets`` and the ``uce:`` section (checked by :meth:`UCE.validate_concept`)."""
    settings = UCE.concept_settings(concept)
    targets = [str(t) for t in concept.targets]
    guides = list(settings.guides) * len(targets) if len(settings.guides) == 1 else list(settings.guides)
    return targets, guides, list(settings.preserve)


@register("uce")
class UCE(ClosedFormMethod):
    Config = UCEConfig
    default_params = "xattn_kv"  # sd_erase.py l.17-20: to_k and to_v of every attn2
    # the erasure curve's knob (erasure.method.ClosedFormMethod): s_e, the official --erase_scale (sd_erase.py l.105);
    # s_e -> 0 gives W_old back (the erase rows vanish from both sides of the solve), s_e = 1 the default edit
    strength_keys = ("erase_scale",)

    @classmethod
    def validate(cls, cfg: UCEConfig) -> None:
        super().validate(cfg)
        if not cfg.lamb > 0:
            raise UserError(f"method.lamb must be > 0 (λI keeps UCE's linear system invertible), got {cfg.lamb}")
        if not cfg.erase_scale > 0:
            raise UserError(f"method.erase_scale must be > 0, got {cfg.erase_scale}")
        if not cfg.preserve_scale >= 0:
            raise UserError(f"method.preserve_scale must be >= 0, got {cfg.preserve_scale}")
        if cfg.tokens not in ("last", "trailing"):
            raise UserError(f"method.tokens must be last or trailing, got '{cfg.tokens}'")

    @staticmethod
    def concept_settings(concept) -> UCEConcept:
        return concept_section(concept, "uce", UCEConcept)

    @classmethod
    def validate_concept(cls, concept) -> None:
        """The concept's optional ``uce:`` section: ``guides`` (one, or one per target) and ``preserve``."""
        settings = cls.concept_settings(concept)
        targets = [str(t) for t in concept.get("targets") or []]
        if len(settings.guides) not in (1, len(targets)):
            raise UserError(f"concept.uce.guides has {len(settings.guides)} prompts for {len(targets)} targets: give one "
                            "guide for all targets or one per target")
        for text in settings.preserve:
            if text in targets:
                raise UserError(f"concept.uce.preserve lists the target '{text}': a concept cannot be erased and preserved at once")

    def __init__(self, cfg: UCEConfig, ctx):
        super().__init__(cfg, ctx)
        require_attn2_kv(ctx, "UCE")
        self.targets, self.guides, self.preserve = concept_prompts(ctx.concept)
        # W_old in float32, kept apart from the live parameters: the edit always starts from the base weights
        self.base = {name: p.detach().float().clone() for name, p in ctx.trainable.items()}

    def closed_form(self) -> dict[str, torch.Tensor]:
        texts = list(dict.fromkeys(self.targets + self.guides + self.preserve))
        emb, index = encode(self.ctx.models, texts)
        cfg = self.cfg
        erase, guide, preserve = concept_rows(dict(zip(texts, emb)), dict(zip(texts, index)), self.targets,
                                              self.guides, self.preserve, cfg.tokens)
        return {name: uce_weight(w, erase, guide, preserve, cfg.lamb, cfg.erase_scale, cfg.preserve_scale)
                for name, w in self.base.items()}
