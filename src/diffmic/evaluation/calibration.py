"""Dataset-level uncertainty: reliability bins / ECE, temperature scaling, selective prediction.

Pure functions on (N, C) class probabilities (or logits) and (N,) labels; tensors or array-likes
are accepted. Curves come back as float64 numpy arrays, scalars as Python floats.

* :func:`reliability_bins` / :func:`expected_calibration_error`: equal-width confidence bins; the
  ECE is the same number as ``torchmetrics``' ``multiclass_calibration_error(norm="l1")`` (and as the
  ``ece`` of :func:`diffmic.evaluation.metrics.classification_metrics`).
* :func:`fit_temperature` / :func:`apply_temperature`: post-hoc temperature scaling (Guo et al.,
  2017). Fit it on the **validation** split only; probabilities are scaled as logits ``log p``.
* :func:`coverage_curve` / :func:`aurc` / :func:`accuracy_at_coverage`: selective prediction, the
  least confident images referred first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffmic.diffusion.uncertainty import predictive_entropy

DEFAULT_COVERAGES = (1.0, 0.9, 0.8, 0.7, 0.5)
TEMPERATURE_BOUNDS = (0.01, 100.0)


# ---------------------------------------------------------------------- inputs
def _probs(probs: Any, name: str = "probs") -> Tensor:
    p = torch.as_tensor(probs).detach().cpu()
    if p.ndim != 2 or p.shape[1] < 1:
        raise ValueError(f"{name} must be (N, C), got shape {tuple(p.shape)}")
    return p.to(torch.float64) if not p.is_floating_point() else p


def _labels(labels: Any, n: int) -> Tensor:
    y = torch.as_tensor(labels).detach().cpu().long().reshape(-1)
    if len(y) != n:
        raise ValueError(f"got {len(y)} labels for {n} rows of probabilities")
    return y


def _nonempty(n: int) -> None:
    if n == 0:
        raise ValueError("cannot compute calibration on an empty split")


# ----------------------------------------------------------- reliability / ECE
@dataclass
class ReliabilityBins:
    """Equal-width confidence bins: bin ``i`` holds confidences in ``[edges[i], edges[i+1])``
    (the last bin also holds 1.0). ``confidence`` / ``accuracy`` are bin means (0 for empty
    bins), ``count`` the number of images per bin."""

    edges: np.ndarray  # (n_bins + 1,)
    confidence: np.ndarray  # (n_bins,)
    accuracy: np.ndarray  # (n_bins,)
    count: np.ndarray  # (n_bins,) int64

    @property
    def ece(self) -> float:
        """Σ_b (n_b / N) |acc_b − conf_b| over these bins."""
        n = self.count.sum()
        return float((self.count / n * np.abs(self.accuracy - self.confidence)).sum()) if n else 0.0


def _bin_sums(probs: Any, labels: Any, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-slot sums as torchmetrics bins them: slot = bucketize(conf, linspace(0, 1, n_bins + 1),
    right=True) − 1 on float32 confidences, so slot ``n_bins`` holds confidences of exactly 1.0.

    Returns (edges, sum of confidences, number correct, count), the last three of length n_bins + 1.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p = _probs(probs)
    y = _labels(labels, len(p))
    _nonempty(len(y))
    conf32, pred = p.float().max(dim=1)
    correct = pred.eq(y).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32)
    slot = (torch.bucketize(conf32, edges, right=True) - 1).clamp(0, n_bins)
    conf_sum = torch.zeros(n_bins + 1, dtype=torch.float64).scatter_add_(0, slot, conf32.double())
    correct_sum = torch.zeros(n_bins + 1, dtype=torch.float64).scatter_add_(0, slot, correct)
    count = torch.zeros(n_bins + 1, dtype=torch.float64).scatter_add_(0, slot, torch.ones_like(correct))
    return edges.double().numpy(), conf_sum.numpy(), correct_sum.numpy(), count.numpy()


def reliability_bins(probs: Any, labels: Any, n_bins: int = 15) -> ReliabilityBins:
    """Mean confidence (max probability), accuracy and count of the images in each of ``n_bins``
    equal-width confidence bins over [0, 1]."""
    edges, conf_sum, correct_sum, count = _bin_sums(probs, labels, n_bins)
    # torchmetrics keeps confidences of exactly 1.0 in a slot of their own; a diagram folds them
    # into the last bin.
    conf_sum[-2] += conf_sum[-1]
    correct_sum[-2] += correct_sum[-1]
    count[-2] += count[-1]
    conf_sum, correct_sum, count = conf_sum[:-1], correct_sum[:-1], count[:-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.where(count > 0, conf_sum / np.maximum(count, 1), 0.0)
        acc = np.where(count > 0, correct_sum / np.maximum(count, 1), 0.0)
    return ReliabilityBins(edges, conf, acc, count.astype(np.int64))


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """L1 expected calibration error Σ_b (n_b / N) |acc_b − conf_b| over equal-width bins.

    Equal to ``torchmetrics.functional.classification.multiclass_calibration_error(probs, labels,
    C, n_bins=n_bins, norm="l1")``, including its binning: bins are ``[lo, hi)`` and confidences of
    exactly 1.0 form a bin of their own (so it can differ from :attr:`ReliabilityBins.ece`, which
    folds them into the last bin, when some confidences are exactly 1.0).
    """
    _, conf_sum, correct_sum, count = _bin_sums(probs, labels, n_bins)
    n = count.sum()
    return float(np.abs(correct_sum - conf_sum).sum() / n)


def negative_log_likelihood(probs: Any, labels: Any, *, eps: float = 1e-12) -> float:
    """Mean −log p(true class), with probabilities clamped at ``eps``."""
    p = _probs(probs).double()
    y = _labels(labels, len(p))
    _nonempty(len(y))
    return float(-p.gather(1, y[:, None]).clamp(min=eps).log().mean())


# -------------------------------------------------------- temperature scaling
def _looks_like_probs(x: Tensor) -> bool:
    in_range = bool((x >= 0).all() and (x <= 1).all())
    return in_range and torch.allclose(x.sum(1), torch.ones(len(x), dtype=x.dtype), atol=1e-3)


def _as_logits(x: Tensor, kind: str, eps: float) -> Tensor:
    if kind not in ("auto", "probs", "logits"):
        raise ValueError(f"kind must be 'auto', 'probs' or 'logits', got {kind!r}")
    x = x.double()
    if kind == "probs" or (kind == "auto" and _looks_like_probs(x)):
        return x.clamp(min=eps).log()
    return x


def fit_temperature(
    probs_or_logits: Any,
    labels: Any,
    *,
    kind: str = "auto",
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
    tol: float = 1e-7,
    eps: float = 1e-12,
) -> float:
    """Temperature T > 0 minimising the mean NLL of softmax(z / T) on a held-out split.

    Fit it on the **validation** split and apply it to the test split with
    :func:`apply_temperature`; fitting on the test split would report an optimistic calibration.

    Args:
        probs_or_logits: (N, C) validation probabilities (rows summing to 1; ``z = log p``) or logits.
        labels: (N,) validation labels.
        kind: ``"probs"``, ``"logits"`` or ``"auto"`` (probabilities if every row is in [0, 1]
            and sums to 1).
        bounds: search interval for T; the NLL is convex in 1/T, so a golden-section search on
            log T finds the minimum (or the nearer bound, e.g. for perfectly separated data).
        tol: stopping width of the search interval in log T.
        eps: probabilities are clamped at ``eps`` before the log.

    Returns:
        T as a float.
    """
    x = _probs(probs_or_logits, "probs_or_logits")
    y = _labels(labels, len(x))
    _nonempty(len(y))
    lo_t, hi_t = bounds
    if not 0 < lo_t < hi_t:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    z = _as_logits(x, kind, eps)
    if not torch.isfinite(z).all():
        raise ValueError("logits must be finite")
    z_true = z.gather(1, y[:, None]).squeeze(1)

    def nll(log_t: float) -> float:
        beta = math.exp(-log_t)
        return float((torch.logsumexp(beta * z, dim=1) - beta * z_true).mean())

    a, b = math.log(lo_t), math.log(hi_t)
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = nll(c), nll(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = nll(d)
    return float(math.exp((a + b) / 2))


def apply_temperature(probs: Any, temperature: float, *, logits: bool = False, eps: float = 1e-12) -> Tensor:
    """Temperature-scaled probabilities softmax(z / T), with ``z = log p`` for probabilities
    (``logits=True``: ``z`` is the input). T = 1 returns the probabilities (up to the ``eps``
    clamp); argmax, hence accuracy, never changes. Keeps the input's floating dtype."""
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    x = _probs(probs)
    z = x.double() if logits else x.double().clamp(min=eps).log()
    return (z / temperature).softmax(dim=1).to(x.dtype)


