"""Dataset-level evaluation: metrics, JSON reports, per-image and dataset-level uncertainty.

Figures live in :mod:`diffmic.evaluation.plots` and the HTML run report in
:mod:`diffmic.evaluation.html_report` (imported explicitly: they load matplotlib).
"""

from __future__ import annotations

from diffmic.diffusion.uncertainty import class_intervals, predictive_entropy, vote_fractions
from diffmic.evaluation.calibration import (
    accuracy_at_coverage,
    apply_temperature,
    aurc,
    coverage_curve,
    expected_calibration_error,
    fit_temperature,
    referral_thresholds,
    reliability_bins,
    threshold_at_coverage,
)
from diffmic.evaluation.metrics import classification_metrics, confusion_matrix, per_class_table
from diffmic.evaluation.report import EvalReport, build_report, evaluate, predict_split

__all__ = [
    "EvalReport",
    "accuracy_at_coverage",
    "apply_temperature",
    "aurc",
    "build_report",
    "class_intervals",
    "classification_metrics",
    "confusion_matrix",
    "coverage_curve",
    "evaluate",
    "expected_calibration_error",
    "fit_temperature",
    "per_class_table",
    "predict_split",
    "predictive_entropy",
    "referral_thresholds",
    "reliability_bins",
    "threshold_at_coverage",
    "vote_fractions",
]
