"""Evaluate a model on a split: DCG prior alone and diffusion output, written as JSON.

:func:`evaluate` takes a model and a split; :func:`evaluate_checkpoint` and :func:`evaluate_run`
also find the data (the run's own split) and keep the predictions for figures.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffmic._io import atomic_write_text
from diffmic.config import DiffMICConfig
from diffmic.data.base import DataBundle, ImageArray
from diffmic.data.registry import build_data
from diffmic.diffusion.readout import READOUTS, readout_probs
from diffmic.errors import DataError
from diffmic.evaluation.calibration import DEFAULT_COVERAGES, uncertainty_summary
from diffmic.evaluation.metrics import classification_metrics, confusion_matrix, per_class_table
from diffmic.models.checkpoint import load_model
from diffmic.models.diffmic import DiffMIC
from diffmic.models.modes import eval_mode
from diffmic.runs import RunDir, model_data_config


@dataclass
class EvalReport:
    """Metrics of the DCG prior and of the diffusion output on one split.

    ``uncertainty`` (only when calibration was requested, else None and left out of
    :meth:`to_dict`): calibration of the diffusion probabilities before/after temperature scaling
    fitted on another split, and selective-prediction results
    (:func:`diffmic.evaluation.calibration.uncertainty_summary`, plus ``calibrated_on``).
    """

    split: str
    num_images: int
    class_names: list[str]
    guidance: dict[str, float]
    diffusion: dict[str, float]
    per_class: list[dict[str, Any]]
    confusion_matrix: list[list[int]]
    guidance_confusion_matrix: list[list[int]]
    settings: dict[str, Any] = field(default_factory=dict)
    uncertainty: dict[str, Any] | None = None
    readouts: dict[str, dict[str, float]] | None = None  # metrics of every readout, side by side

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("uncertainty", "readouts"):
            if d[key] is None:  # left out when not requested
                del d[key]
        return d

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            p = Path(path)
            atomic_write_text(p, text)
        return text


@torch.no_grad()
def predict_readouts(
    model: DiffMIC,
    data: ImageArray,
    *,
    readouts: tuple[str, ...] = READOUTS,
    batch_size: int = 256,
    samples: int = 1,
    seed: int = 0,
    sampler: str | None = None,
    num_steps: int | None = None,
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Run the model over a split: ({readout: diffusion probs}, prior probs, labels), all (N, ...).

    Features, the ``samples`` chains and the mean path are computed once per batch and shared by
    the readouts (the chains only when a readout other than ``mean_path`` is asked for).
    """
    with eval_mode(model):
        device = model.mean.device
        gen = torch.Generator(device=device).manual_seed(seed)
        images = torch.from_numpy(data.images).permute(0, 3, 1, 2)
        probs: dict[str, list[Tensor]] = {r: [] for r in readouts}
        priors = []
        for chunk in images.split(batch_size):
            x = model.normalize(chunk.to(device).float() / 255.0)
            guide = model.guidance(x)
            prior = guide.logits.softmax(dim=1)
            feats = model.encode(x, guide)
            chains, path = model.run_chains(
                feats, model.diffusion_prior(prior), samples=samples, path="mean_path" in readouts,
                chains=any(r != "mean_path" for r in readouts), generator=gen, sampler=sampler, num_steps=num_steps,
            )
            for r in readouts:
                probs[r].append(readout_probs(r, temperature=model.temperature, chains=chains, path=path).cpu())
            priors.append(prior.cpu())
    return {r: torch.cat(p) for r, p in probs.items()}, torch.cat(priors), torch.from_numpy(data.labels).long()


