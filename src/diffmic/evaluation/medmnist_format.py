"""The official MedMNIST result file, and ``medmnist.Evaluator``'s ACC / AUC next to ours.

medmnist (3.x) ``Evaluator.evaluate(y_score, save_folder, run)`` writes
``{flag}{size_flag}_{split}_[AUC]{auc:.3f}_[ACC]{acc:.3f}@{run}.csv`` (``size_flag`` empty at 28,
``_64`` etc. otherwise) holding ``pandas.DataFrame(y_score).to_csv(header=None)``: one row per image in
the split's order, ``index,score_0,...,score_{C-1}``, no header. ``Evaluator.parse_and_evaluate`` reads
such a file back. This module writes the same file without pandas, with ACC and AUC computed as
medmnist defines them (binary: the last column's score > 0.5 and its ROC AUC; multi-class and
ordinal: argmax accuracy and the mean one-vs-rest ROC AUC over all classes).
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffmic._io import atomic_write_text
from diffmic.data.base import DataBundle
from diffmic.data.medmnist_info import medmnist_info, parse_flag
from diffmic.errors import ConfigError, DataError, first_line


@dataclass
class MedMNISTResult:
    """What :func:`write_medmnist_result` wrote and measured."""

    path: Path
    flag: str  # with the size suffix, e.g. "retinamnist_64"
    split: str
    acc: float  # medmnist's definitions, computed here
    auc: float
    ours: dict[str, float] | None = None  # diffmic's report metrics (acc, auroc), if given
    evaluator: tuple[float, float] | None = None  # medmnist.Evaluator's (ACC, AUC) when installed

    def summary(self) -> str:
        """One line: the file, the Evaluator's ACC/AUC (or why not) and ours."""
        if self.evaluator is not None:
            theirs = f"medmnist.Evaluator ACC {self.evaluator[0]:.4f} AUC {self.evaluator[1]:.4f}"
        else:
            theirs = f"ACC {self.acc:.4f} AUC {self.auc:.4f} (medmnist not installed: no Evaluator check)"
        ours = f"; diffmic ACC {self.ours['acc']:.4f} AUC {self.ours['auroc']:.4f}" if self.ours else ""
        return f"MedMNIST result file {self.path} ({self.flag} {self.split}): {theirs}{ours}"


def result_flag(data: DataBundle) -> tuple[str, int]:
    """``(flag, size)`` of a MedMNIST dataset: from ``data.path`` given as a name, or a file named like one."""
    meta = data.extra.get("medmnist")
    if meta:
        return meta["flag"], int(meta["size"])
    parsed = parse_flag(Path(data.source).stem) if data.source else None
    if parsed is None:
        raise DataError(
            f"--medmnist-csv needs a MedMNIST dataset (data.path a MedMNIST name such as breastmnist, or a "
            f"file named like breastmnist.npz / retinamnist_64.npz); got {data.source or 'another layout'}"
        )
    return parsed


def check_medmnist_path(path: str | Path) -> tuple[str, int]:
    """``(flag, size)`` of a ``data.path`` (a MedMNIST name or a file named like one), before any data is read."""
    parsed = parse_flag(Path(str(path)).stem) if str(path) else None
    if parsed is None:
        raise DataError(
            f"--medmnist-csv needs a MedMNIST dataset (data.path a MedMNIST name such as breastmnist, or a "
            f"file named like breastmnist.npz / retinamnist_64.npz); got {path or 'another layout'}"
        )
    return parsed


def result_filename(flag: str, size: int, split: str, acc: float, auc: float, run: str) -> str:
    """medmnist's ``Evaluator.get_standard_evaluation_filename``."""
    size_flag = "" if size == 28 else f"_{size}"
    return f"{flag}{size_flag}_{split}_[AUC]{auc:.3f}_[ACC]{acc:.3f}@{run}.csv"


def run_label(checkpoint: str | Path) -> str:
    """The ``@{run}`` part: the run folder's name (``runs/<name>/model.pt``), else the file's stem.

    Only letters, digits and ``-`` are kept: medmnist parses the run as the text after ``@`` up to
    the first ``.``.
    """
    p = Path(checkpoint)
    name = p.stem
    for folder in (p.parent, p.parent.parent):
        if (folder / "config.yaml").is_file():
            name = folder.name
            break
    return re.sub(r"[^A-Za-z0-9-]+", "-", name).strip("-") or "diffmic"


