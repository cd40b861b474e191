"""Slow: the shipped MedMNIST preset (ResNet-18 backbones) on BreastMNIST, short budget.

Run with ``python -m pytest -q -m slow`` (measured 17.5 minutes with one torch thread on 2 CPU cores).
"""

from __future__ import annotations

import numpy as np
import pytest

from diffmic.config import DiffMICConfig
from diffmic.training.api import train


@pytest.mark.slow
def test_breastmnist_preset_beats_majority(tmp_path):
    from conftest import shared_file

    path = shared_file("breastmnist.npz")
    cfg = DiffMICConfig.from_yaml(
        "configs/breastmnist.yaml",
        [f"data.path={path}", f"train.out_dir={tmp_path}", "train.run_name=breast",
         "train.dcg_pretrain_epochs=3", "train.epochs=8", "train.warmup_epochs=1", "train.progress=false"],
    )
    result = train(cfg)
    labels = np.load(path)["test_labels"].ravel()
    majority = np.bincount(labels).max() / len(labels)
    assert result.metrics["test"]["guidance"]["acc"] > majority
    assert result.metrics["test"]["diffusion"]["acc"] > majority
    assert result.metrics["test"]["diffusion"]["auroc"] > 0.75
