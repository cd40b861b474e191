"""Figures (object-oriented matplotlib): a single-image explanation, and the dataset-level figures
of a run report (reliability diagram, accuracy-coverage curve, confusion matrix, training curves,
image grid with ROI boxes).

Every function returns a :class:`~matplotlib.figure.Figure`; save it with ``fig.savefig(path)``
(which needs no GUI backend). No pyplot state is touched and the user's matplotlib backend is left
as it is; ``diffmic.models`` never imports matplotlib.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from diffmic._io import atomic_write
from diffmic.evaluation.calibration import apply_temperature
from diffmic.runs import read_metrics_csv  # the training log belongs to the run folder; re-exported


def _normalise01(a: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(a)), float(np.max(a))
    if hi - lo < 1e-12:
        return np.zeros_like(a, dtype=np.float32)
    return ((a - lo) / (hi - lo)).astype(np.float32)


def _display_image(image: Any) -> tuple[np.ndarray, str | None]:
    """uint8/float array (H, W), (H, W, 1|3|4) or a PIL image -> array for imshow and a cmap."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(arr.astype(np.float32), 0.0, 1.0)
    return arr, ("gray" if arr.ndim == 2 else None)


def draw_boxes(ax: Any, boxes: Sequence[Sequence[float]], weights: Sequence[float] | None = None, *,
               fontsize: float = 8, linewidth: float = 1.8) -> None:
    """Draw ROI boxes ``(row, col, height, width)`` (image pixel coordinates) on ``ax``, each in
    its own colour and, when ``weights`` is given, labelled with its weight (2 decimals)."""
    colours = matplotlib.colormaps["tab10"]
    for k, (row, col, bh, bw) in enumerate(boxes):
        colour = colours(k % 10)
        ax.add_patch(Rectangle((col, row), bw, bh, fill=False, edgecolor=colour, linewidth=linewidth))
        if weights is not None:
            weight = weights[k] if k < len(weights) else float("nan")
            ax.text(col + 0.5, row + 0.5, f"{weight:.2f}", color="white", fontsize=fontsize, va="top",
                    ha="left", bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "edgecolor": "none"})


