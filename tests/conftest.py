"""Shared fixtures: paths to the real MedMNIST files in ../shared/data and tiny configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DIFFMIC_SHARED_DATA", ROOT.parent / "shared" / "data"))

# Two cores on CI: keep torch from oversubscribing them (DIFFMIC_TEST_THREADS overrides).
torch.set_num_threads(int(os.environ.get("DIFFMIC_TEST_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests (threads only add overhead there)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not present (tests read real data from ../shared/data)")
    return path


@pytest.fixture
def retinamnist() -> Path:
    return shared_file("retinamnist.npz")


@pytest.fixture
def breastmnist() -> Path:
    return shared_file("breastmnist.npz")


TINY_OVERRIDES = [
    "model.backbone=test_resnet",
    "model.denoiser_backbone=test_resnet",
    "model.feature_dim=64",
    "diffusion.timesteps=100",
    "diffusion.sampling_steps=5",
    "train.progress=false",
]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """(model.pt of an untrained 2-class 1-channel tiny model, path of breastmnist.npz)."""
    from diffmic.config import DiffMICConfig
    from diffmic.models import build_model, save_model

    data = shared_file("breastmnist.npz")
    cfg = DiffMICConfig.from_yaml(None, [f"data.path={data}", *TINY_OVERRIDES])
    model = build_model(cfg, num_classes=2, in_chans=1, image_size=28, class_names=["malignant", "benign"])
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_model(model, path)
    return path, data
