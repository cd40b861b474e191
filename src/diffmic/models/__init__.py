"""Networks: DCG guidance, label denoiser, and the composed DiffMIC model."""

from __future__ import annotations

from diffmic.models.denoiser import ConditionalLinear, LabelDenoiser
from diffmic.models.diffmic import DiffMIC, Prediction, probs_from_y0
from diffmic.models.factory import build_model
from diffmic.models.guidance import DCG, GatedAttentionMIL, GuidanceOutput

__all__ = [
    "DCG",
    "ConditionalLinear",
    "DiffMIC",
    "GatedAttentionMIL",
    "GuidanceOutput",
    "LabelDenoiser",
    "Prediction",
    "build_model",
    "probs_from_y0",
]
