"""Adversarial prompts inside the text encoder: the attack core that training-time methods share with the attacks.

UnlearnDiffAtk (``eval/attacks/unlearndiffatk.py``) and AdvUnlearn's inner attack both put k adversarial tokens right
after the start token of a prompt ("prefix_k") and let gradients reach them through the text encoder. This module
holds what they share, so that a method (``baselines/advunlearn.py``, All-but-One's ``adversarial`` option) can run
the attack against the student it is training without importing the evaluation package:

* :func:`prompt_ids`, :func:`insert_prefix`: the prompt's ids and the prefix placement;
* :func:`encode_embeddings`: the text encoder run on token embeddings instead of ids (gradients reach them, and the
  encoder's own trainable weights);
* :func:`soft_prompt_attack`: AdvUnlearn's attack on continuous word embeddings (OPTML-Group/AdvUnlearn @ 9d23124,
  ``train-scripts/utils/attack_util.py``, ``soft_prompt_attack`` with attack_embd_type 'word_embd' and attack_type
  'prefix_k'), for any loss of the prompt's encoding.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterable

import torch

from .errors import UserError


@contextlib.contextmanager
def token_embeddings_replaced(text_encoder: torch.nn.Module, embeds: torch.Tensor):
    """Run ``text_encoder`` with its token-embedding lookup's output replaced by ``embeds`` (B x 77 x d): position
    embeddings, causal mask and layers stay the model's own, and gradients reach ``embeds``. (transformers 5's
    CLIPTextModel takes no ``inputs_embeds``; the official attack codes reimplement the encoder's forward for this,
    Diffusion-MU-Attack src/tasks/utils/text_encoder.py, AdvUnlearn train-scripts/utils/text_encoder.py; a forward hook
    on the lookup does the same without a copy.)"""
    handle = text_encoder.get_input_embeddings().register_forward_hook(lambda module, args, out: embeds.to(out.dtype))
    try:
        yield text_encoder
    finally:
        handle.remove()


def encode_embeddings(text_encoder: torch.nn.Module, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """Last hidden state of the text encoder for token embeddings ``embeds`` (``input_ids`` give only the shape)."""
    with token_embeddings_replaced(text_encoder, embeds):
        return text_encoder(input_ids)[0].float()


def prompt_ids(tokenizer, prompt: str, k: int) -> tuple[torch.Tensor, int]:
    """The prompt's 77 ids (padded with EOS as SD's tokenizer pads) and its length n in tokens; refuses a prompt
    too long to keep its EOS once k tokens are inserted (the official split, Diffusion-MU-Attack text_grad_.py:81-90,
    needs n + k <= 75)."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    n = int((ids[0] == tokenizer.eos_token_id).nonzero()[0, 0]) - 1
    if n + k > tokenizer.model_max_length - 2:
        raise UserError(f"prompt {prompt!r} has {n} tokens: with {k} adversarial tokens it must have at most "
                        f"{tokenizer.model_max_length - 2 - k}")
    return ids, n


def insert_prefix(seq: torch.Tensor, adv: torch.Tensor, n: int) -> torch.Tensor:
    """``seq`` (1 x 77 [x d]) with ``adv`` (1 x k [x d]) after the start token: [SOT, adv, prompt, EOS/pads], the
    last k pads dropped (Diffusion-MU-Attack text_grad_.py:81-94 and 127-129, insertion_location = prefix_k; AdvUnlearn
    attack_util.py ``construct_embd``/``construct_id`` with 'prefix_k')."""
    k = adv.shape[1]
    return torch.cat([seq[:, :1], adv, seq[:, 1:1 + n], seq[:, 1 + n + k:]], dim=1)


@dataclasses.dataclass
class SoftPrompt:
    """An adversarial prompt in word-embedding space: the k prefix embeddings and the whole input they make."""

    adv: torch.Tensor  # 1 x k x d, detached: the k adversarial word embeddings
    input_ids: torch.Tensor  # 1 x 77: the prompt's ids (they fix the shape and the EOS position only)
    embeds: torch.Tensor  # 1 x 77 x d, detached: [SOT, adv, prompt, EOS/pads] word embeddings
    losses: list[float]  # the attack loss at each step

    def encode(self, text_encoder: torch.nn.Module) -> torch.Tensor:
        """The prompt's encoding by ``text_encoder`` as it is now (gradients reach the encoder's trainable weights)."""
        return encode_embeddings(text_encoder, self.input_ids, self.embeds)


