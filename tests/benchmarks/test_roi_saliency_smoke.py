"""benchmarks/roi_saliency.py: hand-made class maps with known answers, and a run on a saved model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark


def _bump(h: int, w: int, r: int, c: int) -> torch.Tensor:
    m = torch.zeros(h, w)
    m[r, c] = 1.0
    return m


def test_opposite_binary_maps_cancel_in_the_class_sum() -> None:
    mod = load_benchmark("roi_saliency")
    a = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    cam = torch.cat([a, 2.0 - a], dim=1)  # the two-class softmax case: learned parts are negatives
    s = mod.saliency_stats(cam, torch.tensor([[0.9, 0.1]] * 3), (1, 1), 2)
    assert s["n"] == 3
    assert s["sum_to_class_sd"] == pytest.approx(0.0, abs=1e-5)  # min-max(a) + min-max(-a) = 1 everywhere
    assert s["top_to_class_sd"] == pytest.approx(3.0, rel=1e-5)  # one class map per image, summed over 3 images


def test_identical_maps_sum_to_c_times_one_map_and_pick_the_same_windows() -> None:
    mod = load_benchmark("roi_saliency")
    one = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(1))
    cam = one.expand(2, 3, 5, 5).clone()
    s = mod.saliency_stats(cam, torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]]), (2, 2), 3)
    assert s["sum_to_class_sd"] / s["n"] == pytest.approx(3.0, rel=1e-5)
    assert all(v == 2 * 3 for v in s["shared"].values())  # every rule picks the same 3 windows on both images


def test_top_class_follows_the_predicted_class_and_the_sum_does_not() -> None:
    mod = load_benchmark("roi_saliency")
    # class 0 hot at (0, 0), class 1 at (3, 3), class 2 at (0, 3); the image's top class is 1
    cam = torch.stack([_bump(4, 4, 0, 0), _bump(4, 4, 3, 3), _bump(4, 4, 0, 3)]).unsqueeze(0)
    probs = torch.tensor([[0.1, 0.8, 0.1]])
    s = mod.saliency_stats(cam, probs, (1, 1), 1)
    # the class sum ties three cells and takes the first in row-major order, (0, 0); the top class takes (3, 3)
    assert s["shared"]["class_sum|top_class"] == 0
    assert s["shared"]["top_class|prior_weighted"] == 1


def test_chance_overlap_of_k_windows() -> None:
    mod = load_benchmark("roi_saliency")
    assert mod.chance_shared(4, 4, (1, 1), 6) == pytest.approx(36 / 16)
    assert mod.chance_shared(4, 4, (4, 4), 6) == pytest.approx(1.0)  # one position: both take it


@pytest.mark.usefixtures("one_thread")
def test_runs_on_a_saved_model_and_writes_json(tiny_checkpoint, tmp_path: Path) -> None:
    path, _ = tiny_checkpoint
    out = tmp_path / "roi.json"
    assert load_benchmark("roi_saliency").main([str(path), "--splits", "val", "--batch", "32", "--out", str(out)]) == 0
    (entry,) = json.loads(out.read_text())["models"].values()
    assert entry["trained_rule"] == "class_sum" and entry["classes"] == 2
    v = entry["val"]
    assert v["images"] == 78 and v["num_crops"] == 6
    assert v["independent_maps_sd"] == pytest.approx(2 ** 0.5, abs=1e-4)
    assert set(v["shared_windows"]) == {"class_sum|top_class", "class_sum|prior_weighted", "top_class|prior_weighted"}
    assert all(0 <= x <= 6 for x in v["shared_windows"].values())


def test_a_missing_model_is_one_error_line(tmp_path: Path, capsys) -> None:
    assert load_benchmark("roi_saliency").main([str(tmp_path / "nope.pt")]) == 1
    assert "roi_saliency: error:" in capsys.readouterr().err
