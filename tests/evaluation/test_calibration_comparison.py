"""calibration_comparison: the diffusion output and its DCG prior, each temperature-scaled on val."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmic.config import DiffMICConfig
from diffmic.data.base import ImageArray
from diffmic.evaluation.calibration import (
    apply_temperature,
    aurc,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
)
from diffmic.evaluation.report import calibration_comparison, predict_readouts
from diffmic.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

OVERRIDES = ["data.path=x", "model.backbone=test_resnet", "model.denoiser_backbone=test_resnet",
             "model.feature_dim=32", "model.denoiser_skip=true", "diffusion.timesteps=50",
             "diffusion.sampling_steps=5"]


def split(seed: int, n: int = 40) -> ImageArray:
    rng = np.random.default_rng(seed)
    return ImageArray(rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8), rng.integers(0, 3, n))


def make(*extra: str):
    torch.manual_seed(0)
    cfg = DiffMICConfig.from_yaml(None, [*OVERRIDES, *extra])
    return build_model(cfg, num_classes=3, in_chans=3, image_size=28).eval()


def test_prior_is_scaled_with_a_temperature_fitted_on_val_only():
    model = make("eval.readout=mean_path", "eval.temperature=0.5")
    val, test = split(0), split(1)
    out = calibration_comparison(model, val, test, batch_size=16)
    _, val_prior, val_labels = predict_readouts(model, val, readouts=("mean_path",))
    _, test_prior, test_labels = predict_readouts(model, test, readouts=("mean_path",))
    t = fit_temperature(val_prior, val_labels, kind="probs")
    scaled = apply_temperature(test_prior, t)
    g = out["guidance"]
    assert g["temperature"] == pytest.approx(t)
    assert g["ece"] == pytest.approx(expected_calibration_error(scaled, test_labels))
    assert g["aurc"] == pytest.approx(aurc(scaled, test_labels))
    assert g["nll"] == pytest.approx(negative_log_likelihood(scaled, test_labels))
    assert g["ece_raw"] == pytest.approx(expected_calibration_error(test_prior, test_labels))
    # mean_path keeps the model's own (val-fitted) temperature: its probabilities are used as they are
    assert out["diffusion"]["temperature"] == 0.5
    assert out["diffusion"]["ece"] == out["diffusion"]["ece_raw"]


def test_scaling_fitted_on_the_split_itself_never_raises_its_nll():
    model = make("eval.readout=mean_softmax")
    data = split(2)
    out = calibration_comparison(model, data, data, batch_size=16)
    for who in ("diffusion", "guidance"):
        assert out[who]["temperature"] != 1.0
    _, prior, labels = predict_readouts(model, data, readouts=("mean_softmax",))
    assert out["guidance"]["nll"] <= negative_log_likelihood(prior, labels) + 1e-9
