"""ROI geometry: saliency normalisation, greedy max-window selection, cell->pixel mapping, crops."""

from __future__ import annotations

import itertools

import pytest
import torch

from diffmic.models.roi import (
    cells_to_pixels,
    crop_batch,
    greedy_max_windows,
    normalize_saliency,
    window_size,
)


def picks(sal: torch.Tensor, window=(1, 1), k=6) -> list[tuple[int, int]]:
    out = greedy_max_windows(sal.unsqueeze(0), window, k)
    assert out.shape == (1, k, 2) and out.dtype == torch.long
    return [tuple(p) for p in out[0].tolist()]


def greedy_reference(sal: torch.Tensor, window: tuple[int, int], k: int) -> list[tuple[int, int]]:
    """Brute force: fewest taken cells first, then largest saliency sum over untaken cells, then row-major."""
    h, w = sal.shape
    wh, ww = window
    taken = torch.zeros(h, w, dtype=torch.bool)
    out = []
    for _ in range(k):
        best, best_key = None, None
        for r, c in itertools.product(range(h - wh + 1), range(w - ww + 1)):
            cells = taken[r:r + wh, c:c + ww]
            key = (-int(cells.sum()), float((sal[r:r + wh, c:c + ww] * (~cells)).sum()))
            if best_key is None or key > best_key:
                best, best_key = (r, c), key
        out.append(best)
        taken[best[0]:best[0] + wh, best[1]:best[1] + ww] = True
    return out


# --------------------------------------------------------------------------- normalize_saliency
def test_normalize_saliency_minmax_per_class_then_sum():
    cam = torch.zeros(1, 2, 3, 3)
    cam[0, 0] = torch.arange(9.0).view(3, 3)  # min 0, max 8
    cam[0, 1] = -torch.arange(9.0).view(3, 3) * 2 + 5  # reversed
    s = normalize_saliency(cam)
    assert s.shape == (1, 3, 3)
    expected = torch.arange(9.0).view(3, 3) / 8 + (8 - torch.arange(9.0).view(3, 3)) / 8
    torch.testing.assert_close(s[0], expected)


def test_normalize_saliency_constant_map_no_nan():
    cam = torch.full((2, 3, 7, 7), 4.2)
    s = normalize_saliency(cam)
    assert torch.isfinite(s).all()
    assert (s == 0).all()
    # one constant class next to a varying one: the constant one contributes 0
    cam[0, 1] = torch.rand(7, 7, generator=torch.Generator().manual_seed(0))
    s = normalize_saliency(cam)
    assert torch.isfinite(s).all()
    assert s[0].max().item() == pytest.approx(1.0) and s[0].min().item() == pytest.approx(0.0)


def test_normalize_saliency_range():
    cam = torch.randn(3, 5, 7, 7, generator=torch.Generator().manual_seed(1)) * 10
    s = normalize_saliency(cam)
    assert (s >= 0).all() and (s <= 5 + 1e-5).all()


# --------------------------------------------------------------------------- greedy_max_windows
def test_single_hot_cell_then_row_major():
    sal = torch.zeros(7, 7)
    sal[3, 4] = 1.0
    assert picks(sal) == [(3, 4), (0, 0), (0, 1), (0, 2), (0, 3), (0, 4)]


def test_single_hot_cell_in_first_row_is_not_repicked():
    sal = torch.zeros(7, 7)
    sal[0, 1] = 2.0
    assert picks(sal) == [(0, 1), (0, 0), (0, 2), (0, 3), (0, 4), (0, 5)]


def test_two_blobs_hottest_first():
    sal = torch.zeros(7, 7)
    sal[5, 6] = 3.0
    sal[1, 1] = 5.0
    sal[4, 2] = 1.0
    assert picks(sal, k=3) == [(1, 1), (5, 6), (4, 2)]


def test_ordered_by_value():
    g = torch.Generator().manual_seed(0)
    sal = torch.rand(7, 7, generator=g)
    order = torch.argsort(sal.flatten(), descending=True)[:6]
    expected = [(int(i) // 7, int(i) % 7) for i in order]
    assert picks(sal) == expected


def test_constant_map_gives_distinct_row_major_cells():
    s = normalize_saliency(torch.ones(1, 3, 7, 7))
    out = greedy_max_windows(s, (1, 1), 6)
    assert [tuple(p) for p in out[0].tolist()] == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5)]


def test_never_repicks_while_untaken_cells_exist():
    sal = torch.zeros(2, 2)
    sal[1, 1] = 1.0
    got = picks(sal, k=4)
    assert got[0] == (1, 1)
    assert len(set(got)) == 4
    # more picks than cells: still valid indices, first 4 all distinct
    got = picks(sal, k=6)
    assert len(set(got[:4])) == 4
    assert all(0 <= r < 2 and 0 <= c < 2 for r, c in got)


