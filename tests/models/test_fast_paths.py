"""Inference fast paths against the eager model (parity only, never timings).

- the mean path rides along with the S chains as one batch (one MLP call per step);
- ``DiffMIC.fuse_for_inference``: BatchNorm folded into the convs (and the denoiser's projection),
  optionally channels-last, as an inference-only copy that leaves the model itself untouched;
- ``predict_*`` under ``torch.inference_mode``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import bn_model as make_model
from torch import nn

from diffmic import save_model
from diffmic.errors import CheckpointError
from diffmic.models import DiffMIC
from diffmic.models.backbones import FeatureMap, fuse_conv_bn

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {"rtol": 1e-5, "atol": 1e-5}  # float32 parity of a fast path


def images(n=3, c=3, size=28, seed=1):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def model() -> DiffMIC:
    return make_model()


# ------------------------------------------------------------------ path + chains in one batch
@pytest.mark.parametrize("samples", [1, 4])
def test_path_rides_with_the_chains(model, samples):
    x = model.normalize(images())
    widths = []
    hook = model.denoiser.lin1.register_forward_hook(lambda m, i, o: widths.append(i[0].shape[0]))
    try:
        with torch.inference_mode():
            guide = model.guidance(x)
            prior = guide.logits.softmax(1)
            feats = model.encode(x, guide)
            chains, path = model.run_chains(feats, prior, samples=samples, path=True, generator=gen())
    finally:
        hook.remove()
    assert widths == [(samples + 1) * 3] * model.sampling_steps  # one MLP call per step for all chains
    with torch.inference_mode():
        ref_chains = model.sample_y0(feats, prior, samples=samples, generator=gen())
        ref_path = model.mean_path(feats, prior)
    torch.testing.assert_close(chains, ref_chains, **TOL)
    torch.testing.assert_close(path, ref_path, **TOL)


def test_forward_mean_path_with_samples_matches_separate_runs(model):
    x = model.normalize(images())
    with torch.inference_mode():
        out = model(x, samples=5, generator=gen())
        guide = model.guidance(x)
        feats = model.encode(x, guide)
        prior = guide.logits.softmax(1)
        ref_chains = model.sample_y0(feats, prior, samples=5, generator=gen())
        ref_path = model.mean_path(feats, prior)
    torch.testing.assert_close(out.y0, ref_chains, **TOL)
    torch.testing.assert_close(out.path, ref_path, **TOL)
    torch.testing.assert_close(out.probs, (ref_path / model.temperature).softmax(1), **TOL)


def test_no_merge_when_the_chains_are_not_plain_ddim(model):
    x = model.normalize(images())
    widths = []
    hook = model.denoiser.lin1.register_forward_hook(lambda m, i, o: widths.append(i[0].shape[0]))
    try:
        with torch.inference_mode():
            model(x, samples=2, generator=gen(), sampler="truncated", num_steps=3)
    finally:
        hook.remove()
    assert widths == [6, 6, 6, 3, 3, 3]  # the 2 chains (B = 3), then the path on its own


# ------------------------------------------------------------------------- BatchNorm folding
def _all_outputs(m: DiffMIC, x: torch.Tensor, samples: int) -> list[torch.Tensor]:
    with torch.inference_mode():
        out = m(m.normalize(x), samples=samples, generator=gen())
    g = out.guidance
    return [out.probs, out.y0, out.prior, out.path, g.logits_global, g.logits_local, g.attention, g.saliency,
            g.features]


@pytest.mark.parametrize("backbone,extra,channels_last", [
    ("test_resnet", (), False),
    ("test_resnet", ("model.share_encoder=true",), True),
    ("resnet18", (), True),  # the presets' backbone, small stem at 28 px
    ("test_resnet", ("model.local_branch=false",), False),  # the ablation without the local branch
])
def test_fused_copy_matches_eager(backbone, extra, channels_last):
    model = make_model(backbone, extra)
    before = copy.deepcopy(model.state_dict())
    fused = model.fuse_for_inference(channels_last=channels_last)
    x = images()
    for a, b in zip(_all_outputs(fused, x, 3), _all_outputs(model, x, 3), strict=True):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(fused.guidance(fused.normalize(x)).corners, model.guidance(model.normalize(x)).corners)
    # folded: no BatchNorm left in the backbones or before the denoiser's projection
    nets = [fused.guidance.global_net, fused.guidance.local_net, fused.denoiser.encoder]
    assert not any(isinstance(m, nn.BatchNorm2d) for n in nets if n is not None for m in n.modules())
    assert isinstance(fused.denoiser.norm0, nn.Identity)
    # the model itself is untouched and still trains
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.guidance.global_net.modules())
    model.train()
    model.eval()
    # the copy is for inference only
    assert fused.inference_only and not model.inference_only
    assert not any(p.requires_grad for p in fused.parameters())
    with pytest.raises(RuntimeError, match="inference-only"):
        fused.train()


def test_fused_copy_user_api_and_refuses_saving(tmp_path):
    model = make_model()
    fused = model.fuse_for_inference()
    x = images(5)
    torch.testing.assert_close(fused.predict_proba(x, samples=2, generator=gen()),
                               model.predict_proba(x, samples=2, generator=gen()), **TOL)
    a, b = fused.predict_details(x, samples=4, generator=gen()), model.predict_details(x, samples=4, generator=gen())
    for key in a:
        torch.testing.assert_close(a[key], b[key], **TOL)
    assert not fused.training  # predict's eval-mode block restores eval, never train
    with pytest.raises(CheckpointError, match="inference-only"):
        save_model(fused, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_fuse_in_place_folds_the_model_itself():
    model = make_model()
    eager = copy.deepcopy(model)
    x = images(4)
    fused = model.fuse_for_inference(inplace=True)
    assert fused is model and model.inference_only and not eager.inference_only
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.guidance.global_net.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in eager.guidance.global_net.modules())
    for a, b in zip(_all_outputs(model, x, 3), _all_outputs(eager, x, 3), strict=True):
        torch.testing.assert_close(a, b, **TOL)
    with pytest.raises(RuntimeError, match="inference-only"):
        model.train()


class _NormAfterAct(nn.Module):
    """Names like timm's ResNet, but BatchNorm after the activation: folding it would be wrong."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(dim)
        with torch.no_grad():
            self.bn1.running_mean.fill_(0.7)
            self.bn1.weight.fill_(-1.3)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(torch.relu(self.conv1(x)))


