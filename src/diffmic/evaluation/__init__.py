"""Dataset-level evaluation: metrics and JSON reports."""

from __future__ import annotations

from diffmic.evaluation.metrics import classification_metrics, confusion_matrix, per_class_table
from diffmic.evaluation.report import EvalReport, evaluate, predict_split

__all__ = ["EvalReport", "classification_metrics", "confusion_matrix", "evaluate", "per_class_table", "predict_split"]