def predict_split(
    model: DiffMIC,
    data: ImageArray,
    *,
    batch_size: int = 256,
    samples: int = 1,
    seed: int = 0,
    sampler: str | None = None,
    num_steps: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the model over a split: (probs of the model's readout, prior probs, labels), all (N, ...)."""
    probs, priors, labels = predict_readouts(
        model, data, readouts=(model.readout,), batch_size=batch_size, samples=samples, seed=seed,
        sampler=sampler, num_steps=num_steps,
    )
    return probs[model.readout], priors, labels


def build_report(
    probs: Tensor,
    priors: Tensor,
    labels: Tensor,
    class_names: list[str],
    *,
    split: str = "test",
    settings: dict[str, Any] | None = None,
    calibration: tuple[Tensor, Tensor] | None = None,
    calibrated_on: str = "val",
    coverages: tuple[float, ...] = DEFAULT_COVERAGES,
    readouts: dict[str, Tensor] | None = None,
) -> EvalReport:
    """An :class:`EvalReport` from predictions already made (see :func:`predict_split`).

    Args:
        probs, priors, labels: diffusion probabilities (N, C), DCG prior (N, C), labels (N,).
        class_names: the C class names.
        split: name of the evaluated split.
        settings: inference settings recorded in the report.
        calibration: (probabilities, labels) of the split the temperature is fitted on (the
            validation split), or None for no ``uncertainty`` section.
        calibrated_on: name of that split, recorded in the report.
        coverages: coverages at which the selective accuracy is reported.
        readouts: probabilities of several readouts ({name: (N, C)}), reported side by side.
    """
    c = len(class_names)
    uncertainty = None
    if calibration is not None:
        val_probs, val_labels = calibration
        if len(val_labels) == 0:
            raise ValueError(f"the calibration split ({calibrated_on}) is empty")
        uncertainty = {"calibrated_on": calibrated_on,
                       **uncertainty_summary(probs, labels, val_probs, val_labels, coverages=coverages)}
    return EvalReport(
        split=split,
        num_images=len(labels),
        class_names=list(class_names),
        guidance=classification_metrics(priors, labels, c),
        diffusion=classification_metrics(probs, labels, c),
        per_class=per_class_table(probs, labels, list(class_names)),
        confusion_matrix=confusion_matrix(probs, labels, c),
        guidance_confusion_matrix=confusion_matrix(priors, labels, c),
        settings=dict(settings or {}),
        uncertainty=uncertainty,
        readouts=None if readouts is None else {r: classification_metrics(p, labels, c) for r, p in readouts.items()},
    )


def evaluate(
    model: DiffMIC,
    data: ImageArray,
    *,
    split: str = "test",
    batch_size: int = 256,
    samples: int = 1,
    seed: int = 0,
    sampler: str | None = None,
    num_steps: int | None = None,
    calibrate_on: ImageArray | tuple[Tensor, Tensor] | None = None,
    calibration_split: str = "val",
    compare_readouts: bool = True,
) -> EvalReport:
    """Dataset-level metrics for the DCG prior and the diffusion output on ``data``.

    ``calibrate_on``: the validation split (an :class:`ImageArray`, predicted with the same
    settings, or its ``(diffusion probs, labels)``). When given, the report gets an
    ``uncertainty`` section: ECE / NLL before and after temperature scaling with T fitted on
    ``calibrate_on`` only, AURC and accuracy at 100/90/80/70/50 % coverage on ``data``.
    ``compare_readouts``: also report every readout's metrics (``readouts``); the ``diffusion``
    metrics are always those of the model's own readout.
    """
    names = READOUTS if compare_readouts else (model.readout,)
    all_probs, priors, labels = predict_readouts(
        model, data, readouts=names, batch_size=batch_size, samples=samples, seed=seed, sampler=sampler,
        num_steps=num_steps,
    )
    probs = all_probs[model.readout]
    calibration = None
    if isinstance(calibrate_on, ImageArray):
        val_probs, _, val_labels = predict_split(
            model, calibrate_on, batch_size=batch_size, samples=samples, seed=seed, sampler=sampler,
            num_steps=num_steps,
        )
        calibration = (val_probs, val_labels)
    elif calibrate_on is not None:
        calibration = (calibrate_on[0], calibrate_on[1])
    return build_report(
        probs, priors, labels, model.class_names,
        split=split,
        settings={
            "samples": samples,
            "seed": seed,
            "sampler": sampler or model.sampler,
            "sampling_steps": num_steps or model.sampling_steps,
            "temperature": model.temperature,
            "readout": model.readout,
            "chain_noise": model.chain_noise,
        },
        calibration=calibration,
        calibrated_on=calibration_split,
        readouts=all_probs if compare_readouts else None,
    )


def calibration_comparison(
    model: DiffMIC, val: ImageArray, test: ImageArray, *, batch_size: int = 256
) -> dict[str, Any]:
    """Calibration of the diffusion output against its own DCG prior, each temperature-scaled on
    ``val`` and measured on ``test`` (issue #10's calibration target: after scaling on val, the
    diffusion's ECE and AURC are not above the prior's).

    Uses the model's readout with one chain (``mean_path`` is deterministic). For ``mean_path``
    the diffusion's temperature is the model's own (fitted on val after training when
    ``eval.fit_temperature``); otherwise, as for the prior, T is fitted on ``val`` here.
    Returns ``{"diffusion": {...}, "guidance": {...}}``, each with ``temperature``, ``ece``,
    ``nll``, ``aurc`` (test, after scaling) and ``ece_raw`` (test, before).
    """
    from diffmic.evaluation.calibration import (
        apply_temperature,
        aurc,
        expected_calibration_error,
        fit_temperature,
        negative_log_likelihood,
    )

    readout = (model.readout,)
    val_probs, val_prior, val_labels = predict_readouts(model, val, readouts=readout, batch_size=batch_size)
    test_probs, test_prior, test_labels = predict_readouts(model, test, readouts=readout, batch_size=batch_size)
    out: dict[str, Any] = {}
    pairs = {"diffusion": (val_probs[model.readout], test_probs[model.readout]), "guidance": (val_prior, test_prior)}
    for name, (v, t) in pairs.items():
        own = name == "diffusion" and model.readout == "mean_path"  # already softmax(y0 / T_val)
        temp = 1.0 if own else fit_temperature(v, val_labels, kind="probs")
        scaled = t if own else apply_temperature(t, temp)
        out[name] = {
            "temperature": float(model.temperature if own else temp),
            "ece": expected_calibration_error(scaled, test_labels),
            "nll": negative_log_likelihood(scaled, test_labels),
            "aurc": aurc(scaled, test_labels),
            "ece_raw": expected_calibration_error(t, test_labels),
        }
    return out


# ------------------------------------------------------------------ checkpoints and runs
@dataclass
class Evaluation:
    """A report with the predictions behind it (diffusion probs, DCG prior, labels), for figures."""

    report: EvalReport
    probs: Tensor
    priors: Tensor
    labels: Tensor
    data: DataBundle | None = None  # the dataset the split came from


def _settings(model: DiffMIC, samples: int, seed: int, sampler: str | None, num_steps: int | None) -> dict[str, Any]:
    return {"samples": samples, "seed": seed, "sampler": sampler or model.sampler,
            "sampling_steps": num_steps or model.sampling_steps, "temperature": model.temperature,
            "readout": model.readout, "chain_noise": model.chain_noise}


def _check_fits(model: DiffMIC, data: DataBundle, splits: tuple[str, ...], source: str) -> None:
    for split in splits:
        if len(data.split(split)) == 0:
            raise DataError(f"{source}: the {split} split is empty")
    if data.num_classes > model.num_classes:
        raise DataError(f"{source} has {data.num_classes} classes but the checkpoint predicts {model.num_classes}")


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    model: DiffMIC | None = None,
    split: str = "test",
    data_path: str | None = None,
    data_format: str | None = None,
    samples: int | None = None,
    sampler: str | None = None,
    num_steps: int | None = None,
    seed: int = 0,
    calibrate: bool = False,
) -> Evaluation:
    """Evaluate a checkpoint on a split of its own dataset (or of ``data_path``).

    Args:
        checkpoint: the model file; when it lies in a run folder (``run/model.pt``,
            ``run/checkpoints/x.ckpt``), the run's ``split.json`` is reused.
        model: the model already loaded from ``checkpoint`` (needed for a Lightning ``.ckpt``,
            which :func:`diffmic.load_model` reads); default: loaded from the model file.
        split: ``train`` | ``val`` | ``test``.
        data_path, data_format: another dataset than the stored one (its own class names).
        samples: reverse chains per image (default: the stored ``eval.samples``).
        sampler, num_steps: override the model's sampler / number of steps.
        seed: sampling seed.
        calibrate: fit a temperature on the val split and add the ``uncertainty`` section.

    Raises:
        CheckpointError, DataError: one line naming the file.
    """
    if model is None:
        model = load_model(RunDir.resolve_checkpoint(checkpoint))
    run = RunDir.of_checkpoint(checkpoint)
    data_cfg = model_data_config(model, path=data_path, format=data_format,
                                 split_file=run.split_file if run and run.split_file.is_file() else None)
    data = build_data(data_cfg)
    _check_fits(model, data, (split,), data.source)
    if calibrate and len(data.val) == 0:
        raise DataError(f"{data.source}: the val split is empty; calibration fits the temperature on it")
    cfg = DiffMICConfig.from_dict(model.config, source=f"{checkpoint} config")
    samples = samples or cfg.eval.samples
    kw = {"batch_size": cfg.data.eval_batch_size, "samples": samples, "seed": seed, "sampler": sampler,
          "num_steps": num_steps}
    all_probs, priors, labels = predict_readouts(model, data.split(split), **kw)
    probs = all_probs[model.readout]
    calibration = None
    if calibrate:
        val_probs, _, val_labels = predict_split(model, data.val, **kw)
        calibration = (val_probs, val_labels)
    report = build_report(probs, priors, labels, model.class_names, split=split, calibration=calibration,
                          settings=_settings(model, samples, seed, sampler, num_steps), readouts=all_probs)
    return Evaluation(report, probs, priors, labels, data)


@dataclass
class RunEvaluation:
    """A finished run, loaded once, and its val/test evaluation (test calibrated on val)."""

    run: RunDir
    model: DiffMIC
    extra: dict[str, Any]  # the model file's ``extra`` (selected epoch, git commit)
    cfg: DiffMICConfig  # the stored config
    data: DataBundle
    settings: dict[str, Any]
    val: Evaluation
    test: Evaluation


def evaluate_run(
    run: RunDir,
    *,
    data: DataBundle | None = None,
    samples: int | None = None,
    seed: int = 0,
) -> RunEvaluation:
    """Load a finished run's model once, rebuild its data, evaluate val and test.

    ``data``: the run's data when it cannot be rebuilt from the stored config (default: rebuilt
    with the run's ``split.json``). ``samples``: default the run's ``eval.samples``.
    """
    model, extra = run.load_model()
    cfg = DiffMICConfig.from_dict(model.config, source=f"{run.model_file} config")
    if data is None:
        data = run.rebuild_data(model)
    _check_fits(model, data, ("val", "test"), data.source or cfg.data.path)
    samples = samples or cfg.eval.samples
    kw = {"batch_size": cfg.data.eval_batch_size, "samples": samples, "seed": seed}
    settings = _settings(model, samples, seed, None, None)
    names = list(model.class_names)
    val_probs, val_priors, val_labels = predict_split(model, data.val, **kw)
    test_probs, test_priors, test_labels = predict_split(model, data.test, **kw)
    val_rep = build_report(val_probs, val_priors, val_labels, names, split="val", settings=settings)
    test_rep = build_report(test_probs, test_priors, test_labels, names, split="test", settings=settings,
                            calibration=(val_probs, val_labels), calibrated_on="val")
    return RunEvaluation(run, model, extra, cfg, data, settings,
                         Evaluation(val_rep, val_probs, val_priors, val_labels),
                         Evaluation(test_rep, test_probs, test_priors, test_labels))
