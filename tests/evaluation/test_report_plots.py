"""Dataset-level figures: each is a real Figure, saved as a valid, non-trivial PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from diffmic.evaluation.calibration import apply_temperature
from diffmic.evaluation.plots import (
    plot_accuracy_coverage,
    plot_confusion_matrix,
    plot_image_grid,
    plot_reliability,
    plot_training_curves,
    read_metrics_csv,
)

# The header and row shapes Lightning's CSVLogger writes for a DCG epoch + a diffusion epoch.
METRICS_CSV = """\
epoch,step,train/dcg_acc,train/dcg_loss,train/loss,train/lr,train/mse,val/acc,val/dcg_acc,val/ece,val/select
0,7,,,,,,,0.269,,-1.0
0,7,0.5625,0.683,,,,,,,
1,15,,,,,,0.372,0.397,0.625,0.372
1,15,0.730,0.631,1.615,0.0001,1.369,,,,
2,23,,,,,,nan,0.41,,0.40
2,23,0.75,0.60,1.2,,1.1,,,,
"""


def check_png(fig: Figure, path, min_bytes: int = 5_000) -> None:
    assert isinstance(fig, Figure)
    fig.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > min_bytes
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 10  # not a blank / single-colour image


def case(n=200, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g) * 3
    logits[torch.arange(n), labels] += 2.0
    return logits.softmax(1), labels


def test_reliability_diagram_before_after(tmp_path):
    probs, labels = case()
    fig = plot_reliability(probs, labels, apply_temperature(probs, 2.0), temperature=2.0)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 2 and "ECE" in titles[0] and "T = 2" in titles[1]
    check_png(fig, tmp_path / "reliability.png")
    single = plot_reliability(probs, labels)
    assert len([ax for ax in single.axes if ax.get_title()]) == 1


def test_accuracy_coverage_curve(tmp_path):
    probs, labels = case()
    fig = plot_accuracy_coverage({"diffusion": probs, "prior": case(seed=1)[0]}, labels)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert len(legend) == 2 and all("AURC" in t for t in legend)
    check_png(fig, tmp_path / "coverage.png")


def test_confusion_matrix_heatmap(tmp_path):
    cm = [[30, 5, 1], [4, 20, 6], [0, 3, 11]]
    fig = plot_confusion_matrix(cm, ["normal", "benign", "malignant"])
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts[0] == "30\n0.83" and len(texts) == 9
    check_png(fig, tmp_path / "cm.png")
    with pytest.raises(ValueError, match="confusion matrix"):
        plot_confusion_matrix(cm, ["a", "b"])


def test_training_curves_from_lightning_csv(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(METRICS_CSV)
    series = read_metrics_csv(csv_path)
    assert series["val/select"] == [(1.0, 0.372), (2.0, 0.40)]  # the -1 placeholder is skipped
    assert series["val/acc"] == [(1.0, 0.372)]  # empty and NaN cells are skipped
    assert "val/auroc" not in series and "train/mmd_global" not in series  # missing columns
    fig = plot_training_curves(csv_path)
    labels = {line.get_label() for ax in fig.axes for line in ax.get_lines()}
    assert {"train/loss", "train/dcg_loss", "train/mse", "train/dcg_acc", "val/acc", "val/dcg_acc",
            "val/select"} <= labels
    check_png(fig, tmp_path / "curves.png")


def test_training_curves_tolerate_an_empty_log(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,step,train/loss\n0,1,\n")
    fig = plot_training_curves(csv_path)
    assert any("no loss columns" in t.get_text() for ax in fig.axes for t in ax.texts)
    fig.savefig(tmp_path / "empty.png")


def test_image_grid_with_roi_boxes(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(5)]
    images.append(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))  # drawn in the 28-px box frame
    boxes = [[(2, 3, 8, 8), (10, 12, 8, 8)] for _ in images]
    weights = [[0.25, 0.75] for _ in images]
    fig = plot_image_grid(images, [f"image {i}" for i in range(6)], boxes, weights, ncols=3, box_frame=28,
                          suptitle="ROI")
    drawn = [ax for ax in fig.axes if ax.images]
    assert len(drawn) == 6
    assert all(len(ax.patches) == 2 for ax in drawn)
    assert [t.get_text() for t in drawn[0].texts] == ["0.25", "0.75"]
    check_png(fig, tmp_path / "grid.png")
    with pytest.raises(ValueError, match="no images"):
        plot_image_grid([])
