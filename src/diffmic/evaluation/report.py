"""Evaluate a model on a split: DCG prior alone and diffusion output, written as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffmic._io import atomic_write_text
from diffmic.data.base import ImageArray
from diffmic.diffusion.readout import READOUTS, readout_probs
from diffmic.evaluation.calibration import DEFAULT_COVERAGES, uncertainty_summary
from diffmic.evaluation.metrics import classification_metrics, confusion_matrix, per_class_table
from diffmic.models.diffmic import DiffMIC


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
    model.eval()
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
            feats, prior, samples=samples, path="mean_path" in readouts,
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
        },
        calibration=calibration,
        calibrated_on=calibration_split,
        readouts=all_probs if compare_readouts else None,
    )
