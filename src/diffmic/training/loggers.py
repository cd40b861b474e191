"""What a training run shows and records: Lightning loggers, progress output, quiet third-party chatter.

* ``train.logger``: ``csv`` (default) writes ``logs/metrics.csv``; ``tensorboard`` also writes
  TensorBoard event files into ``logs/tensorboard/`` (the CSV stays: ``diffmic report`` draws the
  training curves from it and ``--resume`` appends to it).
* ``train.progress``: Lightning's progress bars when stdout is a terminal; one plain line per
  epoch when it is not (a log file, a batch job, a pipe), where bars would write ``\\r`` garbage.
* :func:`quiet_lightning`: drops Lightning's advertising tip (litlogger) from its log.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import lightning as L

from diffmic.errors import ConfigError

# Loggers Lightning's rank_zero_info writes through (the tip comes from there).
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropAdvertising(logging.Filter):
    """Drop log records that advertise a product rather than describe the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return "litlogger" not in text.lower() and not text.lstrip().startswith("💡 Tip")


_FILTER = _DropAdvertising()


def quiet_lightning() -> None:
    """Drop Lightning's litlogger tip (idempotent; the filter sits on the loggers that emit it)."""
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def build_loggers(t: Any, run_dir: Path, resume_epoch: int | None) -> list[Any]:
    """The run's Lightning loggers for ``train.logger`` (CSV always; TensorBoard on request)."""
    from diffmic.training.checkpointing import ResumableCSVLogger

    loggers: list[Any] = [ResumableCSVLogger(run_dir, name="logs", version="", flush_logs_every_n_steps=1,
                                             resume_epoch=resume_epoch)]
    if t.logger == "tensorboard":
        if not _tensorboard_available():
            raise ConfigError("train.logger=tensorboard needs the tensorboard package: "
                              "pip install 'diffmic[tensorboard]' (or use train.logger=csv)")
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(run_dir / "logs", name="tensorboard", version="",
                                         default_hp_metric=False))
    return loggers


def _tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def progress_callbacks(t: Any, stream: TextIO | None = None) -> tuple[list[Any], bool]:
    """``(callbacks, enable_progress_bar)`` for ``train.progress`` and whether ``stream`` is a terminal."""
    stream = stream if stream is not None else sys.stdout
    if not t.progress:
        return [], False
    if _is_terminal(stream):
        from lightning.pytorch.callbacks import TQDMProgressBar

        return [TQDMProgressBar(refresh_rate=10)], True
    return [EpochLines(stream)], False


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


class EpochLines(L.Callback):
    """One line per finished epoch (rank 0): phase, training losses, validation metrics, seconds."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._start = time.monotonic()

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._start = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        pretraining = getattr(module, "pretraining", False)
        frozen = not pretraining and not getattr(getattr(getattr(module, "cfg", None), "train", None),
                                                 "joint_train", True)
        phase = "DCG pre-training" if pretraining else "diffusion, DCG frozen" if frozen else "joint"
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} ({phase})"]
        for key, label in (("train/loss", "loss"), ("train/dcg_loss", "DCG loss")):
            if key in m and not (frozen and key == "train/dcg_loss"):  # a frozen DCG's is the last pre-training one
                parts.append(f"{label} {m[key]:.4f}")
        select = getattr(getattr(getattr(module, "cfg", None), "train", None), "select_metric", "acc")
        for key, label in ((f"val/{select}", f"val {select}"), (f"val/dcg_{select}", f"val DCG {select}")):
            if key in m and m[key] == m[key]:  # not NaN
                parts.append(f"{label} {m[key]:.4f}")
        parts.append(f"{time.monotonic() - self._start:.1f} s")
        print(" | ".join(parts), file=self.stream or sys.stdout, flush=True)


__all__ = ["EpochLines", "build_loggers", "progress_callbacks", "quiet_lightning"]
