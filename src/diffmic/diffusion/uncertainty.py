"""Per-image uncertainty from the sampled diffusion outputs (pure tensor functions).

``y0`` is the stack of sampled label vectors (S, B, C) returned by the samplers of
:mod:`diffmic.diffusion.sampling` through ``DiffMIC.sample_y0`` (one row per reverse chain);
probabilities are (B, C).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_y0(y0: Tensor) -> None:
    if y0.ndim != 3 or y0.shape[0] < 1:
        raise ValueError(f"y0 must be (S, B, C) with S >= 1, got shape {tuple(y0.shape)}")


def vote_fractions(y0: Tensor) -> Tensor:
    """Fraction of the S samples whose argmax is each class: (S, B, C) -> (B, C), rows sum to 1."""
    _check_y0(y0)
    s, _, c = y0.shape
    votes = torch.nn.functional.one_hot(y0.argmax(dim=-1), num_classes=c)  # (S, B, C)
    dtype = y0.dtype if y0.is_floating_point() else torch.float32
    return votes.sum(dim=0).to(dtype) / s


def predictive_entropy(probs: Tensor, eps: float = 1e-12) -> Tensor:
    """Entropy −Σ p log p (natural log, nats) of each row of (B, C) probabilities -> (B,)."""
    if probs.ndim != 2:
        raise ValueError(f"probs must be (B, C), got shape {tuple(probs.shape)}")
    p = probs.clamp(min=0)
    return -(p * p.clamp(min=eps).log()).sum(dim=1)


def class_intervals(y0: Tensor, level: float = 0.95) -> tuple[Tensor, Tensor]:
    """CARD-style per-class interval of the sampled y_0 values.

    For ``level=0.95`` these are the 2.5th and 97.5th percentiles over the S samples (linear
    interpolation, as ``torch.quantile`` / ``numpy.percentile``).

    Returns:
        (low, high), each (B, C).
    """
    _check_y0(y0)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    tail = (1.0 - level) / 2.0
    q = torch.tensor([tail, 1.0 - tail], dtype=torch.float64 if y0.dtype == torch.float64 else torch.float32,
                     device=y0.device)
    bounds = torch.quantile(y0.to(q.dtype), q, dim=0)  # (2, B, C)
    return bounds[0].to(y0.dtype), bounds[1].to(y0.dtype)
