"""plot_explanation: a real figure, written as a non-trivial PNG."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from diffmic.evaluation.plots import plot_explanation


def fake_explanation(c=3, size=28, k=4, crop=8):
    rng = np.random.default_rng(0)
    att = rng.random(k)
    prior = rng.random(c)
    probs = rng.random(c)
    yy, xx = np.mgrid[0:size, 0:size]
    sal = np.stack([np.exp(-((yy - 5 * (i + 1)) ** 2 + (xx - 14) ** 2) / 30.0) for i in range(c)])
    return {
        "saliency": sal.astype(np.float32),
        "boxes": [(2 * i, 3 * i, crop, crop) for i in range(k)],
        "attention": att / att.sum(),
        "prior": prior / prior.sum(),
        "probs": probs / probs.sum(),
        "prediction": int(np.argmax(probs)),
        "class_names": [f"c{i}" for i in range(c)],
        "image_size": (size, size),
    }


@pytest.mark.parametrize("shape", [(28, 28), (40, 40, 3)], ids=["grey-same-size", "rgb-other-size"])
def test_plot_explanation_writes_png(tmp_path, shape):
    image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    expl = fake_explanation()
    fig = plot_explanation(image, expl, ["normal", "benign", "malignant"])
    assert isinstance(fig, Figure)
    assert len(fig.axes) >= 3
    roi_ax = fig.axes[0]
    assert len(roi_ax.patches) == 4  # the K boxes
    labels = [t.get_text() for t in roi_ax.texts]
    assert labels == [f"{a:.2f}" for a in expl["attention"]]
    out = tmp_path / "explain.png"
    fig.savefig(out)
    assert out.stat().st_size > 5_000
    with Image.open(out) as im:
        arr = np.asarray(im.convert("RGB"))
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 1


def test_importing_plots_leaves_the_users_backend_and_pngs_still_save(tmp_path):
    import importlib

    import matplotlib

    from diffmic.evaluation import plots

    before = matplotlib.get_backend()
    try:
        matplotlib.use("pdf")  # what a user (or a notebook) chose before importing diffmic
        importlib.reload(plots)
        assert matplotlib.get_backend().lower() == "pdf"
        fig = plots.plot_explanation(np.zeros((28, 28), np.uint8), fake_explanation(), ["a", "b", "c"])
        fig.savefig(tmp_path / "x.png")  # a bare Figure picks the PNG writer itself
        with Image.open(tmp_path / "x.png") as im:
            assert im.format == "PNG"
    finally:
        matplotlib.use(before)


def test_plot_explanation_shows_every_class_saliency():
    expl = fake_explanation(c=5)
    names = [f"grade {i}" for i in range(5)]
    fig = plot_explanation(np.zeros((28, 28), np.uint8), expl, names)
    titles = [ax.get_title() for ax in fig.axes]
    for name in names:  # one panel per class, titled with its name
        assert any(t.startswith(f"{name} (prior") for t in titles), titles
    only_top = plot_explanation(np.zeros((28, 28), np.uint8), expl, names, per_class=False)
    assert not any("(prior" in ax.get_title() for ax in only_top.axes)
