"""DiffMIC.predict_details and DiffMIC.explain on a tiny untrained model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmic.config import DiffMICConfig
from diffmic.errors import DataError
from diffmic.models import DiffMIC, build_model

OVERRIDES = [
    "data.path=x",
    "model.backbone=test_resnet",
    "model.denoiser_backbone=test_resnet",
    "model.feature_dim=32",
    "diffusion.timesteps=100",
    "diffusion.sampling_steps=5",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> DiffMIC:
    torch.manual_seed(0)
    cfg = DiffMICConfig.from_yaml(None, OVERRIDES)
    return build_model(cfg, num_classes=3, in_chans=1, image_size=28).eval()


def images(n=4, size=28, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def test_predict_details_shapes_and_consistency(model):
    x = images(5)
    d = model.predict_details(x, samples=4, generator=torch.Generator().manual_seed(1), batch_size=2)
    assert set(d) == {"probs", "prior", "votes", "entropy", "interval_low", "interval_high"}
    for k in ("probs", "prior", "votes", "interval_low", "interval_high"):
        assert d[k].shape == (5, 3), k
    assert d["entropy"].shape == (5,)
    torch.testing.assert_close(d["probs"].sum(1), torch.ones(5))
    torch.testing.assert_close(d["votes"].sum(1), torch.ones(5))
    assert ((d["votes"] * 4) - (d["votes"] * 4).round()).abs().max() < 1e-6  # multiples of 1/S
    assert (d["entropy"] >= 0).all() and (d["entropy"] <= np.log(3) + 1e-6).all()
    assert (d["interval_low"] <= d["interval_high"]).all()
    # same probabilities as predict_proba with the same generator state
    probs = model.predict_proba(x, samples=4, generator=torch.Generator().manual_seed(1), batch_size=2)
    torch.testing.assert_close(d["probs"], probs)
    assert not model.training


def test_explain_one_image(model):
    e = model.explain(images(1, size=40)[0])  # other size: resized to the model input
    k, crop, size = model.guidance.num_crops, model.guidance.crop_size, model.image_size
    assert e["saliency"].shape == (3, size, size) and isinstance(e["saliency"], np.ndarray)
    assert len(e["boxes"]) == k
    for row, col, h, w in e["boxes"]:
        assert (h, w) == (crop, crop)
        assert 0 <= row and row + h <= size and 0 <= col and col + w <= size
    assert e["attention"].shape == (k,)
    assert (e["attention"] >= 0).all()
    np.testing.assert_allclose(e["attention"].sum(), 1.0, atol=1e-5)
    for key in ("prior", "probs"):
        assert e[key].shape == (3,)
        np.testing.assert_allclose(e[key].sum(), 1.0, atol=1e-5)
    assert e["prediction"] == int(np.argmax(e["probs"]))
    assert e["class_names"] == model.class_names


def test_explain_restores_training_mode_and_rejects_batches(model):
    model.train()
    try:
        model.explain(images(1)[0])
        assert model.training
        with pytest.raises(DataError, match="one image"):
            model.explain(images(2))
    finally:
        model.eval()
