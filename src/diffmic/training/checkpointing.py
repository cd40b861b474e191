"""Training checkpoints: atomic files, RNG state, resumable CSV logs, and reading a ``.ckpt`` as a model.

A run keeps one resumable Lightning checkpoint (``last.ckpt``: weights, EMA, optimiser states) and
the best validation epoch's weights as a *model file* (``best.ckpt`` in the format of
:mod:`diffmic.models.checkpoint`: the weights ``model.pt`` is made of, no optimiser state, no
second copy of the denoiser); :class:`AtomicCheckpointIO` writes both. For the RetinaMNIST preset
that is 576 MB + 144 MB instead of 2 × 576 MB.

A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed over
the target (``os.replace`` is atomic on POSIX), so a run killed at any moment leaves either the
previous complete checkpoint or the new complete one, never a truncated file. (Lightning's own
writer stages the file in the system temp folder and *moves* it, which is a copy, not an atomic
rename, whenever /tmp is another filesystem.)
"""

from __future__ import annotations

import csv
import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO

from diffmic._io import PARTIAL_SUFFIX, atomic_torch_save, atomic_write_text
from diffmic.errors import CheckpointError
from diffmic.models.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION

__all__ = ["AtomicCheckpointIO", "ResumableCSVLogger", "atomic_torch_save", "is_lightning_checkpoint",
           "lightning_to_model_payload", "remove_partial_files", "rng_state", "selected_model_payload",
           "set_rng_state"]

# Where DiffMICModule keeps the model and the EMA copy of the denoiser in its state_dict
# (``DiffMICModule.model`` and ``DiffMICModule.ema.shadow``; tests/training check the names).
MODEL_PREFIX = "model."
EMA_PREFIX = "ema.shadow."


def is_lightning_checkpoint(payload: dict[str, Any]) -> bool:
    return "hyper_parameters" in payload and "state_dict" in payload


def lightning_to_model_payload(payload: dict[str, Any], source: str | Path = "checkpoint") -> dict[str, Any]:
    """A Lightning ``.ckpt`` of a DiffMIC run -> the model-file dict of :mod:`diffmic.models.checkpoint`.

    The weights are those of ``DiffMICModule.model``; with ``train.ema_eval`` the denoiser's are
    the EMA copy, as at validation. ``extra`` records the checkpoint's ``epoch``.
    """
    if not is_lightning_checkpoint(payload):
        raise CheckpointError(f"{source}: not a diffmic checkpoint (no format marker)")
    hp = payload["hyper_parameters"]
    cfg_dict, args = hp.get("config"), hp.get("model_args")
    if cfg_dict is None or args is None:
        raise CheckpointError(f"{source}: Lightning checkpoint without a diffmic config")
    sd = payload["state_dict"]
    state = {k[len(MODEL_PREFIX):]: v for k, v in sd.items() if k.startswith(MODEL_PREFIX)}
    if (cfg_dict or {}).get("train", {}).get("ema_eval", False):  # export the EMA denoiser
        ema = {"denoiser." + k[len(EMA_PREFIX):]: v for k, v in sd.items() if k.startswith(EMA_PREFIX)}
        if not ema:
            raise CheckpointError(f"{source}: train.ema_eval is set but the checkpoint holds no EMA weights "
                                  f"({EMA_PREFIX}*)")
        state.update(ema)
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": cfg_dict,
            "model_args": args, "state_dict": state, "extra": {"epoch": payload.get("epoch")}}


def selected_model_payload(payload: dict[str, Any], source: str | Path = "checkpoint") -> tuple[dict[str, Any], int]:
    """(model-file dict, epoch) of a run's ``best.ckpt`` (a model file) or of a Lightning ``.ckpt``."""
    if payload.get("format") != CHECKPOINT_FORMAT:
        payload = lightning_to_model_payload(payload, source)
    extra = payload.get("extra") if isinstance(payload.get("extra"), dict) else {}
    epoch = extra.get("epoch")
    return payload, int(epoch) if isinstance(epoch, int) else -1


def remove_partial_files(folder: str | Path) -> list[Path]:
    """Delete temporary checkpoint files left by a killed writer; returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = sorted(folder.glob(f".*{PARTIAL_SUFFIX}"))
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint writer that never leaves a truncated ``.ckpt``.

    Checkpoints written to one of ``model_files`` (a ``ModelCheckpoint`` with
    ``save_weights_only=True``) are stored as model files: :func:`lightning_to_model_payload` of
    the checkpoint (the model's weights, with the EMA denoiser under ``train.ema_eval``; the epoch
    in ``extra``), i.e. exactly the weights the run's ``model.pt`` is made of.
    """

    def __init__(self, model_files: tuple[str | Path, ...] = ()) -> None:
        super().__init__()
        self._model_files = {Path(p).absolute() for p in model_files}

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.absolute() in self._model_files:
            checkpoint = lightning_to_model_payload(checkpoint, path)
        atomic_torch_save(checkpoint, path)


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states, as plain types and tensors.

    Plain types keep checkpoints loadable with ``torch.load(weights_only=True)``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- CSV logs
class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is kept on resume.

    Rows of epochs at or after ``resume_epoch`` (logged by the killed run after its last
    checkpoint, so about to be redone) are dropped.
    """

    def __init__(self, log_dir: str, resume_epoch: int) -> None:
        self._resume_epoch = resume_epoch
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # the base class deletes metrics.csv here
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader if not _epoch_at_or_after(r.get("epoch"), self._resume_epoch)]
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, buf.getvalue())
        self.metrics_keys = sorted(header)


def _epoch_at_or_after(value: str | None, epoch: int) -> bool:
    try:
        return value not in (None, "") and int(float(value)) >= epoch
    except ValueError:
        return False


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to the run's ``metrics.csv`` when a run is resumed."""

    def __init__(self, *args: Any, resume_epoch: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resume_epoch = resume_epoch

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:  # type: ignore[override]
        if self._experiment is not None:
            return self._experiment
        if self._resume_epoch is None:
            return super().experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _AppendingWriter(self.log_dir, self._resume_epoch)
        return self._experiment


def _relocate(path: Any, old: Path, new: Path) -> Any:
    """``path`` under ``old`` -> the same file under ``new`` (other values unchanged)."""
    if not path:
        return path
    try:
        return str(new / Path(path).relative_to(old))
    except ValueError:
        return path


class RelocatableModelCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint whose state survives a moved run folder.

    Lightning restores the best score so far only when the checkpoint folder has the path it had when
    the state was saved; after a run folder is moved (or copied to another disk) and resumed, model
    selection would start again at the first resumed epoch and could replace a better best.ckpt with a
    worse one. Here the saved paths are rewritten to the new folder first, then restored as usual.
    """

    def _generate_state_key(self, **kwargs: Any) -> str:
        # ModelCheckpoint's own key: checkpoints written before this class existed resume with it.
        return f"ModelCheckpoint{kwargs!r}"

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old, new = state_dict.get("dirpath"), self.dirpath
        if old is not None and new is not None and Path(old) != Path(new):
            o, n = Path(old), Path(new)
            state_dict = {
                **state_dict,
                "dirpath": new,
                "best_model_path": _relocate(state_dict.get("best_model_path"), o, n),
                "kth_best_model_path": _relocate(state_dict.get("kth_best_model_path"), o, n),
                "last_model_path": _relocate(state_dict.get("last_model_path"), o, n),
                "best_k_models": {_relocate(k, o, n): v for k, v in (state_dict.get("best_k_models") or {}).items()},
            }
        super().load_state_dict(state_dict)
