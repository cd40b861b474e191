"""Figures for a single-image explanation (object-oriented matplotlib on the Agg backend).

Importing this module selects the non-interactive Agg backend; ``diffmic.models`` never imports
matplotlib.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle


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


def plot_explanation(
    image_uint8: Any,
    explanation: dict[str, Any],
    class_names: Sequence[str] | None = None,
    *,
    alpha: float = 0.45,
) -> Figure:
    """Figure for one :meth:`DiffMIC.explain` result.

    Left: the image with the K ROI boxes, each labelled with its attention weight. Middle: the
    saliency map of the predicted class (min-max normalised) overlaid on the image. Right: bar
    chart of the DCG prior vs the diffusion probabilities. The image may have any size: it is
    drawn over the model-input coordinate frame the boxes and saliency are given in.

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

    fig = Figure(figsize=(12, 4.2), dpi=100, layout="constrained")
    ax_roi, ax_sal, ax_bar = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.1]})

    ax_roi.imshow(img, cmap=cmap, extent=extent, interpolation="nearest")
    colours = matplotlib.colormaps["tab10"]
    for k, (row, col, bh, bw) in enumerate(boxes):
        colour = colours(k % 10)
        ax_roi.add_patch(Rectangle((col, row), bw, bh, fill=False, edgecolor=colour, linewidth=1.8))
        weight = attention[k] if k < len(attention) else float("nan")
        ax_roi.text(col + 0.5, row + 0.5, f"{weight:.2f}", color="white", fontsize=8, va="top", ha="left",
                    bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "edgecolor": "none"})
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
    return fig