# ---------------------------------------------------------- selective prediction
def confidence_scores(probs: Any, method: str = "max_prob") -> Tensor:
    """Per-image confidence (higher = keep first): ``max_prob`` (max probability), ``entropy``
    (minus the predictive entropy) or ``margin`` (top-1 minus top-2 probability)."""
    p = _probs(probs).double()
    if method == "max_prob":
        return p.max(dim=1).values
    if method == "entropy":
        return -predictive_entropy(p)
    if method == "margin":
        if p.shape[1] < 2:
            return p[:, 0]
        top = p.topk(2, dim=1).values
        return top[:, 0] - top[:, 1]
    raise ValueError(f"unknown confidence {method!r}; choose from ['max_prob', 'entropy', 'margin']")


def _confidence(probs: Tensor, confidence: Any) -> Tensor:
    if confidence is None or isinstance(confidence, str):
        return confidence_scores(probs, confidence or "max_prob")
    c = torch.as_tensor(confidence).detach().cpu().double().reshape(-1)
    if len(c) != len(probs):
        raise ValueError(f"got {len(c)} confidence values for {len(probs)} images")
    return c


def coverage_curve(probs: Any, labels: Any, confidence: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy on the retained images as the least confident ones are referred first.

    Images are sorted by decreasing confidence; point ``k`` (k = 1..N) keeps the ``k`` most
    confident: coverage k / N, selective accuracy = correct among them / k. Images of equal
    confidence are taken in random order, in expectation (so the curve does not depend on the
    input order of ties: within a tie group the error count grows linearly).

    Args:
        probs: (N, C) probabilities (the prediction is their argmax).
        labels: (N,) true classes.
        confidence: None or ``"max_prob"`` (default), ``"entropy"``, ``"margin"``, or an (N,)
            array of scores (higher = more confident).

    Returns:
        (coverage, accuracy), each float64 (N,), coverage increasing to 1.
    """
    p = _probs(probs)
    y = _labels(labels, len(p))
    _nonempty(len(y))
    conf = _confidence(p, confidence).numpy()
    wrong = (p.argmax(dim=1) != y).double().numpy()
    n = len(wrong)
    order = np.argsort(-conf, kind="stable")
    conf_s, wrong_s = conf[order], wrong[order]
    new_group = np.r_[True, conf_s[1:] != conf_s[:-1]]
    gid = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    sizes = np.diff(np.r_[starts, n])
    group_wrong = np.add.reduceat(wrong_s, starts)
    wrong_before = np.r_[0.0, np.cumsum(group_wrong)[:-1]]
    pos_in_group = np.arange(n) - starts[gid] + 1
    expected_wrong = wrong_before[gid] + pos_in_group * group_wrong[gid] / sizes[gid]
    k = np.arange(1, n + 1, dtype=np.float64)
    return k / n, 1.0 - expected_wrong / k


def aurc(probs: Any, labels: Any, confidence: Any = None) -> float:
    """Area under the risk–coverage curve: the mean selective risk (1 − accuracy) over the N
    points of :func:`coverage_curve` (lower is better; Geifman et al., 2019)."""
    _, acc = coverage_curve(probs, labels, confidence)
    return float(np.mean(1.0 - acc))


def accuracy_at_coverage(
    probs: Any, labels: Any, coverages: Sequence[float] = DEFAULT_COVERAGES, confidence: Any = None
) -> list[dict[str, float]]:
    """Selective accuracy keeping the ceil(c·N) most confident images, for each coverage c.

    Returns a list of ``{"coverage": c, "images": k, "accuracy": acc}``.
    """
    cov, acc = coverage_curve(probs, labels, confidence)
    n = len(cov)
    out = []
    for c in coverages:
        if not 0.0 < c <= 1.0:
            raise ValueError(f"coverage must be in (0, 1], got {c}")
        k = min(n, max(1, math.ceil(c * n - 1e-9)))
        out.append({"coverage": float(c), "images": int(k), "accuracy": float(acc[k - 1])})
    return out


def threshold_at_coverage(probs: Any, coverage: float, confidence: Any = None) -> tuple[float, int]:
    """The confidence threshold that keeps ``coverage`` of these images (e.g. the validation split).

    The ceil(c·N) most confident images are kept: the threshold is the confidence of the last of
    them, and an image whose confidence is **below** it is referred. Same ``k`` as
    :func:`accuracy_at_coverage`; ties at the threshold are all kept, so at least ``k`` images pass.

    Returns:
        (threshold, k).
    """
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    p = _probs(probs)
    _nonempty(len(p))
    conf = np.sort(_confidence(p, confidence).numpy())[::-1]
    k = min(len(conf), max(1, math.ceil(coverage * len(conf) - 1e-9)))
    return float(conf[k - 1]), int(k)


def referral_thresholds(
    probs: Any, coverages: Sequence[float] = DEFAULT_COVERAGES, confidence: Any = None
) -> list[dict[str, float]]:
    """:func:`threshold_at_coverage` at each coverage: ``{"coverage", "threshold", "images"}``."""
    out = []
    for c in coverages:
        t, k = threshold_at_coverage(probs, c, confidence)
        out.append({"coverage": float(c), "threshold": t, "images": k})
    return out


def uncertainty_summary(
    probs: Any,
    labels: Any,
    val_probs: Any,
    val_labels: Any,
    *,
    n_bins: int = 15,
    coverages: Sequence[float] = DEFAULT_COVERAGES,
) -> dict[str, Any]:
    """Calibration and selective prediction of ``probs`` with T fitted on ``val_probs`` only.

    Returns a JSON-ready dict: ``fitted_temperature`` and ``temperature_at_bound`` (the NLL
    kept falling to the edge of the search interval, e.g. for a model no better than chance);
    ``ece`` / ``ece_calibrated`` and ``nll`` /
    ``nll_calibrated`` before/after temperature scaling; ``val_ece`` / ``val_ece_calibrated`` on
    the calibration split; ``aurc`` (max-probability confidence) and ``aurc_entropy``;
    ``coverage_accuracy`` points; ``referral_thresholds``: the max-probability confidence that keeps
    each coverage of the **calibration** split (:func:`referral_thresholds` of ``val_probs``; refer an
    image whose confidence is below it); ``n_bins``; ``calibration_images``.
    """
    t = fit_temperature(val_probs, val_labels, kind="probs")
    lo, hi = TEMPERATURE_BOUNDS
    scaled = apply_temperature(probs, t)
    val_scaled = apply_temperature(val_probs, t)
    return {
        "fitted_temperature": t,
        "temperature_at_bound": bool(t <= lo * 1.001 or t >= hi / 1.001),
        "calibration_images": len(_labels(val_labels, len(_probs(val_probs)))),
        "n_bins": n_bins,
        "ece": expected_calibration_error(probs, labels, n_bins),
        "ece_calibrated": expected_calibration_error(scaled, labels, n_bins),
        "nll": negative_log_likelihood(probs, labels),
        "nll_calibrated": negative_log_likelihood(scaled, labels),
        "val_ece": expected_calibration_error(val_probs, val_labels, n_bins),
        "val_ece_calibrated": expected_calibration_error(val_scaled, val_labels, n_bins),
        "aurc": aurc(probs, labels),
        "aurc_entropy": aurc(probs, labels, "entropy"),
        "coverage_accuracy": accuracy_at_coverage(probs, labels, coverages),
        "referral_thresholds": referral_thresholds(val_probs, coverages),
    }


__all__ = [
    "DEFAULT_COVERAGES",
    "ReliabilityBins",
    "accuracy_at_coverage",
    "apply_temperature",
    "aurc",
    "confidence_scores",
    "coverage_curve",
    "expected_calibration_error",
    "fit_temperature",
    "negative_log_likelihood",
    "referral_thresholds",
    "reliability_bins",
    "threshold_at_coverage",
    "uncertainty_summary",
]
