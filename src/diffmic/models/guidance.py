"""DCG: the dual-granularity conditional guidance network (DiffMIC §2; GMIC, Shen et al. 2021).

Global branch: backbone feature map -> 1x1 conv class activation map (CAM) -> top-t% pooling ->
global logits. Local branch: K ROI crops chosen greedily on the saliency map -> backbone ->
gated-attention MIL (Ilse et al. 2018) -> local logits. Fused logits are the mean of the two.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffmic.models.backbones import FeatureMap, create_backbone, small_input_default
from diffmic.models.roi import (
    cells_to_pixels,
    crop_batch,
    greedy_max_windows,
    saliency_map,
    window_size,
)


class GuidanceOutput(NamedTuple):
    """What the DCG returns; every field is a tensor on the input's device."""

    logits: Tensor  # fused logits w·g + (1 − w)·l, w = global_weight (0.5: ½(g + l)), (B, C)
    logits_global: Tensor  # g, (B, C)
    logits_local: Tensor  # l, (B, C)
    saliency: Tensor  # CAM, (B, C, h, w), raw logits
    corners: Tensor  # ROI upper-left pixels (row, col), (B, K, 2) long
    attention: Tensor  # MIL attention weights over crops, (B, K)
    features: Tensor  # pooled global features, (B, F)


def default_crop_size(image_size: int) -> int:
    """ROI crop side that scales with the image: 32 px at 224 (the original), at least 8."""
    return max(8, round(image_size / 7))


def top_t_pool(cam: Tensor, t: float) -> Tensor:
    """Mean of the top ⌈t·h·w⌉ CAM values per class: (B, C, h, w) -> (B, C); t=1 is a mean."""
    flat = cam.flatten(2)
    k = max(1, math.ceil(flat.shape[2] * t))
    if k == flat.shape[2]:
        return flat.mean(dim=2)
    return flat.topk(k, dim=2).values.mean(dim=2)


