"""A short real training run on RetinaMNIST: must beat the majority-class rate on the test split."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffmic import load_model, save_model
from diffmic.config import DiffMICConfig
from diffmic.training.api import train

pytestmark = pytest.mark.train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, request):
    from conftest import shared_file

    path = shared_file("retinamnist.npz")
    out = tmp_path_factory.mktemp("runs")
    cfg = DiffMICConfig.from_yaml(
        "configs/tiny.yaml",
        [f"data.path={path}", f"train.out_dir={out}", "train.run_name=retina", "train.seed=0"],
    )
    return train(cfg), path


def test_run_writes_everything(trained_run):
    result, _ = trained_run
    for name in ("config.yaml", "model.pt", "metrics.json", "checkpoints/last.ckpt"):
        assert (result.run_dir / name).is_file(), name
    assert not (result.run_dir / "checkpoints" / "best.ckpt").exists()  # the selected model is kept once: model.pt
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["selected_epoch"] >= 3  # selected among diffusion epochs, on validation
    assert metrics["select_metric"] == "val/acc"
    for split in ("val", "test"):
        for head in ("guidance", "diffusion"):
            assert set(metrics[split][head]) >= {"acc", "f1", "qwk", "auroc", "ece"}


def test_beats_majority_class_on_test(trained_run):
    result, path = trained_run
    labels = np.load(path)["test_labels"].ravel()
    majority = np.bincount(labels).max() / len(labels)
    test = result.metrics["test"]
    assert test["guidance"]["acc"] > majority + 0.02
    assert test["diffusion"]["acc"] > majority + 0.02


def test_checkpoint_round_trip_identical_predictions(trained_run, tmp_path):
    result, path = trained_run
    images = np.load(path)["test_images"][:32]
    a = load_model(result.model_path)
    save_model(a, tmp_path / "copy.pt")
    b = load_model(tmp_path / "copy.pt")
    pa = a.predict_proba(images, samples=4, generator=torch.Generator().manual_seed(3))
    pb = b.predict_proba(images, samples=4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(pa, pb)
    # the removed best.ckpt of the finished run reads as model.pt
    c = load_model(result.run_dir / "checkpoints" / "best.ckpt")
    pc = c.predict_proba(images, samples=4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(pa, pc)
    # the resumable Lightning checkpoint (the last epoch) loads as a model too
    d = load_model(result.checkpoint)
    assert d.class_names == a.class_names and d.predict_proba(images[:2]).shape == (2, a.num_classes)
    payload = torch.load(result.model_path, weights_only=True)
    assert payload["config"]["model"]["backbone"] == "test_resnet"


def test_selection_uses_validation_split_only(trained_run):
    import csv

    result, _ = trained_run
    rows = list(csv.DictReader((result.run_dir / "logs" / "metrics.csv").open()))
    sel = {int(r["epoch"]): float(r["val/select"]) for r in rows if r.get("val/select")}
    best_epoch = max(sel, key=lambda e: (sel[e], -e))
    assert result.metrics["selected_epoch"] == best_epoch
    # the selected checkpoint's validation accuracy is what the logs recorded for that epoch
    assert abs(result.metrics["val"]["diffusion"]["acc"] - sel[best_epoch]) < 1e-6
