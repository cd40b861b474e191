"""diffmic: DiffMIC (Yang et al., MICCAI 2023) as a tested, fast, easy-to-use package.

Python API::

    import diffmic
    model = diffmic.load_model("runs/retinamnist/model.pt")
    probs = model.predict_proba(images, samples=1)   # (N, C)

Heavy submodules (lightning, timm) are imported lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffmic._version import __version__

__all__ = [
    "DCG",
    "CardSchedule",
    "DiffMIC",
    "DiffMICConfig",
    "LabelDenoiser",
    "__version__",
    "build_data",
    "build_model",
    "evaluate",
    "load_model",
    "save_model",
    "train",
]

_LAZY = {
    "CardSchedule": "diffmic.diffusion.schedule",
    "DCG": "diffmic.models.guidance",
    "DiffMIC": "diffmic.models.diffmic",
    "DiffMICConfig": "diffmic.config",
    "LabelDenoiser": "diffmic.models.denoiser",
    "build_data": "diffmic.data.registry",
    "build_model": "diffmic.models.factory",
    "evaluate": "diffmic.evaluation.report",
    "save_model": "diffmic.models.checkpoint",
    "train": "diffmic.training.api",
}

if TYPE_CHECKING:  # pragma: no cover
    from diffmic.config import DiffMICConfig
    from diffmic.data.registry import build_data
    from diffmic.diffusion.schedule import CardSchedule
    from diffmic.evaluation.report import evaluate
    from diffmic.models.checkpoint import save_model
    from diffmic.models.denoiser import LabelDenoiser
    from diffmic.models.diffmic import DiffMIC
    from diffmic.models.factory import build_model
    from diffmic.models.guidance import DCG
    from diffmic.training.api import train


def load_model(path: str | Path, map_location: Any = "cpu") -> DiffMIC:
    """Load a model from a model file (``model.pt``) or a Lightning ``.ckpt`` of a training run.

    The model is in eval mode on ``map_location``. Errors are one-line ``CheckpointError``s. The
    ``checkpoints/best.ckpt`` of a finished run (removed when it finished) reads its ``model.pt``.
    """
    from diffmic.models.checkpoint import (
        CHECKPOINT_FORMAT,
        load_checkpoint_payload,
        model_from_payload,
    )

    if not Path(path).exists():
        from diffmic.runs import RunDir

        path = RunDir.resolve_checkpoint(path)
    payload = load_checkpoint_payload(path, map_location)
    if payload.get("format") != CHECKPOINT_FORMAT:  # a training checkpoint: the training layer reads it
        from diffmic.training.checkpointing import lightning_to_model_payload

        payload = lightning_to_model_payload(payload, source=path)
    return model_from_payload(payload, source=path).to(map_location)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffmic' has no attribute {name!r}")
