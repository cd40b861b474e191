"""eval_mode: eval for the block, each submodule's own train/eval mode back afterwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from diffmic.config import DiffMICConfig
from diffmic.data.base import ImageArray
from diffmic.evaluation.report import predict_readouts
from diffmic.models import build_model
from diffmic.models.modes import eval_mode


def modes(module: nn.Module) -> list[bool]:
    return [m.training for m in module.modules()]


def test_mixed_modes_come_back_even_after_an_error():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Sequential(nn.Dropout(), nn.Linear(2, 2)))
    net.train()
    net[1].eval()  # a frozen part held in eval mode inside a training module
    before = modes(net)
    with eval_mode(net) as same:
        assert same is net and not any(modes(net))
    assert modes(net) == before
    with pytest.raises(RuntimeError, match="boom"), eval_mode(net):
        raise RuntimeError("boom")
    assert modes(net) == before


def test_predict_readouts_runs_in_eval_mode_and_restores_training():
    torch.manual_seed(0)
    cfg = DiffMICConfig.from_yaml(None, ["data.path=x", "model.backbone=test_resnet",
                                         "model.denoiser_backbone=test_resnet", "model.feature_dim=16",
                                         "diffusion.timesteps=20", "diffusion.sampling_steps=2"])
    model = build_model(cfg, num_classes=2, in_chans=1, image_size=28).train()
    rng = np.random.default_rng(0)
    data = ImageArray(rng.integers(0, 256, (6, 28, 28, 1), dtype=np.uint8), rng.integers(0, 2, 6))
    stats = [b.clone() for b in model.buffers()]
    _, prior, _ = predict_readouts(model, data, readouts=("mean_path",))
    assert model.training and all(m.training for m in model.modules())
    # eval mode inside: BatchNorm used (and did not update) its running statistics
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers(), strict=True))
    with eval_mode(model):
        again = model.guidance(model.normalize(torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255))
    assert torch.allclose(prior, again.logits.softmax(1), atol=1e-6)
