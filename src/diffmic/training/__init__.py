"""Lightning training: DCG pre-training, joint diffusion training, validation-based selection."""

from __future__ import annotations

from diffmic.training.api import TrainResult, resume, train

__all__ = ["TrainResult", "resume", "train"]