def plot_explanation(
    image_uint8: Any,
    explanation: dict[str, Any],
    class_names: Sequence[str] | None = None,
    *,
    alpha: float = 0.45,
    per_class: bool = True,
) -> Figure:
    """Figure for one :meth:`DiffMIC.explain` result.

    Top left: the image with the K ROI boxes, each labelled with its attention weight. Top middle:
    the saliency map of the predicted class (min-max normalised) overlaid on the image. Top right:
    bar chart of the DCG prior vs the diffusion probabilities. Bottom row (``per_class``): the
    saliency map (class activation map) of every class on one shared colour scale, so the classes
    can be compared. The image may have any size: it is drawn over the model-input coordinate frame
    the boxes and saliency are given in.

    Save it with ``fig.savefig(path)``; no pyplot state is touched.
    """
    sal = np.asarray(explanation["saliency"])
    prior = np.asarray(explanation["prior"], dtype=float)
    probs = np.asarray(explanation["probs"], dtype=float)
    attention = np.asarray(explanation["attention"], dtype=float)
    boxes = list(explanation["boxes"])
    names = list(class_names) if class_names is not None else list(
        explanation.get("class_names") or [str(i) for i in range(len(probs))])
    pred = int(explanation.get("prediction", int(np.argmax(probs))))
    h, w = sal.shape[-2:]
    img, cmap = _display_image(image_uint8)
    extent = (0, w, h, 0)  # image drawn in model-input pixel coordinates

    c = len(names)
    fig = Figure(figsize=(12, 4.2 + (3.0 if per_class else 0.0)), dpi=100, layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[4.2, 3.0]) if per_class else (fig, None)
    ax_roi, ax_sal, ax_bar = top.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.1]})

    ax_roi.imshow(img, cmap=cmap, extent=extent, interpolation="nearest")
    draw_boxes(ax_roi, boxes, attention)
    ax_roi.set_xlim(0, w)
    ax_roi.set_ylim(h, 0)
    ax_roi.set_title(f"ROI crops (K={len(boxes)}), attention weights")
    ax_roi.set_axis_off()

    ax_sal.imshow(img, cmap=cmap, extent=extent, interpolation="nearest")
    heat = ax_sal.imshow(_normalise01(sal[pred]), cmap="jet", alpha=alpha, extent=extent,
                         vmin=0.0, vmax=1.0, interpolation="bilinear")
    ax_sal.set_xlim(0, w)
    ax_sal.set_ylim(h, 0)
    ax_sal.set_title(f"saliency: {names[pred]}")
    ax_sal.set_axis_off()
    fig.colorbar(heat, ax=ax_sal, fraction=0.046, pad=0.02)

    x = np.arange(len(names))
    width = 0.38
    ax_bar.bar(x - width / 2, prior, width, label="DCG prior", color="tab:gray")
    ax_bar.bar(x + width / 2, probs, width, label="diffusion", color="tab:blue")
    ax_bar.set_xticks(x, names, rotation=30 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center")
    ax_bar.set_ylim(0, 1.05)
    ax_bar.set_ylabel("probability")
    ax_bar.set_title(f"prediction: {names[pred]} ({probs[pred]:.2f})")
    ax_bar.legend(loc="upper right", fontsize=8)

    if bottom is not None:
        lo, hi = float(np.min(sal)), float(np.max(sal))
        axes = np.atleast_1d(bottom.subplots(1, c))
        heat = None
        for k, ax in enumerate(axes):
            ax.imshow(img, cmap=cmap, extent=extent, interpolation="nearest")
            heat = ax.imshow(sal[k], cmap="jet", alpha=alpha, extent=extent, vmin=lo, vmax=max(hi, lo + 1e-8),
                             interpolation="bilinear")
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
            ax.set_title(f"{names[k]} (prior {prior[k]:.2f})", fontsize=9,
                         fontweight="bold" if k == pred else "normal")
            ax.set_axis_off()
        bottom.colorbar(heat, ax=list(axes), fraction=0.02, pad=0.01, label="class activation")
        bottom.suptitle("saliency map of every class (shared scale)", fontsize=10)
    return fig


# ----------------------------------------------------------------- dataset-level figures
def _reliability_panel(ax: Any, probs: Any, labels: Any, n_bins: int, title: str) -> None:
    from diffmic.evaluation.calibration import expected_calibration_error, reliability_bins

    bins = reliability_bins(probs, labels, n_bins)
    ece = expected_calibration_error(probs, labels, n_bins)
    lo, width = bins.edges[:-1], np.diff(bins.edges)
    filled = bins.count > 0
    ax.bar(lo[filled], bins.accuracy[filled], width=width[filled], align="edge", color="tab:blue",
           edgecolor="white", alpha=0.85, label="accuracy")
    gap_lo = np.minimum(bins.accuracy, bins.confidence)[filled]
    ax.bar(lo[filled], np.abs(bins.accuracy - bins.confidence)[filled], width=width[filled], bottom=gap_lo,
           align="edge", color="tab:red", alpha=0.3, hatch="//", edgecolor="tab:red", label="gap")
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}: ECE {ece:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    frac = ax.twinx()
    frac.plot(lo + width / 2, bins.count / max(1, bins.count.sum()), "o-", color="tab:gray", markersize=3,
              linewidth=0.8)
    frac.set_ylim(0, 1)
    frac.set_ylabel("fraction of images", color="tab:gray", fontsize=8)
    frac.tick_params(axis="y", labelsize=7, colors="tab:gray")


def plot_reliability(
    probs: Any,
    labels: Any,
    calibrated: Any = None,
    *,
    n_bins: int = 15,
    temperature: float | None = None,
) -> Figure:
    """Reliability diagram: accuracy per equal-width confidence bin against the diagonal, with the
    fraction of images per bin (grey, right axis). With ``calibrated`` (the same images'
    temperature-scaled probabilities) a second panel shows them after scaling."""
    panels = [(probs, "before scaling")]
    if calibrated is not None:
        after = "after scaling" + (f" (T = {temperature:.3g})" if temperature is not None else "")
        panels.append((calibrated, after))
    fig = Figure(figsize=(5.2 * len(panels), 4.6), dpi=100, layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (p, title) in zip(axes, panels, strict=True):
        _reliability_panel(ax, p, labels, n_bins, title)
    return fig


def plot_accuracy_coverage(
    curves: Mapping[str, Any],
    labels: Any,
    *,
    confidence: Any = None,
    marks: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 1.0),
) -> Figure:
    """Selective accuracy against coverage (least confident referred first), one line per entry
    of ``curves`` (name -> (N, C) probabilities of the same images), AURC in the legend."""
    from diffmic.evaluation.calibration import aurc, coverage_curve

    fig = Figure(figsize=(6.4, 4.6), dpi=100, layout="constrained")
    ax = fig.subplots()
    for k, (name, probs) in enumerate(curves.items()):
        cov, acc = coverage_curve(probs, labels, confidence)
        colour = matplotlib.colormaps["tab10"](k % 10)
        ax.plot(cov, acc, color=colour, linewidth=1.8,
                label=f"{name} (AURC {aurc(probs, labels, confidence):.3f})")
        idx = [min(len(cov), max(1, math.ceil(m * len(cov) - 1e-9))) - 1 for m in marks]
        ax.plot(cov[idx], acc[idx], "o", color=colour, markersize=4)
    ax.set_xlim(0, 1.02)
    lo = ax.get_ylim()[0]
    ax.set_ylim(max(0.0, min(lo, 0.95)), 1.01)
    ax.set_xlabel("coverage (fraction of images kept)")
    ax.set_ylabel("accuracy on kept images")
    ax.set_title("accuracy vs coverage (least confident referred first)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return fig


def plot_confusion_matrix(
    cm: Any, class_names: Sequence[str], *, normalize: bool = True, title: str = "confusion matrix"
) -> Figure:
    """Heatmap of a confusion matrix (rows: true class, columns: predicted), row-normalised when
    ``normalize``; every cell is annotated with its count (and row fraction)."""
    counts = np.asarray(cm, dtype=np.float64)
    c = len(class_names)
    if counts.shape != (c, c):
        raise ValueError(f"confusion matrix must be ({c}, {c}), got {counts.shape}")
    rows = counts.sum(axis=1, keepdims=True)
    shown = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0) if normalize else counts
    side = max(4.2, 0.75 * c + 2.6)
    fig = Figure(figsize=(side + 0.8, side), dpi=100, layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else max(1.0, shown.max()))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04,
                 label="fraction of the true class" if normalize else "count")
    threshold = (1.0 if normalize else max(1.0, shown.max())) / 2
    for i in range(c):
        for j in range(c):
            text = f"{int(counts[i, j])}" + (f"\n{shown[i, j]:.2f}" if normalize else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=8 if c > 6 else 10,
                    color="white" if shown[i, j] > threshold else "black")
    ticks = np.arange(c)
    rotate = c > 3 or max((len(n) for n in class_names), default=0) > 8
    ax.set_xticks(ticks, list(class_names), rotation=30 if rotate else 0, ha="right" if rotate else "center")
    ax.set_yticks(ticks, list(class_names))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    return fig


