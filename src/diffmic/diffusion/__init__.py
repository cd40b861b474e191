"""Pure label-space diffusion math: schedules, samplers, readouts, losses and per-image uncertainty
of the sampled y_0 (imports torch only)."""

from __future__ import annotations

from diffmic.diffusion.losses import antithetic_timesteps, diffmic_loss, eps_mse, gaussian_mmd
from diffmic.diffusion.readout import READOUTS, readout_probs
from diffmic.diffusion.sampling import (
    CHAIN_NOISES,
    DenoiseFn,
    chain_start_noise,
    ddim_timesteps,
    sample,
    sample_ancestral,
    sample_ddim,
    sample_mean_path,
    sample_truncated,
)
from diffmic.diffusion.schedule import BETA_SCHEDULES, CardSchedule, make_betas
from diffmic.diffusion.uncertainty import class_intervals, predictive_entropy, vote_fractions

__all__ = [
    "BETA_SCHEDULES",
    "CHAIN_NOISES",
    "READOUTS",
    "CardSchedule",
    "DenoiseFn",
    "antithetic_timesteps",
    "chain_start_noise",
    "class_intervals",
    "ddim_timesteps",
    "diffmic_loss",
    "eps_mse",
    "gaussian_mmd",
    "make_betas",
    "predictive_entropy",
    "readout_probs",
    "sample",
    "sample_ancestral",
    "sample_ddim",
    "sample_mean_path",
    "sample_truncated",
    "vote_fractions",
]
