"""Readouts of trained models side by side, with one-step (Tweedie) readouts: a diagnosis, not a benchmark.

For each ``model.pt`` and split (the model's own data set), ACC and macro AUROC of:

* ``prior``: the DCG prior;
* ``mean_path``: the shipped deterministic DDIM path from the prior (``eval.sampling_steps`` steps);
* ``chains_mean_y0``: softmax of the mean y_0 over ``--chains`` stochastic chains (fixed seed; the
  checkpoint's own ``eval.chain_noise``);
* ``one_step_<t>``: one denoiser call at y_t = ŷ (zero residual) and timestep t, read out as the
  y_0 estimate ŷ + (r_t − √(1 − ᾱ_t)·ε̂) / √ᾱ_t with r_t = y_t − ŷ = 0
  (:meth:`CardSchedule.predict_y0`). For an ideal
  denoiser at t = T − 1 this is the class posterior E[y_0 | x] (Tweedie), but errors of ε̂ are
  multiplied by √((1 − ᾱ_t)/ᾱ_t) (about 156 at t = 999 on the linear schedule); smaller t trade
  that amplification for a bias towards the prior's class;
* ``vote_random_<N>`` / ``vote_qmc_<N>``: the fraction of ``N`` deterministic chains (DDIM, η = 0) that end
  in each class, started from N(ŷ, I) with random noise (fixed seed) or with the same ``N`` scrambled
  Sobol points mapped through the normal quantile for every image (quasi-Monte Carlo); and
  ``mean_qmc_<N>``: the mean of softmax(y_0 / T) over the QMC chains. For an ideal denoiser the
  deterministic path from the centre ŷ ends at the class the starting-noise mass favours (the reverse
  flow maps quantiles to quantiles), so its softmax keeps little ranking information, while the
  fraction of chains per class estimates the class posterior; QMC removes most of the random-noise
  readouts' sampling error at the same cost. The fractions have no tie-break (unlike the ``vote``
  readout), so equal fractions tie in AUROC.

Beside the readouts, ``residuals`` describes what the mean path adds to the prior, r = y_0 − ŷ: its
spread over images (``sd``, of every class column), ``mean_abs``, and ``toward_label``: per true
class, the mean over its images of r[label] − the mean of r over the other classes, averaged over the
classes (class-balanced, so a move that is the same for every image scores exactly 0 whatever the
class frequencies; positive: the denoiser moves towards the right class).

All probabilities are softmax(y_0 / ``--temperature``); AUROC of a binary task does not depend on it.
Read the test columns as a diagnosis only: choose anything on the val columns.

    python benchmarks/one_step_readout.py runs/breastmnist/model.pt --out one-step.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common

DEFAULT_TIMESTEPS = (999, 800, 600, 400, 200, 100, 50)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", type=Path, help="model.pt files of trained runs")
    p.add_argument("--splits", nargs="+", default=["val", "test"], choices=("train", "val", "test"))
    p.add_argument("--timesteps", nargs="+", type=int, default=list(DEFAULT_TIMESTEPS),
                   help="t of the one-step readouts (0-based, < diffusion.timesteps)")
    p.add_argument("--chains", type=int, default=32, help="stochastic chains of chains_mean_y0")
    p.add_argument("--vote-chains", nargs="*", type=int, default=[16, 64],
                   help="N of the vote_random / vote_qmc / mean_qmc readouts (none: leave them out)")
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="JSON file to write")
    return p.parse_args(argv)


def qmc_normal(n: int, dim: int, *, seed: int = 0):
    """``n`` scrambled Sobol points of N(0, I_dim), (n, dim): the package's ``eval.chain_noise: qmc`` points."""
    import torch

    from diffmic.diffusion.sampling import chain_start_noise

    return chain_start_noise(n, 1, dim, kind="qmc", generator=torch.Generator().manual_seed(seed))


def chain_y0(model, feats, prior, noise):
    """y_0 (N, B, C) of deterministic DDIM chains started at ŷ + noise[s] for each of the N rows of ``noise``
    (shared by every image) or, with ``noise`` of shape (N, B, C), per image."""
    import torch

    from diffmic.diffusion.sampling import sample_ddim

    n = noise.shape[0]
    b, c = prior.shape
    start = (noise.unsqueeze(1).expand(n, b, c) if noise.dim() == 2 else noise).reshape(n * b, c)
    feats_all, prior_all = feats.repeat(n, 1), prior.repeat(n, 1)
    with torch.no_grad():
        y0 = sample_ddim(model.schedule, lambda y_t, t: model.denoiser.denoise(feats_all, y_t, prior_all, t),
                         prior_all, model.sampling_steps, eta=0.0, noise=start)
    return y0.view(n, b, c)


