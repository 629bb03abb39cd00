"""All-but-One's implicit erasing signal: Prompt-to-Prompt attention re-weighting on the frozen teacher.

Paper, "Implicit Erasing Signal" (and Supplementary, "Implicit guidance with Prompt-to-Prompt"): "we sample
from x_T to x_t with Prompt-to-Prompt and suppress the respective attention maps of our erasing tokens. Then,
we can obtain grad log P_phi(c'|x_t), which incorporates the 'overwriting' concept". With
eps*_sup(z, c) the teacher's epsilon for the target prompt c with those attention maps suppressed, ``method=ours
method.signal=implicit`` uses (erasure/allbutone/ours.py)

    delta(z) = gamma1 (eps*_sup(z, c) - eps*(z, c))     inside ``method.implicit.window`` and after the warm-up,

so that the guidance target gamma1 (eps*(z, c) - eps*(z, ∅)) + delta becomes gamma1 (eps*_sup(z, c) - eps*(z, ∅)),
and the same delta is added to the sampling epsilon (Algorithm 1, lines 7 and 11).

Attention re-weighting (Hertz et al. 2022, "Prompt-to-Prompt Image Editing with Cross Attention Control",
"Attention Re-weighting"; the authors' notebook ``prompt-to-prompt_stable.ipynb``, ``AttentionReweight`` and
``get_equalizer``): the cross-attention probabilities M = softmax(Q K^T / sqrt(d)) are multiplied, after the
softmax, by an "equalizer" that is 1 everywhere except at the chosen token positions j, where it is the re-weight
scale w: M'[:, :, j] = w M[:, :, j]. The notebook does not renormalise the rows of M', and neither do we: with
w = 0 the token's contribution is removed and the other tokens keep exactly the attention they had
(renormalising would hand the suppressed mass to the other tokens, in SD mostly to <|startoftext|> and padding,
which is a different edit from P2P's); the notebook also uses negative scales (-1 for "pink"), which only make
sense without renormalisation. Choices where the paper is silent (it names "re-weighting hyperparameter, layer of
application, number of timesteps to apply" as the sources of instability and gives no values):

* re-weight scale ``method.implicit.reweight`` = 0: "suppress" read as removing the tokens' attention;
* layers ``method.implicit.layers`` = all cross-attention layers (attn2), as P2P's controller edits every
  cross-attention layer; a regex on module names (``re.search``) selects a subset;
* window ``method.implicit.window`` = [0, 0.8] of T: P2P's re-weighting examples apply the equalizer for the
  first ``cross_replace_steps=0.8`` of the steps from noise; here the bounds are floored and inclusive, counted in
  steps taken from x_T like the instruction windows (erasure/allbutone/ours.py, resolve_window), and the warm-up applies too;
* words ``method.implicit.words`` = the target prompt's own text (every token of it, BOS/EOS excluded); name the
  word to suppress, e.g. ``[circle]`` for the target "a circle", to leave the article alone.

Only the conditional evaluation is re-weighted, never eps*(z, ∅) (P2P edits the conditional half of its
classifier-free-guidance batch only). P2P also injects the source image's self-attention maps during the first
``self_replace_steps``; we evaluate eps*_sup at the same latent z as eps*(z, c), so the "source" cross-attention
maps P2P re-weights are the teacher's own maps at z and no second trajectory exists; self-attention injection is
not implemented.

Implementation: scaling column j of the probabilities is scaling row j of the values,
(M diag(w)) V = M (diag(w) V), so :class:`ReweightAttnProcessor` multiplies the value rows of the chosen tokens
and keeps the fused ``scaled_dot_product_attention`` of diffusers' ``AttnProcessor2_0`` (no queries x keys matrix
is materialised). It is installed once on the selected attn2 layers and switched per call by a
:class:`TokenReweighting` switch: off (the default) it hands every call to the processor it replaced, so the
student and every other use of the UNet run unchanged; on, it reads per-row token weights (batch, tokens). The
switch is a property of the module's processors, so the teacher's ``functional_call`` (erasure/teacher.py) sees
it as well.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..errors import UserError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ImplicitConfig:
    """``method.implicit`` (read only with ``method.signal=implicit``); see the module docstring for the sources."""

    reweight: float = 0.0  # P2P equalizer scale on the words' cross-attention probabilities (0 = suppress)
    layers: str = "all"  # "all" cross-attention layers (attn2), or a regex searched in their module names
    window: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.8])  # fractions of T (P2P: 0.8)
    words: Optional[list[str]] = None  # words whose tokens are re-weighted; null = each target's whole text


def validate_implicit(cfg: ImplicitConfig) -> None:
    """One-sentence :class:`UserError` for a bad ``method.implicit`` (what needs the model is checked later)."""
    if not math.isfinite(float(cfg.reweight)):
        raise UserError(f"method.implicit.reweight must be a finite number (0 suppresses the words), got {cfg.reweight}")
    if str(cfg.layers) != "all":
        try:
            re.compile(str(cfg.layers))
        except re.error as exc:
            raise UserError(f"method.implicit.layers must be 'all' or a regular expression on attn2 module names, "
                            f"'{cfg.layers}' is not one ({exc})") from None
    window = list(cfg.window)
    if len(window) != 2 or not 0 <= float(window[0]) <= float(window[1]) <= 1:
        raise UserError(f"method.implicit.window {window} must be two fractions of T with 0 <= low <= high <= 1")
    if cfg.words is not None and (not cfg.words or any(not str(w).strip() for w in cfg.words)):
        raise UserError(f"method.implicit.words must be null or a non-empty list of words, got {list(cfg.words)}")


# ---------------------------------------------------------------------------------------------------------------
# token positions


def token_positions(tokenizer, prompt: str, words: list[str]) -> list[int]:
    """Positions (in the padded 77-token sequence, <|startoftext|> at 0) of every occurrence of each word's tokens.

    A word is matched as its own token sequence (``add_special_tokens=False``), as P2P's ``get_word_inds`` finds a
    word's tokens; CLIP's BPE gives a word the same tokens wherever it stands in the prompt.
    """
    ids = list(tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True).input_ids)
    found: set[int] = set()
    for word in words:
        wid = list(tokenizer(str(word), add_special_tokens=False).input_ids)
        n = len(wid)
        for i in range(1, len(ids) - n + 1):  # 0 is <|startoftext|>
            if n and ids[i: i + n] == wid:
                found.update(range(i, i + n))
    return sorted(found)


def token_weights(positions: list[int], length: int, reweight: float) -> torch.Tensor:
    """P2P's equalizer for one prompt: ones, and ``reweight`` at ``positions`` (shape (length,))."""
    w = torch.ones(length)
    w[positions] = float(reweight)
    return w