def _auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC (ties count one half) as the Mann-Whitney statistic; equals sklearn's roc_auc_score."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise DataError("AUC needs both classes in the split (medmnist's Evaluator fails the same way)")
    order = np.argsort(score, kind="mergesort")
    sorted_scores = score[order]
    ranks = np.empty(len(score), dtype=np.float64)
    # average ranks over ties
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(score)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def medmnist_metrics(y_score: np.ndarray, labels: np.ndarray, task: str) -> tuple[float, float]:
    """``(ACC, AUC)`` as medmnist's ``getACC`` / ``getAUC`` define them for single-label tasks."""
    y_score = np.asarray(y_score, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    if task == "binary-class":
        score = y_score[:, -1]
        return float(np.mean((score > 0.5) == (labels == 1))), _auc(labels == 1, score)
    acc = float(np.mean(np.argmax(y_score, axis=-1) == labels))
    auc = float(np.mean([_auc(labels == i, y_score[:, i]) for i in range(y_score.shape[1])]))
    return acc, auc


def format_scores(y_score: np.ndarray) -> str:
    """``pandas.DataFrame(y_score).to_csv(header=None)``: ``index,score,...`` rows, shortest round-trip floats."""
    rows = [",".join([str(i), *(repr(float(v)) for v in row)]) for i, row in enumerate(np.asarray(y_score))]
    return "\n".join(rows) + "\n"


def prepare_folder(folder: str | Path) -> Path:
    """Create the output folder if its parent exists; one-line errors otherwise."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--medmnist-csv: {folder} exists and is not a folder")
    if not folder.is_dir():
        if not folder.parent.is_dir():
            raise ConfigError(f"--medmnist-csv: the parent folder of {folder} does not exist")
        folder.mkdir()
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"--medmnist-csv: {folder} is not writable")
    return folder


def write_medmnist_result(
    folder: str | Path,
    probs,
    data: DataBundle,
    split: str,
    *,
    ours: dict[str, float] | None = None,
    checkpoint: str | Path | None = None,
    run: str | None = None,
    evaluator: bool = True,
) -> MedMNISTResult:
    """Write ``split``'s scores ``probs`` (N, C) as medmnist's result file into ``folder``.

    Args:
        folder: output folder (created if its parent exists).
        probs: class probabilities in the split's order (tensor or array).
        data: the dataset they were predicted on (a MedMNIST file, see :func:`result_flag`).
        split: ``train``, ``val`` or ``test``.
        ours: diffmic's metrics of the same predictions (``acc``, ``auroc``), shown next to medmnist's.
        checkpoint: names the run (``@{run}``) unless ``run`` is given.
        evaluator: also run ``medmnist.Evaluator`` on the scores when medmnist is installed (it reads
            the labels from ``{folder of data.source}/{flag}{size_flag}.npz``).
    """
    flag, size = result_flag(data)
    info = medmnist_info(flag, size)
    y_score = probs.detach().cpu().double().numpy() if hasattr(probs, "detach") else np.asarray(probs, float)
    labels = data.split(split).labels
    if y_score.ndim != 2 or len(y_score) != len(labels):
        raise DataError(f"scores of shape {y_score.shape} do not match the {len(labels)} images of {split}")
    if y_score.shape[1] != len(info.class_names):
        raise DataError(f"{flag} has {len(info.class_names)} classes but the scores have {y_score.shape[1]}")
    acc, auc = medmnist_metrics(y_score, labels, info.task)
    run = run or (run_label(checkpoint) if checkpoint is not None else "diffmic")
    folder = prepare_folder(folder)
    path = folder / result_filename(flag, size, split, acc, auc, run)
    atomic_write_text(path, format_scores(y_score))
    theirs = _evaluate_with_medmnist(flag, size, split, y_score, Path(data.source).parent) if evaluator else None
    return MedMNISTResult(path, info.filename[:-4], split, acc, auc, ours, theirs)


def _evaluate_with_medmnist(flag: str, size: int, split: str, y_score: np.ndarray,
                            root: Path) -> tuple[float, float] | None:
    """medmnist.Evaluator's (ACC, AUC), or None when medmnist is not installed."""
    if importlib.util.find_spec("medmnist") is None:
        return None
    try:
        from medmnist import Evaluator
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return None
    try:
        metrics = Evaluator(flag, split, size=size, root=str(root)).evaluate(y_score)
    except Exception as exc:  # noqa: BLE001 - medmnist's own failure, reported in one line
        raise DataError(f"medmnist.Evaluator failed on {flag} {split} under {root}: "
                        f"{first_line(exc, 200)}") from None
    return float(metrics.ACC), float(metrics.AUC)


__all__ = ["MedMNISTResult", "format_scores", "medmnist_metrics", "result_filename", "result_flag",
           "run_label", "write_medmnist_result"]
