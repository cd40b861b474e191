"""Units of the training package: LR schedule, EMA, batch augmentation, test split never used in fit."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES
from torch import nn

from diffmic.config import DiffMICConfig
from diffmic.data.base import DataBundle, ImageArray
from diffmic.training.augment import augment_batch
from diffmic.training.ema import EMA
from diffmic.training.module import warmup_cosine


def test_warmup_cosine_shape():
    kw = {"lr": 1e-3, "min_lr": 0.0, "warmup": 40, "total": 1000}
    assert warmup_cosine(0, **kw) == 0.0  # the very first step has lr 0, as the original
    assert warmup_cosine(20, **kw) == pytest.approx(5e-4)
    assert warmup_cosine(40, **kw) == pytest.approx(1e-3)
    assert warmup_cosine(520, **kw) == pytest.approx(5e-4)
    assert warmup_cosine(1000, **kw) == pytest.approx(0.0, abs=1e-12)
    values = [warmup_cosine(e, **kw) for e in np.linspace(40, 1000, 50)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_ema_tracks_parameters_and_copies_buffers():
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = EMA(net, decay=0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net.train()(torch.randn(8, 3))  # changes BN running stats
    before = [s.clone() for s in ema.shadow.parameters()]
    ema.update(net)
    d = min(0.5, 1 / 10)
    for b, s, p in zip(before, ema.shadow.parameters(), net.parameters()):
        torch.testing.assert_close(s, d * b + (1 - d) * p)
    torch.testing.assert_close(ema.shadow[1].running_mean, net[1].running_mean)
    assert all(not p.requires_grad for p in ema.shadow.parameters())


def test_augment_batch_flips_and_rotates():
    x = torch.zeros(64, 1, 9, 9)
    x[:, :, 0, 0] = 1.0
    out = augment_batch(x, hflip=True, vflip=False, rotation=0.0, generator=torch.Generator().manual_seed(0))
    flipped = out[:, 0, 0, 8] == 1.0
    kept = out[:, 0, 0, 0] == 1.0
    assert (flipped ^ kept).all() and 10 < flipped.sum() < 54
    same = augment_batch(x, hflip=False, vflip=False, rotation=0.0)
    assert torch.equal(same, x)
    rot = augment_batch(torch.ones(4, 3, 16, 16), hflip=False, rotation=30.0,
                        generator=torch.Generator().manual_seed(1))
    assert rot.shape == (4, 3, 16, 16) and rot.min() >= 0 and rot.max() <= 1 + 1e-6


def _synthetic_bundle(n=48, size=28, classes=3, seed=0):
    rng = np.random.default_rng(seed)

    def split(m):
        labels = rng.integers(0, classes, m)
        images = rng.integers(0, 60, (m, size, size, 3)).astype(np.uint8)
        for i, c in enumerate(labels):  # class-dependent bright square: learnable
            images[i, 4 * c: 4 * c + 8, 4 * c: 4 * c + 8] = 250
        return ImageArray(images, labels.astype(np.int64))

    return DataBundle(split(n), split(24), split(24), [f"c{i}" for i in range(classes)], source="synthetic")


@pytest.mark.train
def test_fit_never_reads_the_test_split(tmp_path, monkeypatch):
    from diffmic.training import api
    from diffmic.training.datamodule import ArrayDataModule

    def forbidden(self):
        raise AssertionError("the test split was used during fit")

    monkeypatch.setattr(ArrayDataModule, "test_dataloader", forbidden)
    cfg = DiffMICConfig.from_yaml(None, ["data.path=synthetic", *TINY_OVERRIDES, "train.dcg_pretrain_epochs=1",
                                         "train.epochs=1", f"train.out_dir={tmp_path}", "train.run_name=r",
                                         "data.batch_size=16", "eval.samples=2"])
    result = api.train(cfg, data=_synthetic_bundle())
    assert result.metrics["test"]["num_images"] == 24
    assert math.isfinite(result.metrics["test"]["diffusion"]["acc"])


def test_empty_validation_split_is_an_error(tmp_path):
    from diffmic.errors import DataError
    from diffmic.training import api

    data = _synthetic_bundle()
    data.val = ImageArray(data.val.images[:0], data.val.labels[:0])
    cfg = DiffMICConfig.from_yaml(None, ["data.path=synthetic", *TINY_OVERRIDES, f"train.out_dir={tmp_path}"])
    with pytest.raises(DataError, match="validation split is empty"):
        api.train(cfg, data=data)
