"""Calibration maps of the mean-path readout, fitted on validation: a diagnosis, not a benchmark.

The shipped mean path turns the label vector y_0 into probabilities as softmax(y_0 / T), T fitted on
val. y_0 lives in probability space (it is the prior ŷ plus the denoiser's correction), so that map
caps the confidence at about sigmoid(1 / T) for two classes and does not reproduce the prior's own
calibration when the correction is zero. For each ``model.pt`` (on its own data set) this script
fits, on the val split by NLL, and compares:

* ``prior``: softmax(log ŷ / T), the DCG prior's temperature scaling (the reference);
* ``path``: softmax(y_0 / T), the shipped mean-path readout;
* ``log_path``: softmax(log max(y_0, ``--floor``) / T): the prior's map applied to y_0, so a zero
  correction gives the prior's calibration exactly; small absolute changes of a small y_0 become
  large changes of its logarithm;
* ``prior_residual``: softmax(log ŷ / T_p + (y_0 − ŷ) / T_r), two temperatures: the correction enters
  in logit space beside the prior's logits (T_r → ∞ is the prior alone). Its argmax can differ
  from argmax y_0, so it is a different readout, not only a calibration.

Validation NLL is reported in-sample (the map fitted on all of val) and out of fold (``--folds``-fold
cross-fitting within val, one fixed permutation), which is the fair comparison between a one- and a
two-parameter map. Test columns (ACC, macro AUROC, ECE with 15 bins, NLL, AURC) are a diagnosis only:
choose on the val columns.

    python benchmarks/calibration_maps.py runs/breastmnist/model.pt --out calibration-maps.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common

MAPS = ("prior", "path", "log_path", "prior_residual")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", type=Path, help="model.pt files of trained runs")
    p.add_argument("--folds", type=int, default=5, help="folds of the out-of-fold validation NLL (>= 2)")
    p.add_argument("--floor", type=float, default=1e-3, help="log_path: y_0 is clamped to at least this")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="JSON file to write")
    args = p.parse_args(argv)
    if args.folds < 2:
        p.error(f"--folds must be >= 2, got {args.folds}")
    if not 0 < args.floor < 1:
        p.error(f"--floor must be in (0, 1), got {args.floor}")
    return args


def map_logits(name: str, log_t, log_prior, y0, *, floor: float):
    """Logits (N, C) of calibration map ``name`` at log-temperatures ``log_t`` (a 1-D tensor)."""
    if name == "prior":
        return log_prior / log_t[0].exp()
    if name == "path":
        return y0 / log_t[0].exp()
    if name == "log_path":
        return y0.clamp_min(floor).log() / log_t[0].exp()
    if name == "prior_residual":
        return log_prior / log_t[0].exp() + (y0 - log_prior.exp()) / log_t[1].exp()
    raise ValueError(f"unknown map {name!r}; choose from {list(MAPS)}")


def n_params(name: str) -> int:
    return 2 if name == "prior_residual" else 1


def fit_map(name: str, log_prior, y0, labels, *, floor: float):
    """Log-temperatures minimising the NLL of ``labels`` (LBFGS from T = 1, log T in [−5, 12])."""
    import torch
    import torch.nn.functional as F

    log_t = torch.zeros(n_params(name), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(map_logits(name, log_t, log_prior, y0, floor=floor), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return log_t.detach().clamp(-5.0, 12.0)


def split_outputs(model, data, *, batch_size: int):
    """(log ŷ, mean-path y_0, labels) of one split, float64."""
    import torch

    images = torch.from_numpy(data.images).permute(0, 3, 1, 2)
    logs, paths = [], []
    with torch.no_grad():
        for chunk in images.split(batch_size):
            x = model.normalize(chunk.float() / 255.0)
            guide = model.guidance(x)
            log_prior = guide.logits.log_softmax(dim=1)
            feats = model.encode(x, guide)
            paths.append(model.mean_path(feats, model.diffusion_prior(log_prior.exp())).double())
            logs.append(log_prior.double())
    return torch.cat(logs), torch.cat(paths), torch.from_numpy(data.labels).long()


def out_of_fold_nll(name: str, log_prior, y0, labels, *, folds: int, floor: float) -> float:
    """Mean NLL over val, each image scored by the map fitted on the folds that do not hold it."""
    import torch
    import torch.nn.functional as F

    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    total = 0.0
    for held in order.tensor_split(folds):
        keep = torch.ones(len(labels), dtype=torch.bool)
        keep[held] = False
        log_t = fit_map(name, log_prior[keep], y0[keep], labels[keep], floor=floor)
        logits = map_logits(name, log_t, log_prior[held], y0[held], floor=floor)
        total += float(F.cross_entropy(logits, labels[held], reduction="sum"))
    return total / len(labels)


def compare_maps(val, test, *, num_classes: int, folds: int, floor: float) -> dict[str, dict]:
    """{map: temperatures, val NLL (in-sample and out of fold), val ACC/AUROC, test metrics}."""
    from diffmic.evaluation.calibration import aurc, expected_calibration_error, negative_log_likelihood
    from diffmic.evaluation.metrics import classification_metrics

    out = {}
    for name in MAPS:
        log_t = fit_map(name, *val, floor=floor)
        pv = map_logits(name, log_t, val[0], val[1], floor=floor).softmax(1)
        pt = map_logits(name, log_t, test[0], test[1], floor=floor).softmax(1)
        mv = classification_metrics(pv, val[2], num_classes=num_classes)
        mt = classification_metrics(pt, test[2], num_classes=num_classes)
        out[name] = {
            "temperatures": [round(float(t), 6) for t in log_t.exp()],
            "val_nll": round(negative_log_likelihood(pv, val[2]), 5),
            "val_nll_out_of_fold": round(out_of_fold_nll(name, *val, folds=folds, floor=floor), 5),
            "val_acc": round(mv["acc"], 4), "val_auroc": round(mv["auroc"], 4),
            "test_acc": round(mt["acc"], 4), "test_auroc": round(mt["auroc"], 4),
            "test_ece": round(expected_calibration_error(pt, test[2]), 4),
            "test_nll": round(negative_log_likelihood(pt, test[2]), 4),
            "test_aurc": round(aurc(pt, test[2]), 4),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    common.set_threads(args.threads)

    result = {"info": common.run_info("benchmarks/calibration_maps.py", argv),
              "settings": {"folds": args.folds, "floor": args.floor}, "models": {}}

    def each(path, model, data) -> None:
        val = split_outputs(model, data.val, batch_size=args.batch_size)
        test = split_outputs(model, data.test, batch_size=args.batch_size)
        maps = compare_maps(val, test, num_classes=model.num_classes, folds=args.folds, floor=args.floor)
        result["models"][str(path)] = maps
        print(path, flush=True)
        print(f"  {'map':>14}  {'T':>16}  val NLL (oof)      val ACC/AUROC | test ACC/AUROC   ECE    NLL    AURC")
        for name, r in maps.items():
            temps = "/".join(f"{t:.3g}" for t in r["temperatures"])
            print(f"  {name:>14}  {temps:>16}  {r['val_nll']:.4f} ({r['val_nll_out_of_fold']:.4f})  "
                  f"{r['val_acc']:.3f}/{r['val_auroc']:.3f} | {r['test_acc']:.3f}/{r['test_auroc']:.3f}  "
                  f"{r['test_ece']:.3f}  {r['test_nll']:.3f}  {r['test_aurc']:.3f}", flush=True)

    if common.for_each_model("calibration_maps", args.models, each):
        return 1
    if args.out:
        common.write_json(args.out, result)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
