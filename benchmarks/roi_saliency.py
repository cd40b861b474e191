"""How the ROI saliency rules differ on trained models: a diagnosis, not a benchmark.

The DCG's local branch takes K crops chosen greedily on a saliency map built from the global branch's
class activation maps (``model.roi_saliency``). GMIC's ``class_sum`` adds the min-max normalised class
maps; under a softmax the gradients on the C class weight vectors sum to zero, so their sum keeps its
initial value and the learned parts of the maps partly cancel (exactly, for two classes). For each
``model.pt`` and split the script reports, as means over the split's images:

- ``sum_to_class_sd``: the spatial sd of the class-sum map over the mean spatial sd of one normalised
  class map. Independent maps of equal sd would give √C, identical maps C, and exact cancellation 0;
- ``top_to_class_sd``: the same for the top-class map (1 when the top class's map is a typical one);
- ``shared_windows``: for each pair of rules, how many of the K windows both pick (same upper-left
  cell; the greedy picks of ``diffmic.models.roi``, with the model's own window size), beside
  ``chance_shared``, the count two independent uniform choices of K distinct windows would share.

The model's own rule is reported as ``trained_rule``; the maps are those of the trained global branch,
whatever rule trained it.

    python benchmarks/roi_saliency.py runs/retinamnist/model.pt --out roi-saliency.json
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", type=Path, help="model.pt files of trained runs")
    p.add_argument("--splits", nargs="+", default=["val"], choices=["train", "val", "test"])
    p.add_argument("--batch", type=int, default=256, help="images per forward pass")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="JSON file to write")
    return p.parse_args(argv)


def saliency_stats(cam, class_probs, window: tuple[int, int], k: int) -> dict[str, object]:
    """The module docstring's figures for one batch of class maps ``cam`` (B, C, h, w), as sums over images."""
    import torch

    from diffmic.models.roi import SALIENCY_MODES, greedy_max_windows, saliency_map

    b, c = cam.shape[:2]
    eye = torch.eye(c, dtype=cam.dtype)
    # each class's min-max normalised map, via the weighted rule with one-hot weights: (B, C, h*w)
    per_class = torch.stack([saliency_map(cam, eye[j].expand(b, c), "prior_weighted").flatten(1) for j in range(c)], 1)
    class_sd = per_class.std(dim=2).mean(dim=1).clamp_min(1e-12)  # (B,)
    maps = {mode: saliency_map(cam, class_probs, mode) for mode in SALIENCY_MODES}
    picks = {}
    for mode, sal in maps.items():
        cells = greedy_max_windows(sal, window, k)  # (B, K, 2)
        picks[mode] = [set(map(tuple, cells[i].tolist())) for i in range(b)]
    shared = {f"{a}|{z}": sum(len(pa & pz) for pa, pz in zip(picks[a], picks[z], strict=True))
              for a, z in itertools.combinations(SALIENCY_MODES, 2)}
    return {
        "n": b,
        "sum_to_class_sd": float((maps["class_sum"].flatten(1).std(dim=1) / class_sd).sum()),
        "top_to_class_sd": float((maps["top_class"].flatten(1).std(dim=1) / class_sd).sum()),
        "shared": shared,
    }


def chance_shared(h: int, w: int, window: tuple[int, int], k: int) -> float:
    """Expected overlap of two independent uniform draws of k distinct windows out of the map's positions."""
    positions = (h - window[0] + 1) * (w - window[1] + 1)
    k = min(k, positions)
    return k * k / positions


def model_stats(model, images, batch: int) -> dict[str, object]:
    """``saliency_stats`` over all ``images`` (N, C, H, W) in [0, 1], as means, plus the reference figures."""
    import torch

    from diffmic.models.roi import window_size

    g = model.guidance
    parts = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = model.normalize(images[start:start + batch])
            out = g(x)
            h, w = out.saliency.shape[-2:]
            window = window_size((g.crop_size, g.crop_size), (h, w), tuple(x.shape[-2:]))
            parts.append(saliency_stats(out.saliency, out.logits_global.softmax(dim=1), window, g.num_crops))
    assert parts, "no images"
    total = {key: sum(p[key] for p in parts) for key in ("n", "sum_to_class_sd", "top_to_class_sd")}
    total["shared"] = {key: sum(p["shared"][key] for p in parts) for key in parts[0]["shared"]}
    n = total["n"]
    c = model.num_classes
    return {
        "images": n,
        "sum_to_class_sd": round(total["sum_to_class_sd"] / n, 4),
        "top_to_class_sd": round(total["top_to_class_sd"] / n, 4),
        "independent_maps_sd": round(c ** 0.5, 4),
        "shared_windows": {key: round(v / n, 4) for key, v in total["shared"].items()},
        "chance_shared": round(chance_shared(h, w, window, g.num_crops), 4),
        "map_hw": [h, w],
        "window_cells": list(window),
        "num_crops": g.num_crops,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    common.set_threads(args.threads)
    from diffmic.errors import DiffMICError

    result = {"info": common.run_info("benchmarks/roi_saliency.py", argv), "models": {}}

    def check(path, model) -> None:
        if model.guidance.local_net is None:
            raise DiffMICError(f"{path}: model.local_branch is false, the model takes no crops")

    def each(path, model, data) -> None:
        entry: dict[str, object] = {"trained_rule": model.guidance.roi_saliency, "classes": model.num_classes}
        print(f"{path} (trained with {model.guidance.roi_saliency}, {model.num_classes} classes)")
        for split in args.splits:
            images, _ = common.split_tensors(getattr(data, split))
            s = model_stats(model, images, args.batch)
            entry[split] = s
            pairs = ", ".join(f"{k} {v:.2f}" for k, v in s["shared_windows"].items())
            print(f"  {split}: class-sum sd {s['sum_to_class_sd']:.2f}x a class map's (independent "
                  f"{s['independent_maps_sd']:.2f}x), top-class {s['top_to_class_sd']:.2f}x; shared windows of "
                  f"{s['num_crops']}: {pairs} (chance {s['chance_shared']:.2f})")
        result["models"][str(path)] = entry

    if common.for_each_model("roi_saliency", args.models, each, check):
        return 1
    return common.finish(args.out, result)


if __name__ == "__main__":
    raise SystemExit(main())
