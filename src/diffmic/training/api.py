"""``train(cfg)``: the function the CLI calls. Build, fit, select on validation, test, export."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffmic._io import atomic_write_text
from diffmic.config import DiffMICConfig
from diffmic.config import replace as replace_config
from diffmic.data.base import DataBundle
from diffmic.data.registry import build_data
from diffmic.errors import CheckpointError, DataError
from diffmic.models.checkpoint import load_checkpoint_payload, model_from_payload, save_model
from diffmic.models.diffmic import DiffMIC
from diffmic.runs import RunDir, find_resumable

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Where a finished run put its outputs, and its test metrics.

    ``model_path`` is the selected model; ``checkpoint`` the run's resumable Lightning checkpoint
    (``last.ckpt``, the last epoch's full training state).
    """

    run_dir: Path
    model_path: Path
    checkpoint: Path
    metrics: dict[str, Any]


def make_run_dir(cfg: DiffMICConfig) -> Path:
    """``<out_dir>/<run_name>`` (not created); the default name is ``<data file stem>-<timestamp>``."""
    name = cfg.train.run_name or f"{Path(cfg.data.path).stem or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.train.out_dir) / name


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _check_data(data: DataBundle) -> None:
    if len(data.train) == 0:
        raise DataError(f"{data.source}: the training split is empty")
    if len(data.val) == 0:
        raise DataError(
            f"{data.source}: the validation split is empty; model selection needs one "
            "(set data.val_fraction > 0 for layouts without a split)"
        )
    if data.num_classes < 2:
        raise DataError(f"{data.source}: need at least 2 classes, found {data.num_classes}")


def _strategy(t: Any) -> Any:
    """DDP needs ``find_unused_parameters``: each manual backward reaches only the denoiser or the DCG."""
    if t.strategy not in ("ddp", "ddp_spawn"):
        return t.strategy
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(
        find_unused_parameters=True,
        start_method="spawn" if t.strategy == "ddp_spawn" else "popen",
        process_group_backend="gloo" if t.accelerator == "cpu" else None,
    )