def soft_prompt(text_encoder: torch.nn.Module, tokenizer, prompt: str, adv: torch.Tensor,
                losses: list[float] | None = None) -> SoftPrompt:
    """The :class:`SoftPrompt` that the adversarial embeddings ``adv`` (1 x k x d) make with ``prompt``."""
    ids, n = prompt_ids(tokenizer, prompt, adv.shape[1])
    ids = ids.to(adv.device)
    table = text_encoder.get_input_embeddings().weight.detach()
    adv = adv.detach().float()
    return SoftPrompt(adv=adv, input_ids=ids, embeds=insert_prefix(table[ids].float(), adv, n), losses=list(losses or []))


def random_prefix(text_encoder: torch.nn.Module, k: int, generator: torch.Generator) -> torch.Tensor:
    """1 x k x d: the word embeddings of k tokens drawn uniformly from the vocabulary (AdvUnlearn attack_util.py
    ``init_adv`` without an initial embedding: ``torch.randint(0, len(tokenizer), (batch, k))``)."""
    table = text_encoder.get_input_embeddings().weight.detach()
    ids = torch.randint(0, table.shape[0], (k,), generator=generator).to(table.device)
    return table[ids].float()[None]


def soft_prompt_attack(text_encoder: torch.nn.Module, tokenizer, prompt: str, init: torch.Tensor, steps: int,
                       lr: float, loss_fn: Callable[[torch.Tensor], torch.Tensor], method: str = "pgd",
                       accumulate: bool = True, frozen: Iterable[torch.nn.Parameter] | None = None) -> SoftPrompt:
    """AdvUnlearn's inner attack (attack_util.py ``soft_prompt_attack``): k word embeddings ``init`` (1 x k x d) placed
    after the start token of ``prompt`` are moved by Adam (lr ``lr``) for ``steps`` steps to minimise
    ``loss_fn(encoding)``, the encoding being ``text_encoder``'s last hidden state of the whole input (1 x 77 x D).

    ``loss_fn`` draws its own randomness each call (AdvUnlearn: a fresh timestep, noise and z per step).
    ``method``: 'pgd' = a plain Adam step on the gradient (the official 'pgd' branch, ``attack_opt.step()``);
    'fast_at' = Adam on the gradient's sign (``adv_embedding.grad.sign_()`` first). ``accumulate``: the official loop
    never zeroes the embedding's gradient between steps, so each Adam step sees the sum of the gradients so far; kept
    as the default, ``False`` zeroes it each step. The text encoder's own weights get no gradient from the attack
    (the official code sets ``requires_grad_(False)`` on the encoder around it); ``frozen``: the parameters held
    without gradient during the attack (default: the text encoder's trainable ones; a training method passes every
    weight it trains, so that the attack's backward passes leave them alone).
    """
    if method not in ("pgd", "fast_at"):
        raise ValueError(f"attack method must be 'pgd' or 'fast_at', got {method!r}")
    k = init.shape[1]
    ids, n = prompt_ids(tokenizer, prompt, k)
    ids = ids.to(init.device)
    table = text_encoder.get_input_embeddings().weight.detach()
    base = table[ids].float()  # 1 x 77 x d: the prompt's word embeddings (attack_util.py id2embedding)
    adv = init.detach().clone().float().requires_grad_(True)
    opt = torch.optim.Adam([adv], lr=lr)  # attack_util.py: torch.optim.Adam([adv_embedding], lr=attack_lr)
    losses = []
    candidates = text_encoder.parameters() if frozen is None else frozen
    trained = [p for p in candidates if p.requires_grad]
    for p in trained:  # attack_util.py runs with the encoder frozen (AdvUnlearn.py l.92-94)
        p.requires_grad_(False)
    try:
        for _ in range(int(steps)):
            if not accumulate:
                opt.zero_grad(set_to_none=True)
            loss = loss_fn(encode_embeddings(text_encoder, ids, insert_prefix(base, adv, n)))
            loss.backward()
            if method == "fast_at":
                adv.grad.sign_()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        for p in trained:
            p.requires_grad_(True)
    return soft_prompt(text_encoder, tokenizer, prompt, adv, losses)
