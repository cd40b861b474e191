"""Image-guidance scale of the mean-path readout on trained models: a diagnosis, not a benchmark.

For a model trained with image-conditioning dropout (``train.image_dropout``), the denoiser has an
image-free path (the image features replaced by ones, the neutral value of its gate). Classifier-free
guidance mixes the two predictions at every step of the deterministic mean path,

    ε̂_s = ε̂(ones, y_t, ŷ, t) + s · (ε̂(features, y_t, ŷ, t) − ε̂(ones, y_t, ŷ, t)),

so s = 1 is the shipped readout, s = 0 the image-free path and s > 1 leans harder on the image. For
each ``model.pt``, each scale s and each split, the script reports ACC and macro AUROC of
softmax(y_0 / T), with T fitted on the validation split for that s (NLL), and the NLL and ECE
after that scaling; the DCG prior is reported the same way (its own fitted T). It also runs on a model
trained without the dropout (its image-free path was then never trained). Read the test columns as a
diagnosis only: choose anything on the val columns.

    python benchmarks/guidance_scale.py runs/breastmnist/model.pt --out guidance.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common

DEFAULT_SCALES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", type=Path, help="model.pt files of trained runs")
    p.add_argument("--scales", nargs="+", type=float, default=list(DEFAULT_SCALES), help="guidance scales s")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="JSON file to write")
    return p.parse_args(argv)


def guided_mean_path(model, feats, prior, scale: float):
    """y_0 (B, C) of the mean path with the guided ε̂_s of the module docstring (s = 1: ``model.mean_path``)."""
    import torch

    from diffmic.diffusion.sampling import sample_mean_path

    ones = torch.ones_like(feats)

    def eps(y_t, t):
        cond = model.denoiser.denoise(feats, y_t, prior, t)
        if scale == 1.0:
            return cond
        free = model.denoiser.denoise(ones, y_t, prior, t)
        return free + scale * (cond - free)

    return sample_mean_path(model.schedule, eps, prior, model.sampling_steps)


def split_logits(model, images, scales) -> dict[str, object]:
    """``{"prior": log ŷ, "s=<s>": y_0 of the guided mean path}`` for one split's images (N, C, H, W) in [0, 1]."""
    import torch

    with torch.no_grad():
        x = model.normalize(images)
        guide = model.guidance(x)
        prior = guide.logits.softmax(dim=1)
        feats = model.encode(x, guide)
        out = {"prior": prior.clamp_min(1e-12).log()}
        for s in scales:
            out[f"s={s:g}"] = guided_mean_path(model, feats, model.diffusion_prior(prior), s)
    return out


def score(logits_by_split: dict, labels_by_split: dict, num_classes: int) -> dict[str, dict[str, dict[str, float]]]:
    """Per readout and split: ACC, AUROC, and NLL / ECE after a temperature fitted on val (per readout)."""
    import torch

    from diffmic.evaluation.calibration import fit_temperature
    from diffmic.evaluation.metrics import classification_metrics

    result: dict[str, dict[str, dict[str, float]]] = {}
    for name in logits_by_split["val"]:
        temp = fit_temperature(logits_by_split["val"][name], labels_by_split["val"], kind="logits")
        result[name] = {"temperature": {"T": round(temp, 4)}}
        for split, logits in logits_by_split.items():
            labels = labels_by_split[split]
            z = logits[name].double() / temp
            probs = z.softmax(1).float()
            m = classification_metrics(probs, labels, num_classes=num_classes)
            nll = float((torch.logsumexp(z, 1) - z.gather(1, labels.view(-1, 1)).squeeze(1)).mean())
            result[name][split] = {"acc": round(m["acc"], 4), "auroc": round(m["auroc"], 4),
                                   "nll": round(nll, 4), "ece": round(m["ece"], 4)}
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    common.set_threads(args.threads)
    result = {"info": common.run_info("benchmarks/guidance_scale.py", argv), "models": {}}

    def each(path, model, data) -> None:
        logits, labels = {}, {}
        for split in ("val", "test"):
            images, labels[split] = common.split_tensors(getattr(data, split))
            logits[split] = split_logits(model, images, args.scales)
        scored = score(logits, labels, model.num_classes)
        result["models"][str(path)] = {"image_dropout": model.config.get("train", {}).get("image_dropout", 0.0),
                                       "readouts": scored}
        print(f"{path}")
        print(f"  {'readout':<8} {'T':>7}  {'val acc/auroc/nll/ece':>27}  {'test acc/auroc/nll/ece':>27}")
        for name, r in scored.items():
            cells = ["/".join(f"{r[s][k]:.3f}" for k in ("acc", "auroc", "nll", "ece")) for s in ("val", "test")]
            print(f"  {name:<8} {r['temperature']['T']:>7.3f}  {cells[0]:>27}  {cells[1]:>27}")

    if common.for_each_model("guidance_scale", args.models, each):
        return 1
    return common.finish(args.out, result)


if __name__ == "__main__":
    sys.exit(main())
