"""timm backbone factory: small-input stem, pooled/unpooled outputs, channels, errors."""

from __future__ import annotations

import pytest
import torch

from diffmic.errors import ConfigError
from diffmic.models.backbones import FeatureMap, create_backbone, small_input_default

pytestmark = pytest.mark.usefixtures("one_thread")


def test_small_input_default():
    assert small_input_default(28) and small_input_default(64)
    assert not small_input_default(65) and not small_input_default(224)


@torch.no_grad()
def test_resnet18_small_stem_keeps_spatial_resolution_at_28():
    x = torch.randn(1, 3, 28, 28)
    small, dim = create_backbone("resnet18", small_input=True)
    assert dim == 512
    assert small.eval().forward_features(x).shape == (1, 512, 4, 4)
    big, _ = create_backbone("resnet18", small_input=False)
    assert big.eval().forward_features(x).shape == (1, 512, 1, 1)
    # the small stem is a 3x3 stride-1 conv and no max-pool
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)


@torch.no_grad()
@pytest.mark.parametrize("size,small,expected", [(28, True, 4), (28, False, 1), (64, True, 8), (64, False, 2),
                                                 (224, False, 7)])
def test_test_resnet_feature_map_sizes(size, small, expected):
    net, dim = create_backbone("test_resnet", small_input=small)
    out = FeatureMap(net).eval()(torch.randn(1, 3, size, size))
    assert out.shape == (1, dim, expected, expected)


@torch.no_grad()
@pytest.mark.parametrize("in_chans", [1, 3])
def test_in_chans_and_pooled(in_chans):
    net, dim = create_backbone("test_resnet", in_chans=in_chans, pooled=True, small_input=True)
    out = net.eval()(torch.randn(2, in_chans, 28, 28))
    assert out.shape == (2, dim)
    with pytest.raises(RuntimeError):
        net(torch.randn(2, 4 - in_chans if in_chans == 1 else 1, 28, 28))


def test_unknown_backbone_raises_config_error():
    with pytest.raises(ConfigError, match="resnet_does_not_exist"):
        create_backbone("resnet_does_not_exist")


@torch.no_grad()
def test_efficientnet_small_stem():
    net, _ = create_backbone("test_efficientnet", small_input=True)
    big, _ = create_backbone("test_efficientnet", small_input=False)
    x = torch.randn(1, 3, 32, 32)
    assert net.conv_stem.stride == (1, 1)
    assert net.eval().forward_features(x).shape[-1] == 2 * big.eval().forward_features(x).shape[-1]


def test_small_stem_unsupported_raises_config_error():
    with pytest.raises(ConfigError, match="small_input"):
        create_backbone("test_vit", small_input=True)


@torch.no_grad()
def test_feature_map_rejects_non_convolutional_backbone():
    net, _ = create_backbone("test_vit")
    size = net.default_cfg.get("input_size", (3, 160, 160))[-1]
    with pytest.raises(ConfigError, match="feature"):
        FeatureMap(net).eval()(torch.randn(1, 3, size, size))
