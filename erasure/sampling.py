"""Sampling z_t: DDIM (eta = 0) from x_T down to a given step, with classifier-free guidance.

The loop is written out here (diffusers' philosophy: the denoising loop lives where it is used) and
advances with the diffusers scheduler's own ``step``. All conditions of one step go through the UNet
in one batched call.

Step counting: ``steps_taken`` is the number of denoising steps taken from pure noise x_T
(0 = x_T itself). The paper's training step t ~ U{1..T} (Algorithm 1, line 3) maps to
``steps_taken = T - t``; z_t then lives at the scheduler timestep ``timesteps[T - t]``.

Several trajectories can run in one batch, each with its own stop (``steps_taken`` a sequence): at loop
index i only the trajectories that still need a step go through the UNet, so every trajectory sees exactly
the computation it would see alone (the one-at-a-time reference), in fewer, larger UNet calls.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# extra(steps_taken, eps_per_condition) -> an additional epsilon term (or None), e.g. All-but-One's delta;
# conditions that ``needed`` left out of a step arrive as None
ExtraFn = Callable[[int, Sequence["torch.Tensor | None"]], "torch.Tensor | None"]
# needed(steps_taken) -> indices of the extra conditions (2, 3, ...) that ``extra`` reads at that step
NeededFn = Callable[[int], Sequence[int]]


def ddim_timesteps(scheduler, num_steps: int) -> torch.Tensor:
    scheduler.set_timesteps(num_steps)
    return scheduler.timesteps


def eps_all(eps_fn: EpsFn, x: torch.Tensor, timestep, conds: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """epsilon for every condition at once: one UNet call on the batch [x; x; ...] x [c_0; c_1; ...].

    ``x`` is (B, C, H, W); each condition is (B, L, D) or (1, L, D) (broadcast to B); ``timestep`` is a
    scalar or a (B,) tensor of per-sample timesteps. Returns one (B, C, H, W) tensor per condition, in order.
    """
    b, k = x.shape[0], len(conds)
    embs = torch.cat([c.expand(b, *c.shape[1:]) for c in conds])
    if torch.is_tensor(timestep) and timestep.ndim == 1:
        timestep = timestep.to(x.device).repeat(k)
    out = eps_fn(x.repeat(k, 1, 1, 1), timestep, embs)
    return list(out.chunk(k))


def _take(cond: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return cond if cond.shape[0] == 1 else cond[rows]


@torch.no_grad()
def sample_to_step(eps_fn: EpsFn, scheduler, x_T: torch.Tensor, conds: Sequence[torch.Tensor],
                   steps_taken: int | Sequence[int], num_steps: int, guidance: float,
                   extra: ExtraFn | None = None, needed: NeededFn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run DDIM steps of a ``num_steps``-step schedule from ``x_T`` until each sample has taken its ``steps_taken``.

    ``conds[0]`` is the unconditional embedding and ``conds[1]`` the prompt; further conditions are passed to
    ``extra``; ``needed(i)``, if given, names the extra conditions ``extra`` reads at step i, and only those go
    through the UNet (the others would be computed and thrown away: e.g. an instruction concept outside its
    window). Each step uses eps = eps(∅) + guidance * (eps(c) - eps(∅)) [+ extra]. ``steps_taken`` is an int
    (all samples) or one int per sample, each in 0..num_steps-1.
    Returns (z, the timestep at which z lives: a scalar tensor for an int ``steps_taken``, else one per sample).
    """
    per_sample = not isinstance(steps_taken, int)
    stops = torch.as_tensor(list(steps_taken) if per_sample else [steps_taken] * x_T.shape[0], dtype=torch.long)
    if stops.numel() != x_T.shape[0]:
        raise ValueError(f"{stops.numel()} stops for {x_T.shape[0]} samples")
    if ((stops < 0) | (stops >= num_steps)).any():
        raise ValueError(f"steps_taken must be in [0, {num_steps}), got {stops.tolist()}")
    timesteps = ddim_timesteps(scheduler, num_steps)
    x = _ddim_loop(eps_fn, scheduler, x_T * scheduler.init_noise_sigma, conds, timesteps, stops, guidance, extra,
                   needed)
    at = timesteps[stops]
    return x, (at if per_sample else at[0])


