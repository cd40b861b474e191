"""Dataset-level metrics against scikit-learn and a hand-written ECE."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from diffmic.evaluation.metrics import (
    METRIC_NAMES,
    classification_metrics,
    confusion_matrix,
    per_class_table,
)


def random_case(seed: int, C: int, N: int = 300, skill: float = 1.5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, N)
    logits = rng.normal(size=(N, C))
    logits[np.arange(N), labels] += skill * rng.random(N)  # informative but imperfect
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, labels


def ece_numpy(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    conf = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return total


def run(probs, labels, C, **kw):
    return classification_metrics(torch.tensor(probs, dtype=torch.float32), torch.tensor(labels), C, **kw)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("C", [2, 5])
def test_metrics_match_sklearn(seed, C):
    probs, labels = random_case(seed, C)
    preds = probs.argmax(1)
    out = run(probs, labels, C)
    assert set(out) == set(METRIC_NAMES)
    assert out["acc"] == pytest.approx(skm.accuracy_score(labels, preds), abs=1e-6)
    assert out["balanced_acc"] == pytest.approx(skm.balanced_accuracy_score(labels, preds), abs=1e-6)
    assert out["f1"] == pytest.approx(skm.f1_score(labels, preds, average="macro"), abs=1e-5)
    assert out["qwk"] == pytest.approx(skm.cohen_kappa_score(labels, preds, weights="quadratic"), abs=1e-5)
    if C == 2:
        auc = skm.roc_auc_score(labels, probs[:, 1])
    else:
        auc = skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert out["auroc"] == pytest.approx(auc, abs=1e-5)
    assert out["ece"] == pytest.approx(ece_numpy(probs, labels, 15), abs=1e-5)
    # the metrics are not all trivially equal (guards against one value copied into all keys)
    assert len({round(v, 6) for v in out.values()}) >= 4


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("C", [2, 5])
def test_confusion_matrix_and_per_class_table_match_sklearn(seed, C):
    probs, labels = random_case(seed + 10, C, N=200, skill=1.0)
    preds = probs.argmax(1)
    cm = confusion_matrix(torch.tensor(probs), torch.tensor(labels), C)
    assert cm == skm.confusion_matrix(labels, preds, labels=list(range(C))).tolist()
    names = [f"class{i}" for i in range(C)]
    table = per_class_table(torch.tensor(probs), torch.tensor(labels), names)
    p, r, f, s = skm.precision_recall_fscore_support(labels, preds, labels=list(range(C)), zero_division=0)
    assert [row["class"] for row in table] == names
    for i, row in enumerate(table):
        assert row["precision"] == pytest.approx(p[i], abs=1e-9)
        assert row["recall"] == pytest.approx(r[i], abs=1e-9)
        assert row["f1"] == pytest.approx(f[i], abs=1e-9)
        assert row["support"] == s[i]


def test_per_class_table_zero_division():
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0]])
    labels = torch.tensor([0, 1])
    table = per_class_table(probs, labels, ["a", "b", "c"])
    assert table[1] == {"class": "b", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert table[2]["support"] == 0 and table[2]["precision"] == 0.0
    assert table[0]["precision"] == 0.5 and table[0]["recall"] == 1.0


@pytest.mark.parametrize("n_bins", [5, 15])
def test_ece_handwritten(n_bins):
    probs, labels = random_case(7, 4, N=500)
    assert run(probs, labels, 4, n_bins=n_bins)["ece"] == pytest.approx(ece_numpy(probs, labels, n_bins), abs=1e-5)


def test_ece_perfectly_calibrated_and_overconfident():
    # all predictions correct with confidence 1 -> ECE 0; all wrong with confidence 1 -> ECE 1
    probs = np.eye(3)[[0, 1, 2, 0]]
    assert run(probs, np.array([0, 1, 2, 0]), 3)["ece"] == pytest.approx(0.0, abs=1e-6)
    assert run(probs, np.array([1, 2, 0, 1]), 3)["ece"] == pytest.approx(1.0, abs=1e-6)


def test_dataset_level_qwk_differs_from_mean_of_batch_qwk():
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    preds = np.array([0, 1, 1, 2, 2, 3, 3, 3])
    probs = np.eye(4)[preds] * 0.7 + 0.075
    dataset = skm.cohen_kappa_score(labels, preds, weights="quadratic")
    batches = [slice(0, 4), slice(4, 8)]
    per_batch = np.mean([skm.cohen_kappa_score(labels[b], preds[b], weights="quadratic") for b in batches])
    assert abs(dataset - per_batch) > 0.05  # the crafted example really separates them
    out = run(probs, labels, 4)
    assert out["qwk"] == pytest.approx(dataset, abs=1e-5)
    assert out["qwk"] != pytest.approx(per_batch, abs=1e-3)


def test_auroc_with_absent_class_is_finite_over_present_classes():
    rng = np.random.default_rng(0)
    C = 4
    labels = rng.choice([0, 1, 3], size=120)  # class 2 absent
    probs = rng.dirichlet(np.ones(C), size=120)
    probs[np.arange(120), labels] += 0.3
    probs /= probs.sum(1, keepdims=True)
    out = run(probs, labels, C)
    assert math.isfinite(out["auroc"])
    expected = np.mean([skm.roc_auc_score(labels == c, probs[:, c]) for c in (0, 1, 3)])
    assert out["auroc"] == pytest.approx(expected, abs=1e-5)
    for k in ("acc", "balanced_acc", "f1", "qwk", "ece"):
        assert math.isfinite(out[k]), k


def test_auroc_single_class_is_nan_not_crash():
    probs = np.full((5, 3), 1 / 3)
    out = run(probs, np.zeros(5, dtype=int), 3)
    assert math.isnan(out["auroc"])


def test_empty_split_raises():
    with pytest.raises(ValueError):
        classification_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 3)


def test_perfect_predictions():
    labels = np.array([0, 1, 2, 3, 4, 0, 1])
    probs = np.eye(5)[labels] * 0.96 + 0.01
    out = run(probs, labels, 5)
    for k in ("acc", "balanced_acc", "f1", "qwk", "auroc"):
        assert out[k] == pytest.approx(1.0, abs=1e-6), k
