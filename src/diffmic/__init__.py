"""diffmic: DiffMIC (Yang et al., MICCAI 2023) as a tested, fast, easy-to-use package.

Python API::

    from diffmic import DiffMIC
    model = DiffMIC.from_checkpoint("runs/retinamnist/model.pt")
    probs = model.predict_proba(images, samples=1)   # (N, C)

Heavy submodules (lightning, timm) are imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

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
    "train": "diffmic.training.api",
}

if TYPE_CHECKING:  # pragma: no cover
    from diffmic.config import DiffMICConfig
    from diffmic.data.registry import build_data
    from diffmic.diffusion.schedule import CardSchedule
    from diffmic.evaluation.report import evaluate
    from diffmic.models.denoiser import LabelDenoiser
    from diffmic.models.diffmic import DiffMIC
    from diffmic.models.factory import build_model
    from diffmic.models.guidance import DCG
    from diffmic.training.api import train


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffmic' has no attribute {name!r}")