def sample_along(eps_fn: EpsFn, scheduler, x_T: torch.Tensor, conds: Sequence[torch.Tensor], timesteps: Sequence[int],
                 steps_taken: Sequence[int], num_steps: int, guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Guided DDIM (eta = 0, as :func:`sample_to_step`) along a given list of decreasing ``timesteps``: sample b takes
    the steps at ``timesteps[0]``, ..., ``timesteps[steps_taken[b] - 1]`` (0 .. len(timesteps) steps), ``x_T`` lying
    at ``timesteps[0]``. Each step is the scheduler's own ``step`` after ``set_timesteps(num_steps)``, which goes from
    t to t - num_train_timesteps // num_steps (below 0: the scheduler's final alpha, alphas_cumprod[0] when
    ``set_alpha_to_one`` is false), so ``timesteps`` should lie on that grid. ``timesteps`` = the scheduler's own
    list gives :func:`sample_to_step`'s trajectories; other lists reproduce other samplers' loops (ldm's DDIMSampler
    with ``t_start=-1``: baselines/esd.py, ``timesteps=compvis``).
    Returns (z, one timestep per sample at which z lives: ``timesteps[0]`` after no step, else the last step's
    t - num_train_timesteps // num_steps, 0 if that is negative).
    """
    stops = torch.as_tensor(list(steps_taken), dtype=torch.long)
    if stops.numel() != x_T.shape[0]:
        raise ValueError(f"{stops.numel()} stops for {x_T.shape[0]} samples")
    along = torch.as_tensor(list(timesteps), dtype=torch.long)
    if ((stops < 0) | (stops > along.numel())).any():
        raise ValueError(f"steps_taken must be in [0, {along.numel()}], got {stops.tolist()}")
    ddim_timesteps(scheduler, num_steps)  # the scheduler's step reads num_inference_steps
    stride = scheduler.config.num_train_timesteps // num_steps
    x = _ddim_loop(eps_fn, scheduler, x_T * scheduler.init_noise_sigma, conds, along, stops, guidance)
    after = torch.cat([along[:1], (along - stride).clamp(min=0)])  # after[s]: where z lies after s steps
    return x, after[stops]


def _ddim_loop(eps_fn: EpsFn, scheduler, x: torch.Tensor, conds: Sequence[torch.Tensor], timesteps: torch.Tensor,
               stops: torch.Tensor, guidance: float, extra: ExtraFn | None = None,
               needed: NeededFn | None = None) -> torch.Tensor:
    """The guided DDIM loop of :func:`sample_to_step` over ``timesteps`` (step i at ``timesteps[i]``; sample b takes
    ``stops[b]`` steps). Returns the latents after each sample's last step."""
    for i in range(int(stops.max())):
        rows = (stops > i).nonzero().flatten().to(x.device)
        t = timesteps[i]
        xa = x if rows.numel() == x.shape[0] else x[rows]
        ca = conds if rows.numel() == x.shape[0] else [_take(c, rows) for c in conds]
        use = [0, 1, *(needed(i) if needed is not None else range(2, len(ca)))]
        got = eps_all(eps_fn, scheduler.scale_model_input(xa, t), t, [ca[k] for k in use])
        eps: list = [None] * len(ca)
        for k, e in zip(use, got):
            eps[k] = e
        guided = eps[0] + guidance * (eps[1] - eps[0])
        if extra is not None:
            add = extra(i, eps)
            if add is not None:
                guided = guided + add
        stepped = scheduler.step(guided, t, xa, eta=0.0).prev_sample
        if rows.numel() == x.shape[0]:
            x = stepped
        else:
            x = x.clone()
            x[rows] = stepped
    return x
