"""Readouts: how sampled label vectors y_0 become class probabilities (pure tensor functions).

Three readouts (``eval.readout``), reported side by side by ``evaluate`` and the benchmark:

- ``mean_path``: one deterministic DDIM chain (η = 0) started at the prior itself (zero noise), so
  the chain follows the mean path of the reverse ODE. Class = argmax y_0; probabilities
  softmax(y_0 / T). With an untrained MMSE-skip denoiser it returns the prior exactly; with an
  oracle ε it returns y_0 exactly. Needs no random numbers.
- ``vote``: CARD's majority vote over S stochastic chains. Probabilities are the vote fractions with a
  small continuous tie-break from softmax(mean_s y_0 / T), so equal votes are ordered (AUROC) and
  ties are broken deterministically (then by the lowest class index).
- ``mean_softmax``: mean over S chains of softmax(y_0 / T) (the package's readout before 0.2).
"""

from __future__ import annotations

import torch
from torch import Tensor

READOUTS = ("mean_path", "vote", "mean_softmax")


def _check_chains(y0: Tensor) -> None:
    if y0.ndim != 3 or y0.shape[0] < 1:
        raise ValueError(f"chains must be (S, B, C) with S >= 1, got shape {tuple(y0.shape)}")


def temper_priors(priors: Tensor, temperature: Tensor | float) -> Tensor:
    """``softmax(log p / τ)`` row by row: the same class ranking, flattened towards uniform for τ > 1.

    ``priors`` are probabilities ``(B, C)``; ``temperature`` is one τ or a ``(B,)`` tensor of them
    (``train.prior_temper_max`` draws one per row; ``model.prior_temperature`` is one number). τ = 1
    returns the prior up to rounding. Probabilities are floored at 1e-12 before the log, so a one-hot
    prior stays finite.
    """
    if isinstance(temperature, Tensor) and temperature.dim() == 1:
        temperature = temperature.unsqueeze(1)
    return (priors.clamp_min(1e-12).log() / temperature).softmax(-1)


def mean_softmax_probs(y0: Tensor, temperature: float) -> Tensor:
    """(S, B, C) sampled y_0 -> (B, C): mean over S of softmax(y_0 / temperature)."""
    _check_chains(y0)
    return (y0 / temperature).softmax(dim=-1).mean(dim=0)


def path_probs(y0: Tensor, temperature: float) -> Tensor:
    """(B, C) y_0 of the deterministic mean path -> (B, C) softmax(y_0 / temperature)."""
    if y0.ndim != 2:
        raise ValueError(f"the mean path must be (B, C), got shape {tuple(y0.shape)}")
    return (y0 / temperature).softmax(dim=-1)


def vote_probs(y0: Tensor, temperature: float) -> Tensor:
    """(S, B, C) sampled y_0 -> (B, C) majority-vote probabilities.

    p = (1 − λ)·votes + λ·softmax(mean_s y_0 / T) with λ = 1 / (2(S + 1)): one vote (1/S) always
    outweighs the tie-break term, so argmax p is the majority class, ties between equally voted
    classes go to the larger mean y_0, and exact ties to the lowest index (``argmax``'s rule).
    """
    _check_chains(y0)
    s, _, c = y0.shape
    votes = (y0.argmax(dim=-1).unsqueeze(-1) == torch.arange(c, device=y0.device)).to(y0.dtype).mean(dim=0)
    lam = 1.0 / (2.0 * (s + 1))
    return (1.0 - lam) * votes + lam * (y0.mean(dim=0) / temperature).softmax(dim=-1)


def readout_probs(readout: str, *, temperature: float, chains: Tensor | None = None,
                  path: Tensor | None = None) -> Tensor:
    """Probabilities (B, C) of one readout from the chains (S, B, C) and/or the mean path (B, C)."""
    if readout == "mean_path":
        if path is None:
            raise ValueError("the mean_path readout needs the deterministic path")
        return path_probs(path, temperature)
    if chains is None:
        raise ValueError(f"the {readout} readout needs sampled chains")
    if readout == "vote":
        return vote_probs(chains, temperature)
    if readout == "mean_softmax":
        return mean_softmax_probs(chains, temperature)
    raise ValueError(f"unknown readout {readout!r}; choose from {list(READOUTS)}")


__all__ = ["READOUTS", "mean_softmax_probs", "path_probs", "readout_probs", "vote_probs"]
