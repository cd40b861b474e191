"""Reverse samplers in label space. They see only ``denoise_fn(y_t, t) -> eps`` and the prior.

The caller closes over the image features (computed once per image), so no sampler ever touches
an image or a network. Every sampler takes an explicit ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffmic.diffusion.schedule import CardSchedule
from diffmic.errors import ConfigError

DenoiseFn = Callable[[Tensor, Tensor], Tensor]
"""``(y_t (B, C), t (B,) long) -> eps_hat (B, C)``."""

SAMPLERS = ("ddim", "ancestral", "truncated")
CHAIN_NOISES = ("random", "qmc")


def _randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def chain_start_noise(
    samples: int,
    batch: int,
    classes: int,
    *,
    kind: str = "random",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Starting noise of ``samples`` chains for each of ``batch`` images: (samples·batch, classes), chain
    s of image i at row s·batch + i.

    ``random``: i.i.d. N(0, I) from ``generator`` (what :func:`sample_ddim` draws when given no noise).
    ``qmc``: ``samples`` scrambled Sobol points mapped through the normal quantile, the same for every
    image (quasi-Monte Carlo): each point is marginally N(0, I), and together they cover the Gaussian
    evenly, so averages over the chains (votes, mean softmax, quantiles) have far less sampling error
    than i.i.d. draws. Use a power of two for ``samples`` (Sobol points are balanced in blocks of 2^k);
    one chain gets one point, shared by every image: no stratification. The scrambling seed is drawn
    from ``generator`` (on its device).
    """
    if kind == "random":
        return torch.randn((samples * batch, classes), generator=generator, device=device, dtype=dtype)
    if kind == "qmc":
        gen_device = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=gen_device))
        u = torch.quasirandom.SobolEngine(classes, scramble=True, seed=seed).draw(samples, dtype=torch.float64)
        z = torch.special.ndtri(u.clamp(1e-7, 1 - 1e-7)).to(device=device, dtype=dtype)
        return z.repeat_interleave(batch, dim=0)
    raise ConfigError(f"unknown chain noise {kind!r}; choose from {list(CHAIN_NOISES)}")


def _tvec(t: int, like: Tensor) -> Tensor:
    return torch.full((like.shape[0],), t, device=like.device, dtype=torch.long)


def sample_truncated(
    schedule: CardSchedule,
    denoise_fn: DenoiseFn,
    prior: Tensor,
    num_steps: int,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The original DiffMIC test chain: ancestral steps from index ``num_steps - 1`` down to 0.

    Starts from N(ŷ, I) at index n-1 of the T-step schedule and makes exactly ``num_steps``
    denoiser calls. With ``num_steps == T`` this is CARD's full ancestral sampler; with fewer steps
    the start is off-distribution (the original's heuristic, kept for faithful reproduction).

    Returns:
        y_0 estimate, (B, C).
    """
    if not 1 <= num_steps <= schedule.num_timesteps:
        raise ConfigError(f"num_steps must be in [1, {schedule.num_timesteps}], got {num_steps}")
    y = prior + _randn(prior, generator)
    for t in range(num_steps - 1, -1, -1):
        eps_hat = denoise_fn(y, _tvec(t, y))
        y = schedule.step(eps_hat, t, y, prior, generator=generator)
    return y


def sample_ancestral(
    schedule: CardSchedule,
    denoise_fn: DenoiseFn,
    prior: Tensor,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """CARD's full ancestral sampler over all T steps (T denoiser calls)."""
    return sample_truncated(schedule, denoise_fn, prior, schedule.num_timesteps, generator=generator)


def ddim_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """Evenly spaced, strictly decreasing indices from T-1 to 0 (just [T-1] for one step)."""
    if not 1 <= num_steps <= num_timesteps:
        raise ConfigError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    if num_steps == 1:
        return [num_timesteps - 1]
    ts = torch.linspace(num_timesteps - 1, 0, num_steps, dtype=torch.float64).round().long()
    return ts.tolist()


def sample_ddim(
    schedule: CardSchedule,
    denoise_fn: DenoiseFn,
    prior: Tensor,
    num_steps: int,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021) on the residual r = y - ŷ, which follows the plain DDPM law.

    Makes exactly ``num_steps`` denoiser calls. With ``eta == 0`` the result is a deterministic
    function of the starting noise (``noise``, or drawn from ``generator``).

    Returns:
        y_0 estimate, (B, C).
    """
    ts = ddim_timesteps(schedule.num_timesteps, num_steps)
    abar = schedule.alphas_cumprod
    start = noise if noise is not None else _randn(prior, generator)
    r = schedule.sqrt_one_minus_alphas_cumprod[ts[0]] * start  # r_{T-1} ~ N(0, (1-ᾱ) I)
    for i, t in enumerate(ts):
        eps_hat = denoise_fn(prior + r, _tvec(t, r))
        a_t = abar[t]
        r0 = (r - (1 - a_t).sqrt() * eps_hat) / a_t.sqrt()
        if i == len(ts) - 1:
            return prior + r0
        a_prev = abar[ts[i + 1]]
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
        direction = (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps_hat
        r = a_prev.sqrt() * r0 + direction
        if eta > 0:
            r = r + sigma * _randn(r, generator)
    raise AssertionError("unreachable")


def sample_mean_path(schedule: CardSchedule, denoise_fn: DenoiseFn, prior: Tensor, num_steps: int) -> Tensor:
    """The deterministic mean path: DDIM with η = 0 started at the prior itself (zero noise).

    r = 0 is the fixed point of the reverse ODE of an ε that is linear in r (the MMSE skip), so an
    untrained skip denoiser returns the prior exactly; an oracle ε still returns y_0 exactly.
    Makes ``num_steps`` denoiser calls and draws no random numbers. Returns y_0, (B, C).
    """
    return sample_ddim(schedule, denoise_fn, prior, num_steps, eta=0.0, noise=torch.zeros_like(prior))


def sample(
    schedule: CardSchedule,
    denoise_fn: DenoiseFn,
    prior: Tensor,
    *,
    sampler: str = "ddim",
    num_steps: int = 10,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Dispatch to a sampler by name (``ddim`` | ``ancestral`` | ``truncated``)."""
    if sampler == "ddim":
        return sample_ddim(schedule, denoise_fn, prior, num_steps, eta=eta, generator=generator)
    if sampler == "truncated":
        return sample_truncated(schedule, denoise_fn, prior, num_steps, generator=generator)
    if sampler == "ancestral":
        return sample_ancestral(schedule, denoise_fn, prior, generator=generator)
    raise ConfigError(f"unknown sampler {sampler!r}; choose from {list(SAMPLERS)}")
