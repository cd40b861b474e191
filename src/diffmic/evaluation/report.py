"""Evaluate a model on a split: DCG prior alone and diffusion output, written as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffmic.data.base import ImageArray
from diffmic.evaluation.metrics import classification_metrics, confusion_matrix, per_class_table
from diffmic.models.diffmic import DiffMIC


@dataclass
class EvalReport:
    """Metrics of the DCG prior and of the diffusion output on one split."""

    split: str
    num_images: int
    class_names: list[str]
    guidance: dict[str, float]
    diffusion: dict[str, float]
    per_class: list[dict[str, Any]]
    confusion_matrix: list[list[int]]
    guidance_confusion_matrix: list[list[int]]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            p = Path(path)
            tmp = p.with_name(p.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(p)
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
) -> EvalReport:
    """Dataset-level metrics for the DCG prior and the diffusion output on ``data``."""
    probs, priors, labels = predict_split(
        model, data, batch_size=batch_size, samples=samples, seed=seed, sampler=sampler, num_steps=num_steps
    )
    c = model.num_classes
    return EvalReport(
        split=split,
        num_images=len(labels),
        class_names=model.class_names,
        guidance=classification_metrics(priors, labels, c),
        diffusion=classification_metrics(probs, labels, c),
        per_class=per_class_table(probs, labels, model.class_names),
        confusion_matrix=confusion_matrix(probs, labels, c),
        guidance_confusion_matrix=confusion_matrix(priors, labels, c),
        settings={
            "samples": samples,
            "seed": seed,
            "sampler": sampler or model.sampler,
            "sampling_steps": num_steps or model.sampling_steps,
            "temperature": model.temperature,
        },
    )