def _checkpoint_epoch(path: Path) -> int:
    """Epochs completed in a Lightning checkpoint; one clear error if it cannot be read."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the file is unusable
        raise CheckpointError(f"{path}: cannot resume from this checkpoint ({type(exc).__name__})") from None
    try:
        return int(payload["epoch"]) + 1
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: not a Lightning training checkpoint (no epoch)") from None


def find_resumable_run(cfg: DiffMICConfig) -> Path | None:
    """The run ``--resume auto`` continues: ``out_dir/run_name`` if named, else the newest unfinished run.

    A run is unfinished when it has ``checkpoints/last.ckpt`` but no ``metrics.json``. Unnamed runs
    must also be of the same dataset (their folder name starts with its stem).
    """
    prefix = f"{Path(cfg.data.path).stem or 'run'}-"
    run = find_resumable(cfg.train.out_dir, run_name=cfg.train.run_name, prefix=prefix)
    return run.path if run is not None else None


def resume(run_dir: str | Path, *, data: DataBundle | None = None, callbacks: list[Any] | None = None) -> TrainResult:
    """Continue a killed run from ``run_dir/checkpoints/last.ckpt`` with the run's own config.

    Model, DCG, EMA, optimisers, RNG states, epoch and step, checkpoint selection state and the
    CSV logs all continue where the last completed epoch left them.
    """
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise CheckpointError(f"run folder not found: {run.path}")
    if not run.config_file.is_file():
        raise CheckpointError(f"{run.path} is not a diffmic run folder (no {run.config_file.name})")
    if run.is_finished:
        raise CheckpointError(f"{run.path} already finished ({run.metrics_file.name} exists); nothing to resume")
    if not run.last_checkpoint.is_file():
        raise CheckpointError(
            f"{run.last_checkpoint} not found: the run stopped before its first epoch ended; start it again instead"
        )
    cfg = run.load_config()  # with the split the run was trained on
    return train(cfg, run_dir=run.path, data=data, callbacks=callbacks, _resume_from=run.last_checkpoint)


def fit_path_temperature(model: DiffMIC, val: Any, *, batch_size: int = 256) -> float:
    """Fit the mean-path readout's temperature on the validation split and set it on ``model``.

    softmax(y_0 / T) with T minimising the validation NLL (accuracy does not change).
    """
    from diffmic.evaluation.calibration import fit_temperature
    from diffmic.evaluation.report import predict_readouts

    model.temperature = 1.0
    probs, _, labels = predict_readouts(model, val, readouts=("mean_path",), batch_size=batch_size)
    model.temperature = float(fit_temperature(probs["mean_path"], labels, kind="probs"))
    # The stored config is what a loaded checkpoint is built from: it carries the fitted value.
    model.config = {**model.config, "eval": {**model.config.get("eval", {}), "temperature": model.temperature}}
    return model.temperature


def train(
    cfg: DiffMICConfig,
    *,
    run_dir: str | Path | None = None,
    data: DataBundle | None = None,
    callbacks: list[Any] | None = None,
    _resume_from: Path | None = None,
) -> TrainResult:
    """Train DiffMIC, select the checkpoint on the validation split, evaluate on the test split.

    Writes into the run directory: ``config.yaml`` (resolved), ``split.json`` (when the layout
    has no split), ``checkpoints/last.ckpt`` (the resumable Lightning checkpoint, written
    atomically at the end of every epoch), ``checkpoints/best.ckpt`` (while training: the best
    validation epoch's weights as a model file, no optimiser state), ``model.pt`` (the selected
    model, EMA weights), ``metrics.json`` (val and test, DCG and diffusion) and ``logs/`` (CSV
    training curves). Once ``metrics.json`` is written ``best.ckpt`` is removed: ``model.pt`` is
    that model (:meth:`diffmic.runs.RunDir.resolve_checkpoint` maps the old path to it). A killed
    run is continued with :func:`resume`. ``callbacks`` are extra Lightning callbacks.
    """
    import lightning as L

    from diffmic.evaluation.report import calibration_comparison, evaluate
    from diffmic.training.checkpointing import (
        AtomicCheckpointIO,
        RelocatableModelCheckpoint,
        remove_partial_files,
        selected_model_payload,
    )
    from diffmic.training.datamodule import ArrayDataModule
    from diffmic.training.loggers import build_loggers, progress_callbacks, quiet_lightning
    from diffmic.training.module import DiffMICModule

    cfg = DiffMICConfig.from_dict(cfg.to_dict())  # private copy: the caller's config is not changed
    run_dir = Path(run_dir) if run_dir is not None else make_run_dir(cfg)
    run = RunDir(run_dir)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    if data is None:
        data = build_data(cfg.data, run_dir)
    _check_data(data)
    resume_epoch = _checkpoint_epoch(_resume_from) if _resume_from is not None else None
    loggers = build_loggers(cfg.train, run_dir, resume_epoch)  # a missing logger package fails before any file
    if cfg.data.class_names is None:
        cfg = replace_config(cfg, data={"class_names": list(data.class_names)})
    model_args = {
        "num_classes": data.num_classes,
        "in_chans": data.channels,
        "image_size": data.image_size,
        "class_names": list(data.class_names),
    }
    module = DiffMICModule(cfg.to_dict(), model_args)  # an unknown backbone fails here, before any file
    run_dir.mkdir(parents=True, exist_ok=True)  # only once the data and the network are known to be usable
    if _resume_from is None:
        cfg.save(run.config_file)
    else:
        removed = remove_partial_files(run.checkpoint_dir)
        log.info("resuming %s from %s (epoch %d)%s", run_dir, _resume_from, resume_epoch,
                 f"; removed {len(removed)} partial file(s)" if removed else "")
    dm = ArrayDataModule(data, batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size,
                         num_workers=cfg.data.num_workers)
    # The best epoch's weights only (written as a model file by AtomicCheckpointIO): resuming needs
    # last.ckpt alone, and model.pt is made of these weights.
    ckpt = RelocatableModelCheckpoint(
        dirpath=run.checkpoint_dir, filename=run.best_checkpoint.stem, monitor="val/select", mode="max",
        save_top_k=1, save_last=False, save_weights_only=True, enable_version_counter=False,
    )
    # Every epoch (Lightning's save_last only writes when the best checkpoint improved).
    last = RelocatableModelCheckpoint(dirpath=run.checkpoint_dir, filename=run.last_checkpoint.stem, monitor=None,
                                      save_top_k=1, every_n_epochs=1, enable_version_counter=False)
    callbacks = [ckpt, last, *(callbacks or [])]
    progress, progress_bar = progress_callbacks(cfg.train)  # bars in a terminal, a line per epoch otherwise
    callbacks += progress
    quiet_lightning()
    t = cfg.train
    trainer = L.Trainer(
        max_epochs=t.dcg_pretrain_epochs + t.epochs,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=_strategy(t),
        plugins=[AtomicCheckpointIO(model_files=(run.best_checkpoint,))],
        precision=t.precision,  # type: ignore[arg-type]
        callbacks=callbacks,
        logger=loggers,
        default_root_dir=run_dir,
        num_sanity_val_steps=0,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        log_every_n_steps=1,
        check_val_every_n_epoch=1,
    )
    start = time.time()
    trainer.fit(module, datamodule=dm, ckpt_path=_resume_from)
    fit_seconds = time.time() - start
    if trainer.global_rank != 0:
        return TrainResult(run_dir, run.model_file, run.last_checkpoint, {})

    best = Path(ckpt.best_model_path) if ckpt.best_model_path else Path(last.best_model_path)
    payload, selected_epoch = selected_model_payload(load_checkpoint_payload(best), best)
    model = model_from_payload(payload, source=best)
    e = cfg.eval
    fitted = fit_path_temperature(model, data.val, batch_size=cfg.data.eval_batch_size) \
        if e.fit_temperature and model.readout == "mean_path" else None
    model_path = run.model_file
    save_model(model, model_path, extra={"selected_epoch": selected_epoch, "git_commit": _git_commit(),
                                         "fitted_temperature": fitted})

    reports = {
        split: evaluate(model, data.split(split), split=split, batch_size=cfg.data.eval_batch_size,
                        samples=e.samples, seed=e.seed).to_dict()
        for split in ("val", "test")
    }
    calibration = calibration_comparison(model, data.val, data.test, batch_size=cfg.data.eval_batch_size)
    metrics = {
        "dataset": data.source,
        "class_names": data.class_names,
        "selected_epoch": selected_epoch,
        "select_metric": f"val/{t.select_metric}",
        "readout": model.readout,
        "temperature": model.temperature,
        "temperature_fitted_on_val": fitted is not None,
        "fit_seconds": round(fit_seconds, 1),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "git_commit": _git_commit(),
        **reports,
        "calibration_test": calibration,  # diffusion and prior, each temperature-scaled on val
    }
    atomic_write_text(run.metrics_file, json.dumps(metrics, indent=2))
    # The run is finished (nothing can resume it any more): keep the selected model once, as model.pt.
    run.best_checkpoint.unlink(missing_ok=True)
    return TrainResult(run_dir, model_path, run.last_checkpoint, metrics)
