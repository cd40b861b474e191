"""Batch augmentation run inside the training step: images in [0, 1] (flips and rotation) and the
denoiser's training priors (tempering)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from diffmic.diffusion.readout import temper_priors  # noqa: F401  (re-exported for the training step)


def augment_batch(
    x: Tensor,
    *,
    hflip: bool = True,
    vflip: bool = False,
    rotation: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random horizontal/vertical flips (p=0.5) and rotation in [-rotation, rotation] degrees.

    Rotation is bilinear about the centre on the same canvas with black fill, as the original.
    """
    b = x.shape[0]
    dev = x.device

    def coin() -> Tensor:
        return torch.rand(b, generator=generator, device=dev) < 0.5

    if hflip:
        x = torch.where(coin().view(b, 1, 1, 1), x.flip(3), x)
    if vflip:
        x = torch.where(coin().view(b, 1, 1, 1), x.flip(2), x)
    if rotation > 0:
        angle = (torch.rand(b, generator=generator, device=dev) * 2 - 1) * math.radians(rotation)
        cos, sin = angle.cos(), angle.sin()
        zero = torch.zeros_like(cos)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return x


def draw_prior_temperatures(n: int, max_temperature: float, *, device: torch.device | str | None = None,
                            generator: torch.Generator | None = None) -> Tensor:
    """``n`` temperatures log-uniform on ``[1, max_temperature]`` (``train.prior_temper_max``)."""
    u = torch.rand(n, generator=generator, device=device)
    return torch.exp(u * math.log(max_temperature))


def drop_image_features(feats: Tensor, p: float, *, generator: torch.Generator | None = None) -> Tensor:
    """Image-conditioning dropout (``train.image_dropout``): each row of ``feats`` ``(B, F)`` becomes all
    ones, the neutral value of the denoiser's gate ``feats * h``, with probability ``p``; the others are
    returned as they are (and keep their gradient)."""
    drop = torch.rand(feats.shape[0], generator=generator, device=feats.device) < p
    return torch.where(drop.unsqueeze(1), torch.ones_like(feats), feats)
