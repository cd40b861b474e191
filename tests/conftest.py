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


# A model small enough that a benchmark script's smoke test trains in seconds (no small-input stem).
TINY_BENCHMARK_MODEL = """
model: {backbone: test_resnet, denoiser_backbone: test_resnet, small_input: false, feature_dim: 16,
        num_crops: 2, mil_hidden: 8}
diffusion: {timesteps: 50, sampling_steps: 2}
"""


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"diffmic_benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_medmnist(path: Path, sizes: dict[str, int], num_classes: int, *, seed: int = 0) -> Path:
    """A MedMNIST-format ``.npz`` of 28x28 grey images whose brightness gives the class (learnable)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in sizes.items():
        labels = np.arange(n) % num_classes
        arrays[f"{split}_images"] = (rng.integers(0, 80, (n, 28, 28)) + 80 * labels[:, None, None]).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None].astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def breastmnist_subset(path: Path, sizes: dict[str, int]) -> Path:
    """The first ``sizes[split]`` images of each split of the real BreastMNIST, as a MedMNIST ``.npz``."""
    import numpy as np

    src = np.load(shared_file("breastmnist.npz"))
    np.savez(path, **{f"{s}_{k}": src[f"{s}_{k}"][:n] for s, n in sizes.items() for k in ("images", "labels")})
    return path


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


def bn_model(backbone="test_resnet", extra=(), num_classes=4, in_chans=3, image_size=28):
    """A tiny model whose BatchNorm statistics and affine weights are away from their defaults
    (a few train-mode passes): folding them is then a real test."""
    from torch import nn

    from diffmic.config import DiffMICConfig
    from diffmic.models import build_model

    torch.manual_seed(0)
    cfg = DiffMICConfig.from_yaml(None, [
        "data.path=x", f"model.backbone={backbone}", f"model.denoiser_backbone={backbone}", "model.feature_dim=32",
        "diffusion.timesteps=50", "diffusion.sampling_steps=4", "eval.readout=mean_path", *extra])
    model = build_model(cfg, num_classes=num_classes, in_chans=in_chans, image_size=image_size)
    model.train()  # a few train-mode passes: BatchNorm statistics and affine weights away from their defaults
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.momentum = 0.5
        for _ in range(2):
            x = torch.randn(6, in_chans, image_size, image_size)
            g = model.guidance(x)
            model.denoiser.denoise(model.encode(x, g), torch.randn(6, num_classes), g.logits.softmax(1),
                                   torch.arange(6))
    return model.eval()
