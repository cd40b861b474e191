"""Networks: DCG guidance, label denoiser, the composed DiffMIC model and its file format."""

from __future__ import annotations

from diffmic.models.checkpoint import load_model, model_from_payload, save_model
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
    "load_model",
    "model_from_payload",
    "probs_from_y0",
    "save_model",
]
