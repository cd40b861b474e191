"""Dataset-level uncertainty: reliability bins / ECE, temperature scaling, selective prediction,
and the ``uncertainty`` section of ``evaluate``."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

from diffmic.config import DiffMICConfig
from diffmic.data.base import ImageArray
from diffmic.evaluation.calibration import (
    accuracy_at_coverage,
    apply_temperature,
    aurc,
    confidence_scores,
    coverage_curve,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
    uncertainty_summary,
)
from diffmic.evaluation.metrics import classification_metrics
from diffmic.evaluation.report import build_report, evaluate, predict_split
from diffmic.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def two_class(conf, correct):
    """Binary probabilities with the given max-probability and correctness per row (labels 0/1)."""
    conf = np.asarray(conf, dtype=np.float64)
    probs = np.stack([conf, 1.0 - conf], axis=1)  # argmax is class 0 (conf >= 0.5)
    labels = np.where(np.asarray(correct, dtype=bool), 0, 1)
    return torch.tensor(probs), torch.tensor(labels)


def random_case(seed: int, c: int, n: int = 400, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * scale
    labels = torch.randint(0, c, (n,), generator=g)
    logits[torch.arange(n), labels] += 1.5 * torch.rand(n, generator=g)
    return logits.softmax(1), labels


# --------------------------------------------------------------- reliability / ECE
def test_reliability_bins_hand_example():
    probs, labels = two_class([0.55, 0.65, 0.95, 0.95], [1, 0, 1, 0])
    bins = reliability_bins(probs, labels, n_bins=5)
    np.testing.assert_allclose(bins.edges, [0, 0.2, 0.4, 0.6, 0.8, 1.0], atol=1e-7)
    np.testing.assert_array_equal(bins.count, [0, 0, 1, 1, 2])
    np.testing.assert_allclose(bins.accuracy, [0, 0, 1.0, 0.0, 0.5])
    np.testing.assert_allclose(bins.confidence, [0, 0, 0.55, 0.65, 0.95], atol=1e-6)
    # ECE = 1/4·|1 − .55| + 1/4·|0 − .65| + 2/4·|.5 − .95| = .1125 + .1625 + .225
    assert expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(0.5, abs=1e-6)
    assert bins.ece == pytest.approx(0.5, abs=1e-6)
    tm = multiclass_calibration_error(probs.float(), labels, 2, n_bins=5, norm="l1")
    assert float(tm) == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("c", [2, 5])
@pytest.mark.parametrize("n_bins", [5, 15])
def test_ece_equals_torchmetrics(seed, c, n_bins):
    probs, labels = random_case(seed, c)
    ours = expected_calibration_error(probs, labels, n_bins)
    ref = float(multiclass_calibration_error(probs, labels, c, n_bins=n_bins, norm="l1"))
    assert ours == pytest.approx(ref, abs=1e-6)
    assert reliability_bins(probs, labels, n_bins).ece == pytest.approx(ref, abs=1e-6)  # no conf == 1.0 here
    assert classification_metrics(probs, labels, c, n_bins=n_bins)["ece"] == pytest.approx(ours, abs=1e-6)


def test_ece_equals_torchmetrics_with_saturated_and_edge_confidences():
    # confidences exactly 1.0 (saturated softmax) and exactly on bin edges
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.4], [0.8, 0.2], [0.95, 0.05],
                          [0.5, 0.5]])
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 1])
    ref = float(multiclass_calibration_error(probs, labels, 2, n_bins=5, norm="l1"))
    assert expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(ref, abs=1e-6)
    bins = reliability_bins(probs, labels, n_bins=5)
    assert bins.count.sum() == len(labels)  # 1.0 folded into the last bin of the diagram
    # bins are [lo, hi): 0.5 -> [0.4, 0.6), 0.6 -> [0.6, 0.8), 0.8, 0.95 and the three 1.0 -> [0.8, 1]
    np.testing.assert_array_equal(bins.count, [0, 0, 1, 1, 5])


def test_reliability_bins_checks_input():
    with pytest.raises(ValueError, match="empty"):
        reliability_bins(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        reliability_bins(torch.full((3, 2), 0.5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="n_bins"):
        reliability_bins(torch.full((3, 2), 0.5), torch.zeros(3, dtype=torch.long), n_bins=0)


# ------------------------------------------------------------- temperature scaling
def synthetic_logits(t_true: float, n: int = 20_000, c: int = 5, seed: int = 0):
    """Logits z and labels drawn from softmax(z / t_true): the NLL-optimal temperature is t_true."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * 3.0
    labels = torch.multinomial((z / t_true).softmax(1), 1, generator=g).squeeze(1)
    return z, labels