LOSS_COLUMNS = ("train/loss", "train/dcg_loss", "train/mse", "train/mmd_global", "train/mmd_local")
SCORE_COLUMNS = ("train/dcg_acc", "val/acc", "val/dcg_acc", "val/select")


def plot_training_curves(path: str | Path) -> Figure:
    """Training curves from a Lightning ``metrics.csv``: losses per epoch (left) and accuracies /
    the selection metric per epoch (right). Missing columns and empty or NaN cells are
    tolerated; an empty file gives a figure saying so."""
    series = read_metrics_csv(path)
    fig = Figure(figsize=(11, 4.2), dpi=100, layout="constrained")
    ax_loss, ax_score = fig.subplots(1, 2)
    panels = ((ax_loss, [k for k in LOSS_COLUMNS if k in series], "loss"),
              (ax_score, [k for k in SCORE_COLUMNS if k in series], "accuracy / selection metric"))
    for ax, keys, ylabel in panels:
        for k, key in enumerate(keys):
            pts = sorted(series[key])
            xs = [p[0] + 1 for p in pts]  # epochs counted from 1
            ax.plot(xs, [p[1] for p in pts], "o-", markersize=3, linewidth=1.5,
                    color=matplotlib.colormaps["tab10"](k % 10), label=key)
        if keys:
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, f"no {ylabel} columns in {Path(path).name}", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
    ax_loss.set_title("training losses")
    ax_score.set_title("accuracy (train DCG, validation)")
    return fig


def plot_image_grid(
    images: Sequence[Any],
    titles: Sequence[str] | None = None,
    boxes: Sequence[Sequence[Sequence[float]]] | None = None,
    weights: Sequence[Sequence[float]] | None = None,
    *,
    ncols: int = 6,
    box_frame: int | None = None,
    suptitle: str | None = None,
) -> Figure:
    """A grid of images, each optionally with its ROI boxes ``(row, col, height, width)``
    (labelled with ``weights``, as in :func:`plot_explanation`) and a title.

    ``box_frame``: side of the square pixel frame the boxes are given in (the model input size);
    None: the image's own size.
    """
    n = len(images)
    if n == 0:
        raise ValueError("no images to plot")
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(2.2 * ncols, 2.5 * nrows + (0.4 if suptitle else 0)), dpi=100, layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).reshape(-1)
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i >= n:
            continue
        img, cmap = _display_image(images[i])
        h, w = (box_frame, box_frame) if box_frame else img.shape[:2]
        ax.imshow(img, cmap=cmap, extent=(0, w, h, 0), interpolation="nearest")
        if boxes is not None:
            draw_boxes(ax, boxes[i], None if weights is None else weights[i], fontsize=6, linewidth=1.2)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def write_evaluation_figures(folder: str | Path, evaluation: Any) -> list[str]:
    """Write ``reliability.png`` (before/after temperature scaling when the report is calibrated),
    ``coverage.png`` and ``confusion.png`` of an :class:`~diffmic.evaluation.report.Evaluation`
    into ``folder`` (atomically); returns the file names."""
    report, probs, labels = evaluation.report, evaluation.probs, evaluation.labels
    u = report.uncertainty
    calibrated = apply_temperature(probs, u["fitted_temperature"]) if u else None
    figures = {
        "reliability.png": plot_reliability(probs, labels, calibrated,
                                            temperature=u["fitted_temperature"] if u else None),
        "coverage.png": plot_accuracy_coverage({"DiffMIC (diffusion)": probs, "DCG prior": evaluation.priors},
                                               labels),
        "confusion.png": plot_confusion_matrix(report.confusion_matrix, report.class_names),
    }
    for name, fig in figures.items():
        atomic_write(Path(folder) / name, lambda f, fig=fig: fig.savefig(f, format="png"))
    return list(figures)
