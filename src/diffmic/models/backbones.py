"""Backbone factory over timm, with a small-input stem for 28x28 / 64x64 images."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from diffmic.errors import ConfigError, first_line


def small_input_default(image_size: int) -> bool:
    """Whether a 3x3 stride-1 stem without max-pool is used by default (inputs <= 64 px)."""
    return image_size <= 64


def _make_small_stem(model: nn.Module, name: str) -> None:
    """Replace a stride-4 ImageNet stem by a 3x3 stride-1 conv and drop the max-pool (in place)."""
    if hasattr(model, "conv1") and hasattr(model, "maxpool"):
        conv1 = model.conv1
        if isinstance(conv1, nn.Conv2d):
            model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, 1, 1, bias=False)
        else:  # deep stem (resnet*t/d): a Sequential whose first conv carries the stride
            first = next(m for m in conv1.modules() if isinstance(m, nn.Conv2d))
            first.stride = (1, 1)
        model.maxpool = nn.Identity()
        return
    if hasattr(model, "conv_stem") and isinstance(model.conv_stem, nn.Conv2d):  # efficientnet-like
        model.conv_stem.stride = (1, 1)
        return
    raise ConfigError(
        f"model.small_input is not supported for backbone {name!r} (supported: ResNet-like "
        "models with conv1/maxpool and EfficientNet/MobileNet-like models with conv_stem); "
        "set model.small_input=false or use a larger data.image_size"
    )


def create_backbone(
    name: str,
    *,
    in_chans: int = 3,
    pretrained: bool = False,
    small_input: bool = False,
    pooled: bool = False,
) -> tuple[nn.Module, int]:
    """Create a timm backbone without classifier.

    Args:
        name: a timm model name (e.g. ``resnet18``, ``resnet50``, ``efficientnet_b0``).
        in_chans: number of image channels.
        pretrained: load ImageNet weights (downloads them the first time).
        small_input: use a 3x3 stride-1 stem without max-pool.
        pooled: return pooled (B, F) features; otherwise the (B, F, h, w) feature map.

    Returns:
        The module and its feature dimension F.
    """
    import timm  # imported lazily: keeps ``import diffmic`` light

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0][:6]}*")[:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"unknown backbone {name!r}: not a timm model name{hint}")
    try:
        model = timm.create_model(
            name,
            pretrained=pretrained,
            in_chans=in_chans,
            num_classes=0,
            global_pool="avg" if pooled else "",
        )
    except Exception as exc:  # noqa: BLE001 - network / hub errors when downloading weights
        if pretrained:
            raise ConfigError(
                f"could not load pretrained weights for {name!r} ({first_line(exc, 120)}); "
                "this needs network access once, or set "
                "model.pretrained=false to train from scratch"
            ) from None
        raise ConfigError(f"could not create backbone {name!r}: {exc}") from None
    if small_input:
        _make_small_stem(model, name)
    return model, int(model.num_features)


class FeatureMap(nn.Module):
    """Wrap a timm model so that ``forward`` returns its (B, F, h, w) feature map."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model.forward_features(x)
        if out.ndim != 4:
            raise ConfigError(
                f"backbone returns {tuple(out.shape)} features, not a (B, F, h, w) map: "
                "the DCG needs a convolutional backbone"
            )
        return out


def _bn_partner(name: str) -> str | None:
    """The conv a BatchNorm named like timm's ResNet blocks normalises: ``bn2`` -> ``conv2``, ``bn`` -> ``conv``."""
    if name == "bn" or (name.startswith("bn") and name[2:].isdigit()):
        return "conv" + name[2:]
    return None


def fuse_conv_bn(module: nn.Module) -> int:
    """Fold every eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` into that conv, in place.

    Two patterns are recognised: a ``BatchNorm2d`` right after a ``Conv2d`` inside an
    ``nn.Sequential`` (ResNet downsample paths), and sibling attributes ``convN`` / ``bnN`` (timm's
    ResNet stems and blocks, whose ``forward`` applies ``bnN`` straight to ``convN``'s output; a
    ``convN`` that is a Sequential ending in a ``Conv2d``, the deep stem, counts as that conv).
    Only plain ``nn.BatchNorm2d`` is folded (timm's ``BatchNormAct2d`` carries an activation and
    is left alone). The folded BatchNorm becomes ``nn.Identity``. Inference only: the statistics
    are frozen into the weights. Callers should compare outputs before and after
    (:meth:`diffmic.models.DiffMIC.fuse_for_inference` does). Returns the number of folds.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folds = 0
    for parent in list(module.modules()):
        children = dict(parent.named_children())
        if isinstance(parent, nn.Sequential):
            names = list(children)
            for a, b in itertools.pairwise(names):
                conv, bn = children[a], children[b]
                if isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d:
                    setattr(parent, a, fuse_conv_bn_eval(conv.eval(), bn.eval()))
                    setattr(parent, b, nn.Identity())
                    folds += 1
            continue
        for name, bn in children.items():
            partner = _bn_partner(name)
            if type(bn) is not nn.BatchNorm2d or partner is None or partner not in children:
                continue
            conv, holder, attr = children[partner], parent, partner
            if isinstance(conv, nn.Sequential) and len(conv) and isinstance(conv[-1], nn.Conv2d):
                holder, attr, conv = conv, str(len(conv) - 1), conv[-1]
            if not isinstance(conv, nn.Conv2d):
                continue
            setattr(holder, attr, fuse_conv_bn_eval(conv.eval(), bn.eval()))
            setattr(parent, name, nn.Identity())
            folds += 1
    return folds