# ---------------------------------------------------------------------------------------------------------------
# the attention processor and its switch


class TokenReweighting:
    """The on/off switch shared by the installed :class:`ReweightAttnProcessor` s.

    ``weights`` is None (off) or a (batch, tokens) tensor of per-row token weights for the current UNet call.
    """

    def __init__(self):
        self.weights: torch.Tensor | None = None

    @contextlib.contextmanager
    def on(self, weights: torch.Tensor):
        """Re-weight the selected cross-attention layers for the calls inside the block; (1, tokens) broadcasts."""
        if weights.ndim != 2:
            raise ValueError(f"token weights must be (batch, tokens), got shape {tuple(weights.shape)}")
        previous, self.weights = self.weights, weights
        try:
            yield self
        finally:
            self.weights = previous


def reweighted_attention(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                         weights: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         temb: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-attention with the softmax probabilities of each key token multiplied by its weight, unnormalised.

    The computation of diffusers' ``AttnProcessor2_0`` (same operations, same order) with one extra product: the
    value rows are scaled by ``weights`` ((batch or 1, tokens)), which equals scaling the probability columns.
    With all weights 1 the product is exact and so is the result.
    """
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size, sequence_length, _ = encoder_hidden_states.shape
    if weights.shape[-1] != sequence_length or weights.shape[0] not in (1, batch_size):
        raise ValueError(f"token weights of shape {tuple(weights.shape)} do not fit a batch of {batch_size} "
                         f"prompts of {sequence_length} tokens")
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    # P2P's equalizer on the probabilities of each key token == the same factor on that token's value row
    value = value * weights.to(device=value.device, dtype=value.dtype)[:, :, None]
    inner_dim = key.shape[-1]
    head_dim = inner_dim // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                   is_causal=False)
    hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
    hidden_states = hidden_states.to(query.dtype)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


class ReweightAttnProcessor:
    """A diffusers attention processor for a cross-attention layer: P2P re-weighting while ``switch`` is on,
    otherwise the call goes unchanged to the processor it replaced (``original``)."""

    def __init__(self, original, switch: TokenReweighting):
        self.original = original
        self.switch = switch

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        weights = self.switch.weights
        if weights is None or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return reweighted_attention(attn, hidden_states, encoder_hidden_states, weights, attention_mask, temb)


def install(unet: torch.nn.Module, layers: str, switch: TokenReweighting) -> list[str]:
    """Put a :class:`ReweightAttnProcessor` on every cross-attention layer whose module name ``layers`` selects
    ("all", or a regex found with ``re.search``); other layers keep their processors. Installing again replaces an
    earlier installation (the processors it wrapped are restored first). Returns the selected module names."""
    procs = unet.attn_processors
    module_of = {name: name[: -len(".processor")] for name in procs}  # keys are "<module name>.processor"
    crosses = [m for m in module_of.values() if getattr(unet.get_submodule(m), "is_cross_attention", False)]
    if not crosses:
        raise UserError("method.signal=implicit needs cross-attention layers (attn2) in the UNet; this model has none")
    pattern = None if str(layers) == "all" else re.compile(str(layers))
    chosen = [m for m in crosses if pattern is None or pattern.search(m)]
    if not chosen:
        raise UserError(f"method.implicit.layers '{layers}' matches none of the {len(crosses)} cross-attention layers "
                        f"(e.g. '{crosses[0]}'): use 'all' or a regex on these names")
    new = {}
    for name, proc in procs.items():
        base = proc.original if isinstance(proc, ReweightAttnProcessor) else proc
        new[name] = ReweightAttnProcessor(base, switch) if module_of[name] in chosen else base
    unet.set_attn_processor(new)
    return chosen


def uninstall(unet: torch.nn.Module) -> None:
    """Restore the processors that :func:`install` wrapped."""
    procs = unet.attn_processors
    unet.set_attn_processor({n: (p.original if isinstance(p, ReweightAttnProcessor) else p) for n, p in procs.items()})


# ---------------------------------------------------------------------------------------------------------------
# conditions that carry their token weights


def with_weights(emb: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A condition for :class:`ReweightedEps`: the (B, L, D) embedding with the (B or 1, L) token weights as an
    extra last feature, (B, L, D + 1). Rows travel together through the samplers' batching and row selection."""
    w = weights.to(device=emb.device, dtype=emb.dtype).expand(emb.shape[0], emb.shape[1])
    return torch.cat([emb, w[:, :, None]], dim=-1)


def split_weights(cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`with_weights`: (embedding, token weights)."""
    return cond[..., :-1], cond[..., -1]


class ReweightedEps:
    """An epsilon function over conditions built with :func:`with_weights`: rows whose weights are not all 1 are
    evaluated with the attention re-weighting on (all rows in one UNet call; rows with weights 1 are unaffected,
    as scaling by 1 is exact); a call without such rows runs with the switch off."""

    def __init__(self, eps_fn: Callable[[], Callable], switch: TokenReweighting):
        self.eps_fn = eps_fn  # returns the epsilon function at call time (tests may swap ctx.teacher)
        self.switch = switch

    def __call__(self, sample: torch.Tensor, timestep, cond: torch.Tensor) -> torch.Tensor:
        emb, weights = split_weights(cond)
        fn = self.eps_fn()
        if bool((weights == 1).all()):
            return fn(sample, timestep, emb)
        with self.switch.on(weights):
            return fn(sample, timestep, emb)
