"""CARD-style label-space diffusion with a prior mean (Han et al. 2022; DiffMIC, Yang et al. 2023).

Notation (code name -> symbol):

=================  ==========================================================
``y0``             y_0, the one-hot label (B, C)
``prior``          ŷ, the guidance prior (softmax of the DCG logits), (B, C)
``y_t``            noisy label at index t, (B, C)
``eps``            ε ~ N(0, I), (B, C)
``t``              0-based timestep index in {0, ..., T-1}, (B,) long
``alphas_cumprod`` ᾱ_t = Π_{s<=t} (1 - β_s)
=================  ==========================================================

Forward process:  q(y_t | y_0, ŷ) = N(√ᾱ_t y_0 + (1 - √ᾱ_t) ŷ, (1 - ᾱ_t) I).
The residual r = y - ŷ therefore follows the plain DDPM law r_t = √ᾱ_t r_0 + √(1-ᾱ_t) ε, which is
what lets DDIM run on the residual (:mod:`diffmic.diffusion.sampling`).

Nothing here calls a network. Schedules are computed in float64 and stored as float32
non-persistent buffers, so ``.to(device)`` moves them and checkpoints do not carry them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from diffmic.errors import ConfigError


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """β_t linearly spaced in [beta_start, beta_end] (DDPM; the original's ``linear``)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Cosine schedule of Nichol & Dhariwal (2021), β clipped to 0.999; start/end are unused."""
    s = 0.008
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


BETA_SCHEDULES: dict[str, Callable[[int, float, float], Tensor]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
}


def make_betas(name: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Look up a beta schedule by name (float64, shape (T,))."""
    try:
        fn = BETA_SCHEDULES[name]
    except KeyError:
        raise ConfigError(f"unknown beta schedule {name!r}; choose from {sorted(BETA_SCHEDULES)}") from None
    if num_timesteps < 1:
        raise ConfigError(f"num_timesteps must be >= 1, got {num_timesteps}")
    return fn(num_timesteps, beta_start, beta_end)


def _extract(buf: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """Gather ``buf[t]`` and broadcast to ``like`` (B, C)."""
    out = buf.gather(0, t.long().reshape(-1).to(buf.device))
    return out.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class CardSchedule(nn.Module):
    """Schedule buffers and the closed-form CARD equations (no network calls).

    Args:
        num_timesteps: T, the number of training timesteps.
        schedule: a name in :data:`BETA_SCHEDULES`.
        beta_start: first β (linear schedule).
        beta_end: last β (linear schedule).
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ) -> None:
        super().__init__()
        betas = make_betas(schedule, num_timesteps, beta_start, beta_end)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        self.num_timesteps = num_timesteps
        # posterior q(y_{t-1} | y_t, y_0, ŷ) = N(γ0 y0 + γ1 y_t + γ2 ŷ, β̃_t I)   (CARD eq. 3)
        gamma0 = betas * abar_prev.sqrt() / (1 - abar)
        gamma1 = (1 - abar_prev) * alphas.sqrt() / (1 - abar)
        gamma2 = 1 + (abar.sqrt() - 1) * (alphas.sqrt() + abar_prev.sqrt()) / (1 - abar)
        post_var = betas * (1 - abar_prev) / (1 - abar)
        for name, value in {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(),
            "gamma0": gamma0,
            "gamma1": gamma1,
            "gamma2": gamma2,
            "posterior_variance": post_var,
        }.items():
            self.register_buffer(name, value.float(), persistent=False)

    def q_sample(self, y0: Tensor, prior: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Draw y_t ~ q(y_t | y_0, ŷ) = √ᾱ_t y0 + (1-√ᾱ_t) ŷ + √(1-ᾱ_t) ε."""
        a = _extract(self.sqrt_alphas_cumprod, t, y0)
        s = _extract(self.sqrt_one_minus_alphas_cumprod, t, y0)
        return a * y0 + (1 - a) * prior + s * eps

    def predict_y0(self, y_t: Tensor, prior: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Invert :meth:`q_sample` for y_0 given ε (the y_0 reparameterisation)."""
        a = _extract(self.sqrt_alphas_cumprod, t, y_t)
        s = _extract(self.sqrt_one_minus_alphas_cumprod, t, y_t)
        return (y_t - (1 - a) * prior - s * eps) / a

    def posterior(self, y0: Tensor, y_t: Tensor, prior: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(y_{t-1} | y_t, y_0, ŷ) for t >= 1 (variance broadcast to (B, 1))."""
        mean = (
            _extract(self.gamma0, t, y0) * y0
            + _extract(self.gamma1, t, y0) * y_t
            + _extract(self.gamma2, t, y0) * prior
        )
        return mean, _extract(self.posterior_variance, t, y0)

    def step(
        self,
        eps_hat: Tensor,
        t: int,
        y_t: Tensor,
        prior: Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """One ancestral reverse step y_t -> y_{t-1} (t >= 1); at t = 0 return the y_0 estimate.

        Matches the original's ``p_sample`` / ``p_sample_t_1to0`` ("fixedsmall" variance β̃_t).
        """
        tt = torch.full((y_t.shape[0],), t, device=y_t.device, dtype=torch.long)
        y0_hat = self.predict_y0(y_t, prior, tt, eps_hat)
        if t == 0:
            return y0_hat
        mean, var = self.posterior(y0_hat, y_t, prior, tt)
        z = torch.randn(y_t.shape, generator=generator, device=y_t.device, dtype=y_t.dtype)
        return mean + var.sqrt() * z