def test_hot_2x2_region_window_2():
    sal = torch.zeros(7, 7)
    sal[2:4, 3:5] = 1.0  # hottest 2x2 region, upper-left (2, 3)
    sal[5:7, 0:2] = 0.8  # second region, upper-left (5, 0)
    got = picks(sal, window=(2, 2), k=3)
    assert got[0] == (2, 3)
    assert got[1] == (5, 0)
    # third pick must not overlap the two taken windows (disjoint windows exist)
    r, c = got[2]
    taken = {(2 + i, 3 + j) for i in range(2) for j in range(2)} | {(5 + i, j) for i in range(2) for j in range(2)}
    assert not ({(r + i, c + j) for i in range(2) for j in range(2)} & taken)


def test_window_2_tie_goes_to_first_row_major():
    sal = torch.zeros(7, 7)
    sal[3, 3] = 1.0  # windows (2,2), (2,3), (3,2), (3,3) all have mean 1/4
    assert picks(sal, window=(2, 2), k=1) == [(2, 2)]


def test_partially_taken_windows_are_avoided():
    # 3x4 map, window 2x2: the hot column pair is picked first; the next window must not overlap it
    sal = torch.tensor([[0.0, 0.0, 9.0, 9.0], [0.0, 0.0, 9.0, 9.0], [0.0, 0.0, 8.0, 8.0]])
    got = picks(sal, window=(2, 2), k=2)
    assert got[0] == (0, 2)
    assert got[1] == (0, 0)  # (1, 2) would score 8+8 but overlaps taken cells


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape,window,k", [((7, 7), (1, 1), 6), ((7, 7), (2, 2), 6), ((5, 8), (2, 3), 5),
                                              ((4, 4), (3, 3), 3), ((6, 6), (2, 1), 8)])
def test_matches_bruteforce_reference(seed, shape, window, k):
    g = torch.Generator().manual_seed(seed)
    sal = torch.rand(*shape, generator=g) * 3
    assert picks(sal, window, k) == greedy_reference(sal, window, k)


def test_batch_elements_independent():
    g = torch.Generator().manual_seed(3)
    sal = torch.rand(4, 7, 7, generator=g)
    batch = greedy_max_windows(sal, (2, 2), 5)
    for b in range(4):
        assert torch.equal(batch[b], greedy_max_windows(sal[b:b + 1], (2, 2), 5)[0])


def test_window_size_original_geometry():
    assert window_size((32, 32), (7, 7), (224, 224)) == (1, 1)
    assert window_size((64, 64), (7, 7), (224, 224)) == (2, 2)
    assert window_size((8, 8), (28, 28), (28, 28)) == (8, 8)
    assert window_size((1, 1), (7, 7), (224, 224)) == (1, 1)  # at least 1
    assert window_size((500, 500), (7, 7), (224, 224)) == (7, 7)  # at most the map


# --------------------------------------------------------------------------- cells_to_pixels
def test_cells_to_pixels_original_geometry():
    cells = torch.tensor([[[i, j] for i in range(7) for j in range(7)]])  # (1, 49, 2)
    px = cells_to_pixels(cells, (7, 7), (224, 224), (32, 32))
    assert px.dtype == torch.long
    assert torch.equal(px, cells * 32)
    assert (px % 32 == 0).all() and px.min() >= 0 and px.max() <= 192


def test_cells_to_pixels_clamps_at_border():
    cells = torch.tensor([[[3, 3], [0, 0], [2, 1]]])
    px = cells_to_pixels(cells, (4, 4), (28, 28), (8, 8))
    assert px.tolist() == [[[20, 20], [0, 0], [14, 7]]]  # 21 -> clamped to 28 - 8
    # non-square image / crop
    cells = torch.tensor([[[6, 6]]])
    px = cells_to_pixels(cells, (7, 7), (70, 140), (15, 30))
    assert px.tolist() == [[[55, 110]]]  # 60 -> 70-15, 120 -> 140-30


def test_cells_to_pixels_rounds():
    cells = torch.tensor([[[1, 2]]])
    px = cells_to_pixels(cells, (3, 3), (64, 64), (8, 8))
    assert px.tolist() == [[[21, 43]]]  # round(21.33), round(42.67)


# --------------------------------------------------------------------------- crop_batch
def _loop_crops(images, corners, crop):
    out = torch.empty(images.shape[0], corners.shape[1], images.shape[1], *crop, dtype=images.dtype)
    for b in range(images.shape[0]):
        for k in range(corners.shape[1]):
            r, c = corners[b, k].tolist()
            out[b, k] = images[b, :, r:r + crop[0], c:c + crop[1]]
    return out