def vote_fractions(y0):
    """(N, B, C) -> (B, C): the fraction of chains whose argmax is each class (the package's, no tie-break)."""
    from diffmic.diffusion.uncertainty import vote_fractions as fractions

    return fractions(y0)


def path_residual(prior, y0, labels) -> dict[str, float]:
    """What the mean path adds to the prior (see the module docstring): ``sd`` and ``toward_label``."""
    r = y0 - prior
    c = r.shape[1]
    at_label = r.gather(1, labels.view(-1, 1)).squeeze(1)
    move = at_label - (r.sum(1) - at_label) / (c - 1)
    per_class = [move[labels == k].mean() for k in range(c) if bool((labels == k).any())]
    return {"sd": round(float(r.std(0).mean()), 4), "toward_label": round(float(sum(per_class) / len(per_class)), 4),
            "mean_abs": round(float(r.abs().mean()), 4)}


def readouts(model, images, labels, *, timesteps, chains: int, temperature: float,
             vote_chains=(), residuals: dict | None = None) -> dict[str, dict[str, float]]:
    """ACC and AUROC of every readout; with ``residuals`` (a dict), also fills it with :func:`path_residual`."""
    import torch

    from diffmic.diffusion.sampling import chain_start_noise
    from diffmic.evaluation.metrics import classification_metrics

    def score(probs: torch.Tensor) -> dict[str, float]:
        m = classification_metrics(probs, labels, num_classes=model.num_classes)
        return {"acc": round(m["acc"], 4), "auroc": round(m["auroc"], 4)}

    def y0_score(y0: torch.Tensor) -> dict[str, float]:
        return score((y0 / temperature).softmax(1))

    with torch.no_grad():
        x = model.normalize(images)
        guide = model.guidance(x)
        dcg_prior = guide.logits.softmax(dim=1)
        prior = model.diffusion_prior(dcg_prior)  # what the diffusion starts from (model.prior_temperature)
        feats = model.encode(x, guide)
        path = model.mean_path(feats, prior)
        out = {"prior": score(dcg_prior), "mean_path": y0_score(path)}
        if residuals is not None:
            residuals.update(path_residual(prior, path, labels))
        gen = torch.Generator().manual_seed(0)
        out["chains_mean_y0"] = y0_score(model.sample_y0(feats, prior, samples=chains, generator=gen).mean(0))
        for t in timesteps:
            tv = torch.full((prior.shape[0],), t, dtype=torch.long)
            eps = model.denoiser.denoise(feats, prior, prior, tv)
            out[f"one_step_{t}"] = y0_score(model.schedule.predict_y0(prior, prior, tv, eps))
        b, c = prior.shape
        for n in vote_chains:
            gen = torch.Generator().manual_seed(0)
            noise = chain_start_noise(n, b, c, kind="random", generator=gen).view(n, b, c)
            out[f"vote_random_{n}"] = score(vote_fractions(chain_y0(model, feats, prior, noise)))
            y0 = chain_y0(model, feats, prior, qmc_normal(n, c))
            out[f"vote_qmc_{n}"] = score(vote_fractions(y0))
            out[f"mean_qmc_{n}"] = score((y0 / temperature).softmax(-1).mean(0))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    common.set_threads(args.threads)
    from diffmic.errors import DiffMICError

    result = {"info": common.run_info("benchmarks/one_step_readout.py", argv), "models": {}, "residuals": {}}

    def check(path, model) -> None:
        bad = [t for t in args.timesteps if not 0 <= t < model.schedule.num_timesteps]
        if bad:
            raise DiffMICError(f"--timesteps {bad}: must be in [0, {model.schedule.num_timesteps - 1}]")

    def each(path, model, data) -> None:
        per_split, residuals = {}, {}
        for split in args.splits:
            images, labels = common.split_tensors(getattr(data, split))
            per_split[split] = readouts(model, images, labels, timesteps=args.timesteps,
                                        chains=args.chains, temperature=args.temperature,
                                        vote_chains=args.vote_chains, residuals=residuals.setdefault(split, {}))
        result["models"][str(path)] = per_split
        result["residuals"][str(path)] = residuals
        common.print_scores(path, per_split, 16)
        for split, r in residuals.items():
            print(f"  {split:<5}  mean path − prior: sd {r['sd']:.4f}, toward the label {r['toward_label']:+.4f}")

    if common.for_each_model("one_step_readout", args.models, each, check):
        return 1
    return common.finish(args.out, result)


if __name__ == "__main__":
    sys.exit(main())
