"""Sampling z_t: DDIM (eta = 0) from x_T down to a given step, with classifier-free guidance.

The loop is written out here (diffusers' philosophy: the denoising loop lives where it is used) and
advances with the diffusers scheduler's own ``step``. All conditions of one step go through the UNet
in one batched call.

Step counting: ``steps_taken`` is the number of denoising steps taken from pure noise x_T
(0 = x_T itself). The paper's training step t ~ U{1..T} (Algorithm 1, line 3) maps to
``steps_taken = T - t``; z_t then lives at the scheduler timestep ``timesteps[T - t]``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# extra(steps_taken, eps_per_condition) -> an additional epsilon term (or None), e.g. All-but-One's delta
ExtraFn = Callable[[int, Sequence[torch.Tensor]], "torch.Tensor | None"]


def ddim_timesteps(scheduler, num_steps: int) -> torch.Tensor:
    scheduler.set_timesteps(num_steps)
    return scheduler.timesteps


def eps_all(eps_fn: EpsFn, x: torch.Tensor, timestep, conds: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """epsilon for every condition at once: one UNet call on the batch [x; x; ...] x [c_0; c_1; ...].

    ``x`` is (B, C, H, W); each condition is (B, L, D) or (1, L, D) (broadcast to B).
    Returns one (B, C, H, W) tensor per condition, in order.
    """
    b = x.shape[0]
    embs = torch.cat([c.expand(b, *c.shape[1:]) for c in conds])
    out = eps_fn(x.repeat(len(conds), 1, 1, 1), timestep, embs)
    return list(out.chunk(len(conds)))


@torch.no_grad()
def sample_to_step(eps_fn: EpsFn, scheduler, x_T: torch.Tensor, conds: Sequence[torch.Tensor],
                   steps_taken: int, num_steps: int, guidance: float,
                   extra: ExtraFn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``steps_taken`` DDIM steps of a ``num_steps``-step schedule from ``x_T``.

    ``conds[0]`` is the unconditional embedding and ``conds[1]`` the prompt; further conditions are
    passed to ``extra``. Each step uses eps = eps(∅) + guidance * (eps(c) - eps(∅)) [+ extra].
    Returns (z, timestep at which z lives). ``steps_taken`` ranges over 0..num_steps-1.
    """
    if not 0 <= steps_taken < num_steps:
        raise ValueError(f"steps_taken must be in [0, {num_steps}), got {steps_taken}")
    timesteps = ddim_timesteps(scheduler, num_steps)
    x = x_T * scheduler.init_noise_sigma
    for i in range(steps_taken):
        t = timesteps[i]
        eps = eps_all(eps_fn, scheduler.scale_model_input(x, t), t, conds)
        guided = eps[0] + guidance * (eps[1] - eps[0])
        if extra is not None:
            add = extra(i, eps)
            if add is not None:
                guided = guided + add
        x = scheduler.step(guided, t, x, eta=0.0).prev_sample
    return x, timesteps[steps_taken]
