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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["uncertainty"] is None:  # the JSON of an uncalibrated report is unchanged
            del d["uncertainty"]
        return d

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            p = Path(path)
            atomic_write_text(p, text)
        return text


@torch.no_grad()
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
    """Run the model over a split: returns (diffusion probs, prior probs, labels), all (N, ...)."""
    model.eval()
    device = model.mean.device
    gen = torch.Generator(device=device).manual_seed(seed)
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2)
    probs, priors = [], []
    for chunk in images.split(batch_size):
        x = model.normalize(chunk.to(device).float() / 255.0)
        out = model(x, samples=samples, generator=gen, sampler=sampler, num_steps=num_steps)
        probs.append(out.probs.cpu())
        priors.append(out.prior.cpu())
    return torch.cat(probs), torch.cat(priors), torch.from_numpy(data.labels).long()


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
) -> EvalReport:
    """Dataset-level metrics for the DCG prior and the diffusion output on ``data``.

    ``calibrate_on``: the validation split (an :class:`ImageArray`, predicted with the same
    settings, or its ``(diffusion probs, labels)``). When given, the report gets an
    ``uncertainty`` section: ECE / NLL before and after temperature scaling with T fitted on
    ``calibrate_on`` only, AURC and accuracy at 100/90/80/70/50 % coverage on ``data``.
    """
    probs, priors, labels = predict_split(
        model, data, batch_size=batch_size, samples=samples, seed=seed, sampler=sampler, num_steps=num_steps
    )
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
        },
        calibration=calibration,
        calibrated_on=calibration_split,
    )