class GatedAttentionMIL(nn.Module):
    """Gated attention pooling a_k = wᵀ[σ(U h_k) ⊙ tanh(V h_k)] (Ilse et al. 2018), then a linear head."""

    def __init__(self, in_features: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.u = nn.Linear(in_features, hidden, bias=False)
        self.v = nn.Linear(in_features, hidden, bias=False)
        self.w = nn.Linear(hidden, 1, bias=False)
        self.classifier = nn.Linear(in_features, num_classes, bias=False)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """h: (B, K, F) -> logits (B, C), attention (B, K)."""
        a = self.w(torch.sigmoid(self.u(h)) * torch.tanh(self.v(h))).squeeze(-1)  # (B, K)
        alpha = a.softmax(dim=1)
        z = (alpha.unsqueeze(-1) * h).sum(dim=1)  # (B, F)
        return self.classifier(z), alpha


class DCG(nn.Module):
    """Dual-granularity conditional guidance network.

    Args:
        num_classes: C.
        in_chans: image channels (1 or 3); crops keep all channels.
        image_size: input side in pixels (square inputs), used for the defaults below.
        backbone: timm name of the global backbone.
        local_backbone: timm name of the local backbone (None: same as ``backbone``).
        pretrained: ImageNet weights for both backbones.
        small_input: small stem for both backbones (None: ``image_size <= 64``).
        cam_size: resize the CAM to this side (None: the backbone's feature-map size).
        num_crops: K, number of ROI crops.
        crop_size: crop side in pixels (None: :func:`default_crop_size`).
        top_t: fraction of CAM positions averaged for the global logits (1.0 = mean).
        mil_hidden: hidden width of the gated attention.
        roi_saliency: the map the crops are chosen on: ``class_sum`` (GMIC: sum of the min-max
            normalised class maps), ``top_class`` or ``prior_weighted`` (the class maps of, or
            weighted by, the global branch's softmax: the fused prior itself needs the crops).
        local_branch: False drops the local branch (the paper's ablation): no crops are taken
            (``corners``/``attention`` have K = 0 columns), and the fused, global and local logits
            are all the global branch's.
        global_weight: w of the fused logits w·g + (1 − w)·l; 0.5 is the original's mean ½(g + l).
            Ignored without the local branch.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        in_chans: int = 3,
        image_size: int = 224,
        backbone: str = "resnet18",
        local_backbone: str | None = None,
        pretrained: bool = False,
        small_input: bool | None = None,
        cam_size: int | None = None,
        num_crops: int = 6,
        crop_size: int | None = None,
        top_t: float = 1.0,
        mil_hidden: int = 128,
        roi_saliency: str = "class_sum",
        local_branch: bool = True,
        global_weight: float = 0.5,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.image_size = image_size
        self.num_crops = num_crops
        self.crop_size = min(crop_size or default_crop_size(image_size), image_size)
        self.cam_size = cam_size
        self.top_t = top_t
        self.roi_saliency = roi_saliency
        self.local_branch = local_branch
        if not 0.0 <= global_weight <= 1.0:
            raise ValueError(f"global_weight must be in [0, 1], got {global_weight}")
        self.global_weight = float(global_weight)
        if small_input is None:
            small_input = small_input_default(image_size)
        net, dim = create_backbone(backbone, in_chans=in_chans, pretrained=pretrained, small_input=small_input)
        self.global_net = FeatureMap(net)
        self.cam = nn.Conv2d(dim, num_classes, kernel_size=1, bias=False)
        self.local_net: FeatureMap | None = None
        self.mil: GatedAttentionMIL | None = None
        if local_branch:
            local, local_dim = create_backbone(
                local_backbone or backbone,
                in_chans=in_chans,
                pretrained=pretrained,
                small_input=small_input,  # as the global branch: 32-px crops of a 224 image keep the cheap stem
            )
            self.local_net = FeatureMap(local)
            self.mil = GatedAttentionMIL(local_dim, mil_hidden, num_classes)
        self.feature_dim = dim

    def forward(self, x: Tensor) -> GuidanceOutput:
        """x: normalised images (B, in_chans, H, W)."""
        b = x.shape[0]
        fmap = self.global_net(x)  # (B, F, h, w)
        cam = self.cam(fmap)  # (B, C, h, w)
        if self.cam_size is not None and cam.shape[-1] != self.cam_size:
            cam = F.interpolate(cam, size=(self.cam_size, self.cam_size), mode="bilinear", align_corners=False)
        logits_global = top_t_pool(cam, self.top_t)
        if self.local_net is None or self.mil is None:  # ablation: the global branch alone
            return GuidanceOutput(
                logits=logits_global,
                logits_global=logits_global,
                logits_local=logits_global,
                saliency=cam,
                corners=torch.zeros(b, 0, 2, dtype=torch.long, device=x.device),
                attention=x.new_zeros(b, 0),
                features=fmap.mean(dim=(2, 3)),
            )
        crop = (self.crop_size, self.crop_size)
        map_hw, image_hw = (cam.shape[2], cam.shape[3]), (x.shape[2], x.shape[3])
        with torch.no_grad():
            sal = saliency_map(cam, logits_global.softmax(dim=1), self.roi_saliency)
            cells = greedy_max_windows(sal, window_size(crop, map_hw, image_hw), self.num_crops)
            corners = cells_to_pixels(cells, map_hw, image_hw, crop)  # (B, K, 2)
        crops = crop_batch(x, corners, crop).flatten(0, 1)  # (B*K, C_in, ch, cw)
        h = self.local_net(crops).mean(dim=(2, 3)).view(b, self.num_crops, -1)  # (B, K, F_l)
        logits_local, attention = self.mil(h)
        return GuidanceOutput(  # w = 0.5 keeps the original's expression, bit for bit (saved models, ONNX parity)
            logits=0.5 * (logits_global + logits_local) if self.global_weight == 0.5
            else self.global_weight * logits_global + (1.0 - self.global_weight) * logits_local,
            logits_global=logits_global,
            logits_local=logits_local,
            saliency=cam,
            corners=corners,
            attention=attention,
            features=fmap.mean(dim=(2, 3)),
        )
