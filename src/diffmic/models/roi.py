"""ROI retrieval as pure tensor geometry (vectorised, on the input's device, no NumPy).

GMIC-style greedy max-window selection on a saliency map, fixed for the original's edge cases:
constant class maps do not divide by zero, and a taken window is not re-selected while any window
with fewer taken cells remains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SALIENCY_MODES = ("class_sum", "top_class", "prior_weighted")


def _minmax(cam: Tensor, eps: float) -> Tensor:
    """Each class map min-max normalised over space: (B, C, h, w) -> (B, C, h*w) in [0, 1]."""
    flat = cam.flatten(2)  # (B, C, h*w)
    lo = flat.min(dim=2, keepdim=True).values
    hi = flat.max(dim=2, keepdim=True).values
    return (flat - lo) / (hi - lo).clamp(min=eps)


def normalize_saliency(cam: Tensor, eps: float = 1e-6) -> Tensor:
    """Min-max normalise each class map over space and sum over classes (GMIC's rule).

    Args:
        cam: class activation maps (B, C, h, w).

    Returns:
        Saliency (B, h, w) with values in [0, C]; a constant class map contributes 0.
    """
    return _minmax(cam, eps).sum(dim=1).reshape(cam.shape[0], *cam.shape[2:])


def saliency_map(cam: Tensor, class_probs: Tensor, mode: str = "class_sum", eps: float = 1e-6) -> Tensor:
    """The map the ROI windows are chosen on, (B, h, w).

    ``class_sum``: GMIC's sum of the min-max normalised class maps. Made for multi-label sigmoid
    outputs: under a softmax over 2 classes the two maps' learned parts are negatives of each other
    and the sum flattens. ``top_class``: the normalised map of the most probable class of
    ``class_probs`` (B, C); ``prior_weighted``: the normalised maps weighted by ``class_probs``.
    """
    if mode == "class_sum":
        return normalize_saliency(cam, eps)
    norm = _minmax(cam, eps)  # (B, C, h*w)
    if mode == "top_class":
        top = class_probs.argmax(dim=1)
        picked = norm[torch.arange(len(top), device=cam.device), top]  # (B, h*w)
    elif mode == "prior_weighted":
        picked = (class_probs.unsqueeze(-1) * norm).sum(dim=1)
    else:
        raise ValueError(f"unknown saliency mode {mode!r}; choose from {list(SALIENCY_MODES)}")
    return picked.reshape(cam.shape[0], *cam.shape[2:])


def greedy_max_windows(saliency: Tensor, window: tuple[int, int], k: int) -> Tensor:
    """Pick ``k`` windows greedily by maximum mean saliency, masking each pick.

    Args:
        saliency: (B, h, w) non-negative map.
        window: window size (wh, ww) in map cells, 1 <= wh <= h, 1 <= ww <= w.
        k: number of windows.

    Returns:
        Upper-left cells (B, k, 2) as (row, col), long. Ties go to the first cell in row-major
        order. A window overlapping already-taken cells is chosen only when every window does.
    """
    _, h, w = saliency.shape
    wh, ww = min(window[0], h), min(window[1], w)
    s = saliency.detach().unsqueeze(1).float()  # (B, 1, h, w)
    taken = torch.zeros_like(s)
    out_w = w - ww + 1
    picks = []
    for _ in range(k):
        score = F.avg_pool2d(s * (1 - taken), (wh, ww), stride=1)  # (B, 1, h-wh+1, w-ww+1)
        overlap = F.avg_pool2d(taken, (wh, ww), stride=1)
        # Lexicographic: fewest taken cells first, then highest saliency (saliency mean < C + 1).
        key = score - overlap * (s.amax(dim=(2, 3), keepdim=True) + 1.0) * 1e3
        idx = key.flatten(1).argmax(dim=1)  # (B,)
        row, col = idx // out_w, idx % out_w
        picks.append(torch.stack([row, col], dim=1))
        rr = torch.arange(h, device=s.device).view(1, h, 1)
        cc = torch.arange(w, device=s.device).view(1, 1, w)
        inside = (
            (rr >= row.view(-1, 1, 1)) & (rr < row.view(-1, 1, 1) + wh)
            & (cc >= col.view(-1, 1, 1)) & (cc < col.view(-1, 1, 1) + ww)
        )
        taken = torch.maximum(taken, inside.unsqueeze(1).float())
    return torch.stack(picks, dim=1)


def window_size(crop: tuple[int, int], map_hw: tuple[int, int], image_hw: tuple[int, int]) -> tuple[int, int]:
    """Crop size in pixels -> window size in saliency-map cells (at least 1, at most the map)."""
    wh = max(1, min(map_hw[0], round(crop[0] * map_hw[0] / image_hw[0])))
    ww = max(1, min(map_hw[1], round(crop[1] * map_hw[1] / image_hw[1])))
    return wh, ww


def cells_to_pixels(
    cells: Tensor, map_hw: tuple[int, int], image_hw: tuple[int, int], crop: tuple[int, int]
) -> Tensor:
    """Upper-left map cells (B, K, 2) -> upper-left pixels, clamped so the crop fits the image."""
    scale = torch.tensor(
        [image_hw[0] / map_hw[0], image_hw[1] / map_hw[1]], device=cells.device, dtype=torch.float64
    )
    px = torch.round(cells.double() * scale).long()
    limit = torch.tensor([image_hw[0] - crop[0], image_hw[1] - crop[1]], device=cells.device)
    return torch.minimum(px.clamp(min=0), limit.clamp(min=0))


def crop_batch(images: Tensor, corners: Tensor, crop: tuple[int, int]) -> Tensor:
    """Extract crops with one gather (all channels; differentiable w.r.t. ``images``).

    Args:
        images: (B, C, H, W).
        corners: upper-left pixels (B, K, 2), each crop inside the image.
        crop: (ch, cw) crop size.

    Returns:
        (B, K, C, ch, cw).
    """
    b, c, _, _ = images.shape
    k = corners.shape[1]
    rows = corners[..., 0:1] + torch.arange(crop[0], device=images.device)  # (B, K, ch)
    cols = corners[..., 1:2] + torch.arange(crop[1], device=images.device)  # (B, K, cw)
    bidx = torch.arange(b, device=images.device).view(b, 1, 1, 1)
    patches = images.permute(0, 2, 3, 1)[bidx, rows[..., :, None], cols[..., None, :]]  # (B,K,ch,cw,C)
    return patches.permute(0, 1, 4, 2, 3).reshape(b, k, c, crop[0], crop[1])