@pytest.mark.parametrize("crop", [(4, 4), (3, 5), (1, 1), (12, 7)])
@pytest.mark.parametrize("channels", [1, 3])
def test_crop_batch_matches_loop(crop, channels):
    g = torch.Generator().manual_seed(0)
    B, H, W, K = 3, 12, 15, 5
    images = torch.randn(B, channels, H, W, generator=g)
    rows = torch.randint(0, H - crop[0] + 1, (B, K), generator=g)
    cols = torch.randint(0, W - crop[1] + 1, (B, K), generator=g)
    corners = torch.stack([rows, cols], dim=-1)
    out = crop_batch(images, corners, crop)
    assert out.shape == (B, K, channels, *crop)
    assert torch.equal(out, _loop_crops(images, corners, crop))


def test_crop_batch_every_channel_distinct():
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    corners = torch.tensor([[[1, 2]], [[3, 0]]])
    out = crop_batch(images, corners, (2, 3))
    for ch in range(3):
        assert torch.equal(out[0, 0, ch], images[0, ch, 1:3, 2:5])
        assert torch.equal(out[1, 0, ch], images[1, ch, 3:5, 0:3])


def test_crop_batch_gradient_counts_coverage():
    images = torch.randn(2, 3, 8, 8, requires_grad=True)
    corners = torch.tensor([[[0, 0], [2, 2], [0, 0]], [[5, 4], [0, 1], [3, 3]]])
    crop = (3, 4)
    crop_batch(images, corners, crop).sum().backward()
    expected = torch.zeros(2, 3, 8, 8)
    for b in range(2):
        for r, c in corners[b].tolist():
            expected[b, :, r:r + crop[0], c:c + crop[1]] += 1
    assert torch.equal(images.grad, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.float32])
def test_crop_batch_keeps_dtype_and_device(dtype):
    images = torch.randn(2, 3, 10, 10).to(dtype)
    corners = torch.tensor([[[0, 0], [5, 5]], [[2, 3], [6, 1]]])
    out = crop_batch(images, corners, (4, 4))
    assert out.dtype == dtype and out.device == images.device
    assert torch.equal(out, _loop_crops(images, corners, (4, 4)))


def test_crop_batch_meta_device():
    images = torch.empty(2, 3, 10, 10, device="meta")
    corners = torch.zeros(2, 4, 2, dtype=torch.long, device="meta")
    out = crop_batch(images, corners, (4, 5))
    assert out.device.type == "meta" and out.shape == (2, 4, 3, 4, 5)


# --------------------------------------------------------------------------- saliency modes
def _binary_cam() -> torch.Tensor:
    """Two-class softmax-style maps: the learned parts are negatives of each other (a hot spot at
    (1, 4) for class 1), plus a per-class constant offset that is all a summed map keeps."""
    hot = torch.zeros(6, 6)
    hot[1, 4] = 3.0
    hot[4, 1] = 1.0
    return torch.stack([0.7 - hot, 0.2 + hot]).unsqueeze(0)  # (1, 2, 6, 6)


def test_class_sum_flattens_opposite_binary_maps_and_top_class_keeps_the_hot_spot():
    from diffmic.models.roi import saliency_map

    cam = _binary_cam()
    probs = torch.tensor([[0.1, 0.9]])
    summed = saliency_map(cam, probs, "class_sum")
    # min-max of x and of -x sum to a constant: GMIC's rule leaves nothing to choose crops on
    torch.testing.assert_close(summed, torch.full_like(summed, 1.0))
    top = saliency_map(cam, probs, "top_class")
    assert picks(top[0], (1, 1), 2) == [(1, 4), (4, 1)]
    weighted = saliency_map(cam, probs, "prior_weighted")
    assert picks(weighted[0], (1, 1), 1) == [(1, 4)]
    # the weights are the class probabilities: a confident class-0 prior looks at class 0's map
    flipped = saliency_map(cam, torch.tensor([[1.0, 0.0]]), "prior_weighted")
    assert flipped[0, 1, 4] == flipped[0].min()


def test_saliency_map_top_class_follows_each_image_and_rejects_unknown_modes():
    from diffmic.models.roi import saliency_map

    cam = torch.cat([_binary_cam(), _binary_cam()])
    probs = torch.tensor([[0.2, 0.8], [0.8, 0.2]])
    s = saliency_map(cam, probs, "top_class")
    assert s[0, 1, 4] == s[0].max() and s[1, 1, 4] == s[1].min()
    with pytest.raises(ValueError, match="unknown saliency mode"):
        saliency_map(cam, probs, "nope")
