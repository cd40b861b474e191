"""Dataset-level classification metrics (torchmetrics), never per-batch averages."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_auroc,
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_calibration_error,
    multiclass_cohen_kappa,
    multiclass_confusion_matrix,
    multiclass_f1_score,
)

METRIC_NAMES = ("acc", "balanced_acc", "f1", "qwk", "auroc", "ece")


def classification_metrics(probs: Tensor, labels: Tensor, num_classes: int, *, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro-F1, quadratic-weighted kappa, macro OvR AUROC and ECE.

    Args:
        probs: class probabilities (N, C), rows summing to 1.
        labels: true classes (N,).
        num_classes: C.
        n_bins: ECE bins (L1 calibration error, equal-width confidence bins).
    """
    probs = probs.detach().float().cpu()
    labels = labels.detach().long().cpu()
    if len(labels) == 0:
        raise ValueError("cannot compute metrics on an empty split")
    c = num_classes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {
            "acc": multiclass_accuracy(probs, labels, c, average="micro"),
            "balanced_acc": multiclass_accuracy(probs, labels, c, average="macro"),
            "f1": multiclass_f1_score(probs, labels, c, average="macro"),
            "qwk": multiclass_cohen_kappa(probs, labels, c, weights="quadratic"),
            "auroc": _auroc(probs, labels, c),
            "ece": multiclass_calibration_error(probs, labels, c, n_bins=n_bins, norm="l1"),
        }
    return {k: float(v) for k, v in out.items()}


def _auroc(probs: Tensor, labels: Tensor, c: int) -> Tensor:
    """Macro one-vs-rest AUROC over the classes present in ``labels`` (NaN if fewer than 2)."""
    present = torch.unique(labels)
    if len(present) < 2:
        return torch.tensor(float("nan"))
    if c == 2:  # the positive class's score, as sklearn and medmnist define it; the mean of the two
        # one-vs-rest AUCs is the same number in exact arithmetic but not under float32 near-ties
        return binary_auroc(probs[:, 1], labels)
    if len(present) == c:
        return multiclass_auroc(probs, labels, c, average="macro")
    per_class = multiclass_auroc(probs, labels, c, average="none")
    return per_class[present].mean()


def per_class_table(probs: Tensor, labels: Tensor, class_names: list[str]) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support per class, from the dataset-level confusion matrix."""
    cm = torch.tensor(confusion_matrix(probs, labels, len(class_names)), dtype=torch.float64)
    rows = []
    for i, name in enumerate(class_names):
        tp = float(cm[i, i])
        support = float(cm[i].sum())
        predicted = float(cm[:, i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": name, "precision": precision, "recall": recall, "f1": f1, "support": int(support)})
    return rows


def confusion_matrix(probs: Tensor, labels: Tensor, num_classes: int) -> list[list[int]]:
    """Rows = true class, columns = predicted class."""
    cm = multiclass_confusion_matrix(probs.detach().float().cpu(), labels.detach().long().cpu(), num_classes)
    return [[int(v) for v in row] for row in cm.tolist()]


__all__ = ["METRIC_NAMES", "classification_metrics", "confusion_matrix", "per_class_table"]