@pytest.mark.parametrize("t_true", [0.5, 2.5])
def test_fit_temperature_recovers_known_temperature(t_true):
    z, labels = synthetic_logits(t_true)
    t_logits = fit_temperature(z, labels, kind="logits")
    assert t_logits == pytest.approx(t_true, rel=0.05)
    # from probabilities: log softmax(z) = z − const, so the same temperature is found
    t_probs = fit_temperature(z.softmax(1), labels)
    assert t_probs == pytest.approx(t_logits, rel=1e-4)
    scaled = apply_temperature(z.softmax(1), t_probs)
    np.testing.assert_allclose(scaled.numpy(), (z / t_true).softmax(1).numpy(), atol=0.03)


def test_fit_temperature_minimises_nll():
    probs, labels = random_case(3, 4, n=600, scale=4.0)
    t = fit_temperature(probs, labels)
    best = negative_log_likelihood(apply_temperature(probs, t), labels)
    for other in (t * 0.8, t * 1.25, 1.0):
        assert best <= negative_log_likelihood(apply_temperature(probs, other), labels) + 1e-9


def test_apply_temperature_one_is_identity_and_keeps_argmax():
    probs, _ = random_case(1, 4)
    np.testing.assert_allclose(apply_temperature(probs, 1.0).numpy(), probs.numpy(), atol=1e-6)
    assert apply_temperature(probs, 1.0).dtype == probs.dtype
    for t in (0.3, 3.0):
        scaled = apply_temperature(probs, t)
        assert torch.equal(scaled.argmax(1), probs.argmax(1))
        np.testing.assert_allclose(scaled.sum(1).numpy(), 1.0, atol=1e-5)
    # higher temperature flattens, lower sharpens
    assert (apply_temperature(probs, 3.0).max(1).values <= probs.max(1).values + 1e-6).all()
    assert (apply_temperature(probs, 0.3).max(1).values >= probs.max(1).values - 1e-6).all()
    logits = torch.randn(5, 3, dtype=torch.float64)
    np.testing.assert_allclose(apply_temperature(logits, 2.0, logits=True).numpy(),
                               (logits / 2).softmax(1).numpy())
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(probs, 0.0)


def test_fit_temperature_api_takes_one_split_only():
    # one (probabilities, labels) pair: the caller hands it the validation split; nothing else
    params = list(inspect.signature(fit_temperature).parameters.values())
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert positional == ["probs_or_logits", "labels"]


def test_uncertainty_summary_fits_on_val_only():
    val_probs, val_labels = random_case(4, 3, n=300, scale=4.0)
    test_probs, test_labels = random_case(5, 3, n=200, scale=4.0)
    a = uncertainty_summary(test_probs, test_labels, val_probs, val_labels)
    assert a["fitted_temperature"] == pytest.approx(fit_temperature(val_probs, val_labels), rel=1e-12)
    # the test labels (and probabilities) have no influence on T
    shuffled = test_labels[torch.randperm(len(test_labels), generator=torch.Generator().manual_seed(0))]
    b = uncertainty_summary(test_probs.flip(0), shuffled, val_probs, val_labels)
    assert b["fitted_temperature"] == a["fitted_temperature"]
    assert a["ece"] == pytest.approx(expected_calibration_error(test_probs, test_labels), abs=1e-12)
    scaled = apply_temperature(test_probs, a["fitted_temperature"])
    assert a["ece_calibrated"] == pytest.approx(expected_calibration_error(scaled, test_labels), abs=1e-12)
    assert a["val_ece_calibrated"] < a["val_ece"]  # these scores are over-confident: scaling helps
    assert a["nll_calibrated"] < a["nll"]
    assert [p["coverage"] for p in a["coverage_accuracy"]] == [1.0, 0.9, 0.8, 0.7, 0.5]
    assert a["temperature_at_bound"] is False


