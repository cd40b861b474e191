"""The model file format: one writer (:func:`save_model`), one reader (:func:`load_model`).

A model file (``model.pt``) is a dict written with ``torch.save`` and read with
``torch.load(weights_only=True)`` (no pickled code):

=============  ==============================================================================
``format``     ``"diffmic-model"`` (:data:`CHECKPOINT_FORMAT`)
``version``    format version, an int (:data:`CHECKPOINT_VERSION`); see the history below
``config``     the resolved config (``DiffMICConfig.to_dict()``)
``model_args`` what the data decided: :meth:`DiffMIC.model_args` (class names, channels, size,
               ``image_spec``: the preprocessing, :class:`diffmic.images.ImageSpec`)
``state_dict`` the weights
``extra``      free-form metadata (selected epoch, git commit, ...)
=============  ==============================================================================

Version history: 1 — the first format (the layout above). Files written before ``image_spec``
was added to ``model_args`` load with the spec derived from their config (``data.format`` decides
the centre crop), which is what their training used.

A Lightning ``.ckpt`` of a training run is another format: the training layer translates it
(:func:`diffmic.training.checkpointing.lightning_to_model_payload`), and :func:`diffmic.load_model`
reads both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffmic._io import atomic_torch_save
from diffmic.config import DiffMICConfig
from diffmic.errors import CheckpointError, DataError, first_line
from diffmic.images import ImageSpec
from diffmic.models.diffmic import DiffMIC
from diffmic.models.factory import build_model

CHECKPOINT_FORMAT = "diffmic-model"
CHECKPOINT_VERSION = 1
REQUIRED_MODEL_ARGS = ("num_classes", "in_chans", "image_size", "class_names")


def model_payload(model: DiffMIC, *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint dict of ``model`` (see the module docstring)."""
    if model.inference_only:
        raise CheckpointError("an inference-only copy (DiffMIC.fuse_for_inference) cannot be saved: its BatchNorm "
                              "layers are folded into the weights; save the model it was made from")
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": model.config,
        "model_args": model.model_args(),
        "state_dict": model.state_dict(),
        "extra": extra or {},
    }


def save_model(model: DiffMIC, path: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
    """Write a self-contained model file (loadable with ``torch.load(weights_only=True)``).

    The write is atomic: a failed or killed write leaves the previous file, never a truncated one.
    """
    return atomic_torch_save(model_payload(model, extra=extra), Path(path))


def load_checkpoint_payload(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """``torch.load`` with ``weights_only=True`` and one-line errors for missing/corrupt files."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        payload = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - garbage bytes also raise KeyError, IndexError, ...
        raise CheckpointError(f"{p}: corrupt or unreadable checkpoint ({first_line(exc, 160)})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{p}: not a diffmic checkpoint")
    return payload


def check_version(payload: dict[str, Any], source: str | Path = "checkpoint") -> int:
    """The payload's format version; one-line error for an unknown or newer one."""
    version = payload.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{source}: unknown checkpoint format version {version!r} (this diffmic reads "
                              f"versions 1 to {CHECKPOINT_VERSION}); save the model again with diffmic")
    if version > CHECKPOINT_VERSION:
        raise CheckpointError(f"{source}: checkpoint format version {version} is newer than this diffmic "
                              f"reads (up to {CHECKPOINT_VERSION}); upgrade diffmic to load it")
    return version


def model_from_payload(payload: dict[str, Any], source: str | Path = "checkpoint") -> DiffMIC:
    """Build a model (eval mode) from a loaded model-file dict (``source`` names it in errors)."""
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{source}: not a diffmic checkpoint (no format marker; a Lightning .ckpt of a "
                              "training run is read by diffmic.load_model)")
    check_version(payload, source)
    cfg_dict, args, state = payload.get("config"), payload.get("model_args"), payload.get("state_dict")
    args = args if isinstance(args, dict) else {}
    missing = [k for k in REQUIRED_MODEL_ARGS if k not in args]
    if missing or not isinstance(state, dict) or not isinstance(cfg_dict, dict):
        raise CheckpointError(f"{source}: incomplete checkpoint (no config, state_dict or model_args {missing})")
    cfg = DiffMICConfig.from_dict(cfg_dict, source=f"{source} config")
    if "image_spec" in args:  # absent in older files: build_model derives it from the config
        args = {**args, "image_spec": _stored_image_spec(args, cfg, source)}
    model = build_model(cfg, **args)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = first_line(exc, typed=False)
        raise CheckpointError(f"{source}: weights do not match the stored config ({first})") from None
    model.eval()
    return model


def _stored_image_spec(args: dict[str, Any], cfg: DiffMICConfig, source: str | Path) -> ImageSpec:
    """``model_args["image_spec"]``, checked against the stored size, channels and data.mean/std."""
    try:
        spec = ImageSpec.from_dict(args["image_spec"])
    except DataError as exc:
        raise CheckpointError(f"{source}: invalid image_spec ({exc})") from None
    mean, std = tuple(map(float, cfg.data.mean)), tuple(map(float, cfg.data.std))
    if (spec.size, spec.channels, spec.mean, spec.std) != (args["image_size"], args["in_chans"], mean, std):
        raise CheckpointError(
            f"{source}: image_spec {spec.to_dict()} disagrees with the stored image_size {args['image_size']}, "
            f"in_chans {args['in_chans']} or data.mean/std {list(mean)}/{list(std)}"
        )
    return spec


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> DiffMIC:
    """Load a model file written by :func:`save_model` (eval mode, on ``map_location``)."""
    return model_from_payload(load_checkpoint_payload(path, map_location), source=path).to(map_location)


__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "check_version",
    "load_checkpoint_payload",
    "load_model",
    "model_from_payload",
    "model_payload",
    "save_model",
]
