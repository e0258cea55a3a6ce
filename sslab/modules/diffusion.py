"""Gaussian diffusion pieces for DiffMAE: noise schedules, the forward process q(x_t | x_0), conversions
between x_0 and epsilon predictions, and ancestral sampling steps (Ho et al., "Denoising Diffusion
Probabilistic Models", NeurIPS 2020; Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models",
ICML 2021).

Timesteps are integers 0..T; ``alpha_bar[0] = 1`` is the clean signal and training draws t from 1..T.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SCHEDULES = ("cosine", "linear")


def cosine_alpha_bar(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021, Eq. 17): alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) pi/2),
    with beta_t = 1 - alpha_bar(t) / alpha_bar(t-1) clipped at ``max_beta``. Returns (T + 1,) float64."""
    t = torch.arange(num_steps + 1, dtype=torch.float64)
    f = torch.cos((t / num_steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


def linear_alpha_bar(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. (2020): betas linear from 1e-4 to 0.02 over T = 1000 steps; for other T the end points are
    scaled by 1000 / T (Nichol & Dhariwal 2021) so that alpha_bar(T) stays near 0. Returns (T + 1,) float64."""
    scale = 1000.0 / num_steps
    betas = torch.linspace(beta_start * scale, beta_end * scale, num_steps, dtype=torch.float64)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


def make_alpha_bar(schedule: str, num_steps: int) -> torch.Tensor:
    if schedule == "cosine":
        return cosine_alpha_bar(num_steps)
    if schedule == "linear":
        return linear_alpha_bar(num_steps)
    raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


class GaussianDiffusion(nn.Module):
    """Holds ``alpha_bar`` (T + 1,) as a buffer and implements the closed-form forward process and the
    DDPM posterior between any two timesteps s < t (for sampling with fewer steps than T)."""

    def __init__(self, schedule: str, num_steps: int) -> None:
        super().__init__()
        self.schedule, self.num_steps = schedule, num_steps
        self.register_buffer("alpha_bar", make_alpha_bar(schedule, num_steps).float(), persistent=False)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, i.e. a draw from q(x_t | x_0) (Ho et al., Eq. 4)."""
        ab = _expand(self.alpha_bar[t], x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        ab = _expand(self.alpha_bar[t], x_t)
        return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        ab = _expand(self.alpha_bar[t], x_t)
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()

    def posterior_sample(
        self, x_t: torch.Tensor, x0: torch.Tensor, t: int, s: int, noise: torch.Tensor
    ) -> torch.Tensor:
        """A draw from q(x_s | x_t, x_0) for s < t (Ho et al., Eqs. 6-7, with alpha_t replaced by
        alpha_bar_t / alpha_bar_s so that steps can be skipped): mean
        sqrt(ab_s)(1 - a)/(1 - ab_t) x_0 + sqrt(a)(1 - ab_s)/(1 - ab_t) x_t, variance
        (1 - a)(1 - ab_s)/(1 - ab_t), with a = ab_t / ab_s. At s = 0 it returns x_0."""
        if s == 0:
            return x0
        ab_t, ab_s = self.alpha_bar[t], self.alpha_bar[s]
        a = ab_t / ab_s
        mean = (ab_s.sqrt() * (1 - a) * x0 + a.sqrt() * (1 - ab_s) * x_t) / (1 - ab_t)
        var = (1 - a) * (1 - ab_s) / (1 - ab_t)
        return mean + var.sqrt() * noise

    def sampling_timesteps(self, num_sample_steps: int) -> list[int]:
        """T = t_0 > t_1 > ... > t_S = 0, evenly spaced, for ``num_sample_steps`` = S denoising steps."""
        steps = max(1, min(num_sample_steps, self.num_steps))
        ts = torch.linspace(self.num_steps, 0, steps + 1).round().long().tolist()
        return [int(t) for t in ts]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Ho et al. 2020, after Vaswani et al. 2017): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    return torch.nn.functional.pad(emb, (0, dim % 2))