# ------------------------------------------------------------ selective prediction
def test_coverage_curve_hand_example():
    probs, labels = two_class([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0])
    cov, acc = coverage_curve(probs, labels)
    np.testing.assert_allclose(cov, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(acc, [1.0, 0.5, 2 / 3, 0.5])
    # AURC = mean selective risk = (0 + 1/2 + 1/3 + 1/2) / 4
    assert aurc(probs, labels) == pytest.approx((0 + 0.5 + 1 / 3 + 0.5) / 4)
    pts = accuracy_at_coverage(probs, labels, (1.0, 0.5, 0.3))
    assert pts == [{"coverage": 1.0, "images": 4, "accuracy": 0.5},
                   {"coverage": 0.5, "images": 2, "accuracy": 0.5},
                   {"coverage": 0.3, "images": 2, "accuracy": 0.5}]


def test_coverage_curve_input_order_and_ties():
    probs, labels = two_class([0.6, 0.9, 0.7, 0.8], [0, 1, 1, 0])  # the hand example, shuffled
    np.testing.assert_allclose(coverage_curve(probs, labels)[1], [1.0, 0.5, 2 / 3, 0.5])
    # a tie of a right and a wrong image counts half an error at the first of them, in any order
    for correct in ([1, 0, 1], [0, 1, 1]):
        probs, labels = two_class([0.8, 0.8, 0.6], correct)
        np.testing.assert_allclose(coverage_curve(probs, labels)[1], [0.5, 0.5, 2 / 3])


@pytest.mark.parametrize("seed", [0, 1])
def test_coverage_curve_properties(seed):
    probs, labels = random_case(seed, 4, n=300)
    cov, acc = coverage_curve(probs, labels)
    assert np.all(np.diff(cov) > 0) and cov[-1] == 1.0 and len(cov) == len(labels)
    overall = float((probs.argmax(1) == labels).double().mean())
    assert acc[-1] == pytest.approx(overall)
    assert accuracy_at_coverage(probs, labels, (1.0,))[0]["accuracy"] == pytest.approx(overall)
    correct = (probs.argmax(1) == labels).double()
    perfect = aurc(probs, labels, confidence=correct)  # every right image ranked before every wrong one
    reversed_ = aurc(probs, labels, confidence=-correct)
    assert perfect < aurc(probs, labels) < reversed_
    _, acc_perfect = coverage_curve(probs, labels, confidence=correct)
    assert acc_perfect[: int(correct.sum())].min() == 1.0
    for name in ("entropy", "margin"):
        a = aurc(probs, labels, name)
        assert 0.0 <= a <= 1.0
    with pytest.raises(ValueError, match="confidence"):
        coverage_curve(probs, labels, "nope")


def test_entropy_and_max_prob_rank_alike_for_two_classes():
    probs, labels = random_case(2, 2)
    assert aurc(probs, labels, "entropy") == pytest.approx(aurc(probs, labels))
    conf = confidence_scores(probs, "entropy")
    assert torch.equal(torch.argsort(conf), torch.argsort(probs.max(1).values))


# ------------------------------------------------------------------ evaluate(...)
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = DiffMICConfig.from_yaml(None, ["data.path=x", "model.backbone=test_resnet",
                                         "model.denoiser_backbone=test_resnet", "model.feature_dim=32",
                                         "diffusion.timesteps=100", "diffusion.sampling_steps=3"])
    return build_model(cfg, num_classes=3, in_chans=1, image_size=28, class_names=["a", "b", "c"]).eval()


def split(n, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    return ImageArray(images, rng.integers(0, 3, n).astype(np.int64))


def test_evaluate_without_calibration_is_unchanged(tiny_model):
    report = evaluate(tiny_model, split(24, 1), samples=1, seed=0, compare_readouts=False)
    assert report.uncertainty is None
    assert "uncertainty" not in report.to_dict()
    assert set(report.to_dict()) == {"split", "num_images", "class_names", "guidance", "diffusion",
                                     "per_class", "confusion_matrix", "guidance_confusion_matrix",
                                     "settings"}


def test_evaluate_reports_every_readout_side_by_side(tiny_model):
    data = split(24, 1)
    report = evaluate(tiny_model, data, samples=3, seed=0)
    assert set(report.readouts) == {"mean_path", "vote", "mean_softmax"}
    # the shipped readout's entry is the diffusion section, computed from the same chains
    assert report.readouts[tiny_model.readout] == report.diffusion
    alone = evaluate(tiny_model, data, samples=3, seed=0, compare_readouts=False)
    assert alone.diffusion == report.diffusion


def test_evaluate_calibrate_on_val(tiny_model):
    val, test = split(30, 2), split(24, 3)
    report = evaluate(tiny_model, test, samples=2, seed=5, calibrate_on=val)
    u = report.to_dict()["uncertainty"]
    assert u["calibrated_on"] == "val" and u["calibration_images"] == 30
    val_probs, _, val_labels = predict_split(tiny_model, val, samples=2, seed=5)
    assert u["fitted_temperature"] == pytest.approx(fit_temperature(val_probs, val_labels), rel=1e-12)
    assert u["ece"] == pytest.approx(report.diffusion["ece"], abs=1e-6)
    test_probs, _, test_labels = predict_split(tiny_model, test, samples=2, seed=5)
    assert u["aurc"] == pytest.approx(aurc(test_probs, test_labels))
    assert [p["coverage"] for p in u["coverage_accuracy"]] == [1.0, 0.9, 0.8, 0.7, 0.5]
    assert u["coverage_accuracy"][0]["accuracy"] == pytest.approx(report.diffusion["acc"], abs=1e-6)
    # precomputed val predictions give the same section; other test labels do not move T
    same = evaluate(tiny_model, test, samples=2, seed=5, calibrate_on=(val_probs, val_labels))
    assert same.uncertainty == report.uncertainty
    relabelled = ImageArray(test.images, (test.labels + 1) % 3)
    other = evaluate(tiny_model, relabelled, samples=2, seed=5, calibrate_on=val)
    assert other.uncertainty["fitted_temperature"] == u["fitted_temperature"]
    assert math.isfinite(u["ece_calibrated"]) and math.isfinite(u["nll_calibrated"])


def test_build_report_rejects_empty_calibration_split():
    probs, labels = random_case(0, 3, n=20)
    with pytest.raises(ValueError, match="empty"):
        build_report(probs, probs, labels, ["a", "b", "c"], calibration=(probs[:0], labels[:0]))
