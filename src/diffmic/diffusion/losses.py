"""Training losses and timestep sampling (pure functions, no networks)."""

from __future__ import annotations

import torch
from torch import Tensor


def eps_mse(eps: Tensor, eps_hat: Tensor) -> Tensor:
    """Mean squared error between true and predicted noise, averaged over batch and classes."""
    return (eps - eps_hat).pow(2).mean()


def gaussian_kernel(a: Tensor, b: Tensor, bandwidth: float) -> Tensor:
    """k(a_i, b_j) = exp(-‖a_i - b_j‖² / bandwidth), shape (N, M)."""
    return torch.exp(-torch.cdist(a, b).pow(2) / bandwidth)


def gaussian_mmd(a: Tensor, b: Tensor, bandwidth: float | None = None) -> Tensor:
    """Biased (V-statistic) squared MMD between samples ``a`` (N, C) and ``b`` (M, C).

    MMD² = mean k(a, a) + mean k(b, b) - 2 mean k(a, b), diagonal terms included, with a single
    Gaussian kernel. The original DiffMIC uses bandwidth C² (C = number of classes), the default.
    """
    if bandwidth is None:
        bandwidth = float(a.shape[1] ** 2)
    return (
        gaussian_kernel(a, a, bandwidth).mean()
        + gaussian_kernel(b, b, bandwidth).mean()
        - 2 * gaussian_kernel(a, b, bandwidth).mean()
    )


def antithetic_timesteps(
    n: int,
    num_timesteps: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw n//2+1 indices uniformly in [0, T), append their mirrors T-1-t, keep the first n."""
    half = torch.randint(0, num_timesteps, (n // 2 + 1,), generator=generator, device=device)
    return torch.cat([half, num_timesteps - 1 - half])[:n]


def diffmic_loss(
    eps: Tensor,
    eps_hat: Tensor,
    eps_hat_global: Tensor,
    eps_hat_local: Tensor,
    *,
    mmd_weight: float = 0.5,
) -> dict[str, Tensor]:
    """The three-stream objective: MSE(ε, ε̂) + w·(MMD(ε, ε̂_g) + MMD(ε, ε̂_l))."""
    mse = eps_mse(eps, eps_hat)
    mmd_g = gaussian_mmd(eps, eps_hat_global)
    mmd_l = gaussian_mmd(eps, eps_hat_local)
    return {"loss": mse + mmd_weight * (mmd_g + mmd_l), "mse": mse, "mmd_global": mmd_g, "mmd_local": mmd_l}
