"""A training run's folder: :class:`RunDir` is the one place that knows its layout.

::

    <run>/config.yaml             resolved config (written first)
    <run>/split.json              the train/val/test split, for layouts that ship none
    <run>/checkpoints/last.ckpt   Lightning checkpoint, every epoch (what a resume continues)
    <run>/checkpoints/best.ckpt   while training: the best validation epoch's weights so far, as a
                                  model file (no optimiser state); removed once the run finished
    <run>/logs/metrics.csv        training curves (Lightning CSVLogger)
    <run>/model.pt                the selected model (diffmic.models.checkpoint format)
    <run>/metrics.json            val and test metrics (written last: a finished run has it)

A finished run holds the selected model once (``model.pt``) and one resumable checkpoint
(``last.ckpt``); :meth:`RunDir.resolve_checkpoint` reads the ``best.ckpt`` path of a finished run
as its ``model.pt``.

It sits above ``data`` and ``models`` (it rebuilds a run's data and loads its model) and below
``evaluation`` and ``training``, which both read runs.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from diffmic.config import DataConfig, DiffMICConfig
from diffmic.config import replace as replace_config
from diffmic.data.base import DataBundle
from diffmic.data.splits import SPLIT_FILE_NAME
from diffmic.errors import CheckpointError, DataError, DiffMICError, first_line
from diffmic.models.checkpoint import load_checkpoint_payload, model_from_payload
from diffmic.models.diffmic import DiffMIC

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last"  # Lightning file stems inside CHECKPOINT_DIR (".ckpt" added by Lightning)
BEST_CHECKPOINT = "best"
LOG_DIR = "logs"
LOG_FILE = "metrics.csv"


@dataclass(frozen=True)
class RunDir:
    """A run folder (which need not exist yet): its paths, and readers of what a run wrote."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    # ------------------------------------------------------------------ paths
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def split_file(self) -> Path:
        return self.path / SPLIT_FILE_NAME

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / f"{LAST_CHECKPOINT}.ckpt"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoint_dir / f"{BEST_CHECKPOINT}.ckpt"

    @property
    def log_file(self) -> Path:
        return self.path / LOG_DIR / LOG_FILE

    # ------------------------------------------------------------------ state
    @property
    def is_finished(self) -> bool:
        """Training and the final evaluation completed (``metrics.json`` is written last)."""
        return self.metrics_file.is_file()

    @property
    def is_resumable(self) -> bool:
        """Killed after at least one epoch: a ``last.ckpt`` and no ``metrics.json``."""
        return self.last_checkpoint.is_file() and not self.is_finished

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunDir | None:
        """The run a checkpoint file belongs to (``run/model.pt``, ``run/checkpoints/x.ckpt``), if any."""
        checkpoint = Path(checkpoint)
        for folder in (checkpoint.parent, checkpoint.parent.parent):
            if (folder / CONFIG_FILE).is_file():
                return cls(folder)
        return None

    @staticmethod
    def resolve_checkpoint(path: str | Path) -> Path:
        """``path``, except that the removed ``checkpoints/best.ckpt`` of a finished run is its ``model.pt``.

        A finished run keeps the selected model once, as ``model.pt`` (the weights ``best.ckpt``
        held, with the temperature fitted after training); commands given the old path read it.
        """
        path = Path(path)
        if path.exists():
            return path
        run = RunDir.of_checkpoint(path)
        if run is not None and path.absolute() == run.best_checkpoint.absolute() and run.is_finished \
                and run.model_file.is_file():
            log.info("%s was removed when the run finished; reading the selected model %s", path, run.model_file)
            return run.model_file
        return path

    # ------------------------------------------------------------------ readers
    def load_config(self) -> DiffMICConfig:
        """The run's own config, with the run's ``split.json`` (if any) as its split file."""
        if not self.config_file.is_file():
            raise CheckpointError(f"{self.path} is not a diffmic run folder (no {CONFIG_FILE})")
        cfg = DiffMICConfig.from_yaml(self.config_file)
        if cfg.data.split_file is None and self.split_file.is_file():
            # the split the run was trained on, not a new one
            cfg = replace_config(cfg, data={"split_file": str(self.split_file)})
        return cfg

    def load_model(self) -> tuple[DiffMIC, dict[str, Any]]:
        """The selected model and its checkpoint's ``extra`` dict, reading ``model.pt`` once."""
        if not self.model_file.is_file():
            raise CheckpointError(f"{self.model_file} not found: {self.path} is not a finished diffmic run folder")
        payload = load_checkpoint_payload(self.model_file)
        model = model_from_payload(payload, source=self.model_file)
        extra = payload.get("extra") or {}
        return model, extra if isinstance(extra, dict) else {}

    def metrics(self) -> dict[str, Any]:
        """``metrics.json``, or ``{}`` when it is missing or unreadable (logged)."""
        path = self.metrics_file
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable (%s); its fields are left out of the report", path,
                        type(exc).__name__)
            return {}
        return data if isinstance(data, dict) else {}

    def data_config(self, model: DiffMIC) -> DataConfig:
        """The data config ``model`` was trained with, on the run's own split."""
        return model_data_config(model, split_file=self.split_file if self.split_file.is_file() else None)

    def rebuild_data(self, model: DiffMIC) -> DataBundle:
        """The run's dataset, read again from the model's stored config and the run's ``split.json``."""
        return build_model_data(self.data_config(model), context=f"the data of {self.path}")

    def read_log(self) -> dict[str, list[tuple[float, float]]]:
        """The training curves of ``logs/metrics.csv`` (see :func:`read_metrics_csv`)."""
        return read_metrics_csv(self.log_file)