def test_fuse_keeps_a_backbone_whose_forward_does_not_fit():
    model = make_model()
    dim = model.guidance.mil.u.in_features
    model.guidance.local_net = FeatureMap(_NormAfterAct(3, dim)).eval()
    assert fuse_conv_bn(copy.deepcopy(model.guidance.local_net)) == 1  # the name rule alone would fold it
    fused = model.fuse_for_inference()
    assert isinstance(fused.guidance.local_net.model.bn1, nn.BatchNorm2d)  # the check kept the original
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.guidance.global_net.modules())
    x = images()
    for a, b in zip(_all_outputs(fused, x, 2), _all_outputs(model, x, 2), strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_fuse_conv_bn_patterns():
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        for m in seq:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 9, 9)
    ref = seq(x)
    assert fuse_conv_bn(seq) == 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in seq)
    torch.testing.assert_close(seq(x), ref, **TOL)


# ------------------------------------------------------------------------- inference_mode
def test_predict_runs_in_inference_mode(model):
    seen = []
    hook = model.guidance.register_forward_hook(lambda m, i, o: seen.append(torch.is_inference_mode_enabled()))
    try:
        probs = model.predict_proba(images(2))
    finally:
        hook.remove()
    assert seen == [True] and probs.shape == (2, 4)
    assert float(probs.sum(1).sub(1).abs().max()) < 1e-5 and probs.clone().add_(1).shape == (2, 4)


def test_channels_last_by_default_above_64_px():
    small, large = make_model(), make_model(image_size=96)
    fused_small, fused_large = small.fuse_for_inference(), large.fuse_for_inference()
    assert type(fused_small.guidance.global_net).__name__ == "FeatureMap"
    assert type(fused_large.guidance.global_net).__name__ == "_ChannelsLast"
    x = images(2, size=96)
    for a, b in zip(_all_outputs(fused_large, x, 2), _all_outputs(large, x, 2), strict=True):
        torch.testing.assert_close(a, b, **TOL)
