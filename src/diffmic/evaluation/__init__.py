"""Dataset-level evaluation: metrics, JSON reports and per-image uncertainty.

Figures live in :mod:`diffmic.evaluation.plots` (imported explicitly: it loads matplotlib).
"""

from __future__ import annotations

from diffmic.evaluation.metrics import classification_metrics, confusion_matrix, per_class_table
from diffmic.evaluation.report import EvalReport, evaluate, predict_split
from diffmic.evaluation.uncertainty import class_intervals, predictive_entropy, vote_fractions

__all__ = [
    "EvalReport",
    "class_intervals",
    "classification_metrics",
    "confusion_matrix",
    "evaluate",
    "per_class_table",
    "predict_split",
    "predictive_entropy",
    "vote_fractions",
]
