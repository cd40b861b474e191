"""Lightning training: DCG pre-training, joint diffusion training, validation-based selection."""

from __future__ import annotations

from diffmic.training.api import TrainResult, train

__all__ = ["TrainResult", "train"]