def model_data_config(
    model: DiffMIC,
    *,
    path: str | None = None,
    format: str | None = None,
    split_file: str | Path | None = None,
) -> DataConfig:
    """The data config stored in ``model``, at the model's input size and channels.

    ``path`` / ``format``: another dataset (its own class names are then used). ``split_file``:
    the split to reuse when the stored config names none (the run's ``split.json``).
    """
    stored = DiffMICConfig.from_dict(model.config, source="checkpoint config").data
    changes: dict[str, Any] = {"image_size": model.image_size, "channels": model.in_chans}
    if path:
        changes.update(path=path, class_names=None)  # another dataset: its own class count and names
    if format:
        changes["format"] = format
    if not path and stored.split_file is None and split_file is not None:
        changes["split_file"] = str(split_file)
    return replace(stored, **changes)


def build_model_data(data_cfg: DataConfig, *, context: str = "the data") -> DataBundle:
    """``build_data`` with one-line errors naming what was being read."""
    from diffmic.data.registry import build_data

    try:
        return build_data(data_cfg)
    except DiffMICError as exc:
        raise DataError(f"cannot rebuild {context}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - an unreadable file may raise anything
        raise DataError(f"{data_cfg.path}: unreadable dataset ({first_line(exc, 200)})") from None


def find_resumable(out_dir: str | Path, *, run_name: str | None, prefix: str) -> RunDir | None:
    """The run ``--resume auto`` continues: ``out_dir/run_name`` if named, else the newest unfinished run.

    Unnamed runs must also be of the same dataset (their folder name starts with ``prefix``).
    """
    if run_name:
        run = RunDir(Path(out_dir) / run_name)
        return run if run.is_resumable else None
    out = Path(out_dir)
    if not out.is_dir():
        return None
    runs = [RunDir(d) for d in out.iterdir() if d.is_dir() and d.name.startswith(prefix)]
    runs = [r for r in runs if r.is_resumable]
    return max(runs, key=lambda r: r.last_checkpoint.stat().st_mtime, default=None)


def read_metrics_csv(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """Read a Lightning ``CSVLogger`` ``metrics.csv`` into ``{column: [(epoch, value), ...]}``.

    Empty, non-numeric and non-finite cells are skipped, as is the placeholder ``val/select``
    value -1 logged before diffusion training; rows without an epoch use their step. Columns
    without any value are left out.
    """
    out: dict[str, list[tuple[float, float]]] = {}
    with Path(path).open(newline="") as fh:
        for row in csv.DictReader(fh):
            x = _number(row.get("epoch"))
            if x is None:
                x = _number(row.get("step"))
            if x is None:
                continue
            for key, cell in row.items():
                if key in (None, "epoch", "step"):
                    continue
                v = _number(cell)
                if v is None or (key == "val/select" and v == -1.0):
                    continue
                out.setdefault(key, []).append((x, v))
    return out


def _number(cell: Any) -> float | None:
    if cell is None or isinstance(cell, list):
        return None
    try:
        v = float(str(cell).strip())
    except ValueError:
        return None
    return v if math.isfinite(v) else None


__all__ = ["RunDir", "build_model_data", "find_resumable", "model_data_config", "read_metrics_csv"]
