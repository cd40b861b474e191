"""Accuracy benchmark: DiffMIC against a plain classifier and its own DCG, same epoch budget.

For every MedMNIST ``.npz`` in a folder, every seed and every method:

- ``classifier``: the DCG's backbone + a linear head (``diffmic.training.baseline``), E epochs;
- ``dcg``: DiffMIC's guidance network alone (``train.epochs=0``: E DCG epochs, selected on the DCG);
- ``diffmic``: the full model, E epochs split into DCG pre-training + joint epochs in the
  proportion of the config file; reports the diffusion output and its DCG head.

All use the same augmentation, the same validation-based selection (``train.select_metric``) and
are evaluated on the test split. Writes one JSON per run and the ``accuracy`` section of
``docs/benchmarks.md``.

    python benchmarks/accuracy.py --quick          # < 10 min on 2 cores, smoke-level numbers
    python benchmarks/accuracy.py                  # the full budget of configs/benchmark.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common

METHODS = ("classifier", "dcg", "diffmic")
# Rows: name -> (method, config overrides on top of --config/--set). The remedies of issue #10 and
# the paper's ablations, each one change from its base row; `recipe` is the DCG pre-training recipe
# of the plain classifier (Adam 1e-3, warm-up + cosine per iteration), the base of the remedies.
RECIPE = ["train.dcg_lr=1.0e-3", "train.dcg_schedule=warmup_cosine", "train.dcg_joint_lr=2.0e-4"]
ROWS: dict[str, tuple[str, list[str]]] = {
    "classifier": ("classifier", []),
    "dcg": ("dcg", []),
    "dcg_recipe": ("dcg", RECIPE),
    "diffmic": ("diffmic", []),
    "shared": ("diffmic", ["model.share_encoder=true"]),
    "dcg_init": ("diffmic", ["train.denoiser_encoder_init=dcg"]),  # own encoder, started as the DCG backbone
    "light_encoder": ("diffmic", ["model.denoiser_backbone=resnet10t"]),  # 0.6x a ResNet-18's cost (docs/speed.md)
    "light_local": ("diffmic", ["model.local_backbone=resnet10t"]),  # a cheaper DCG local branch (issue #12)
    # a supervised signal for the denoiser's own encoder: CE on a training-only linear head (docs/method.md)
    "denoiser_ce": ("diffmic", ["train.denoiser_ce_weight=1.0"]),
    "denoiser_ce_low": ("diffmic", ["train.denoiser_ce_weight=0.3"]),  # the same, a third of the weight
    # the BreastMNIST preset's two denoiser-encoder changes together, for the other presets
    "dcg_init_ce": ("diffmic", ["train.denoiser_encoder_init=dcg", "train.denoiser_ce_weight=1.0"]),
    # harder training targets: the denoiser's training priors tempered, tau log-uniform on [1, 4] (docs/method.md)
    "temper": ("diffmic", ["train.prior_temper_max=4.0"]),
    # image-conditioning dropout: 15% of the denoiser's training rows see no image (docs/method.md)
    "image_dropout": ("diffmic", ["train.image_dropout=0.15"]),
    # ROI crops chosen on the global branch's top-class map (the binary presets' rule), for a class-sum preset
    "roi_top": ("diffmic", ["model.roi_saliency=top_class"]),
    # GMIC's loss: cross-entropy on the global and local logits too, so the two branch priors that the
    # denoiser's MMD streams are conditioned on are each trained as a classifier (docs/method.md)
    "aux_all": ("diffmic", ["train.aux_loss=all"]),
    # the diffusion conditions on softmax(DCG logits / 2), in training and at inference (docs/method.md)
    "prior_tau": ("diffmic", ["model.prior_temperature=2"]),
    "global_w": ("diffmic", ["model.global_weight=0.75"]),
    "no_local": ("diffmic", ["model.local_branch=false"]),  # the paper's ablations, on the config as it is
    "no_mmd": ("diffmic", ["train.mmd_weight=0"]),
    "frozen": ("diffmic", ["train.joint_train=false"]),
    "recipe": ("diffmic", RECIPE),
    "recipe_frozen": ("diffmic", [*RECIPE, "train.joint_train=false"]),
    "recipe_crossfit": ("diffmic", [*RECIPE, "train.crossfit_folds=3"]),
    "recipe_crossfit_frozen": ("diffmic", [*RECIPE, "train.crossfit_folds=3", "train.joint_train=false"]),
    "recipe_draws1": ("diffmic", [*RECIPE, "train.noise_draws=1"]),
    "recipe_shared": ("diffmic", [*RECIPE, "model.share_encoder=true"]),
    "recipe_dropout": ("diffmic", [*RECIPE, "model.denoiser_dropout=0.2", "train.weight_decay=1.0e-4"]),
    "recipe_roi_top": ("diffmic", [*RECIPE, "model.roi_saliency=top_class"]),
    "recipe_roi_prior": ("diffmic", [*RECIPE, "model.roi_saliency=prior_weighted"]),
    "recipe_no_mmd": ("diffmic", [*RECIPE, "train.mmd_weight=0"]),
}
READOUTS = ("mean_path", "vote", "mean_softmax")
METRICS = ("acc", "f1", "qwk", "auroc", "ece")
ORDINAL = ("retinamnist",)  # QWK is reported for these only
QUICK = {
    "epochs": 6,
    "max_train": 512,
    "overrides": ["model.backbone=test_resnet", "model.denoiser_backbone=test_resnet", "model.feature_dim=128"],
}
DEFAULT_DATA = Path(os.environ.get("DIFFMIC_SHARED_DATA", common.REPO.parent / "shared" / "data"))

# Published numbers (docs anchors.md §1-2): (ACC, AUC); "R": recalled, not verified against the PDF.
MEDMNIST_V2 = {  # Yang et al. 2023, Table 3: ResNet-18 (28), ResNet-50 (28)
    "pathmnist": ((0.907, 0.983), (0.911, 0.990)),
    "dermamnist": ((0.735, 0.917), (0.735, 0.913, "R")),
    "pneumoniamnist": ((0.854, 0.944), (0.854, 0.948)),
    "retinamnist": ((0.524, 0.717), (0.528, 0.726)),
    "breastmnist": ((0.863, 0.901), (0.812, 0.857, "R")),
    "bloodmnist": ((0.958, 0.998), (0.956, 0.997, "R")),
}
MEDMNIST_PLUS_R18_28 = {  # Doerrich et al. 2025, ResNet-18 end-to-end at 28, mean of 3 seeds
    "pathmnist": (0.8554, 0.9824),
    "dermamnist": (0.7338, 0.8835),
    "pneumoniamnist": (0.8312, 0.9501),
    "retinamnist": (0.5233, 0.7041),
    "breastmnist": (0.8397, 0.8761),
    "bloodmnist": (0.9193, 0.9924),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="folder of MedMNIST .npz files")
    p.add_argument("--datasets", nargs="+", help="file stems to run (default: every .npz in --data-dir)")
    p.add_argument("--seeds", nargs="+", type=int, help="default 0 1 2 (quick: 0)")
    p.add_argument("--methods", nargs="+", choices=METHODS, help="the plain rows (default: all three)")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), help="rows of the ablation table "
                   f"(default: --methods); one of {list(ROWS)}")
    p.add_argument("--epochs", type=int, help="epoch budget E per method (default: dcg_pretrain_epochs + "
                   f"epochs of --config; quick: {QUICK['epochs']})")
    p.add_argument("--config", type=Path, default=common.REPO / "configs" / "benchmark.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override applied to every method (after --quick's); repeatable")
    p.add_argument("--max-train", type=int, help="use at most N training images (fixed random subset; "
                   f"default all, quick: {QUICK['max_train']})")
    p.add_argument("--quick", action="store_true",
                   help="1 seed, few epochs, backbone test_resnet, capped training set: a smoke-level run")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/accuracy-<timestamp>.json); "
                   "when it exists, its finished runs are kept and skipped (rerun the same command to resume)")
    p.add_argument("--docs", type=Path, default=common.DOCS, help="markdown file to update")
    p.add_argument("--no-docs", action="store_true", help="do not update the markdown file")
    p.add_argument("--train-split", action="store_true",
                   help="also evaluate DiffMIC rows on their training images (memorisation diagnostic)")
    p.add_argument("--render", action="store_true",
                   help="train nothing: rewrite the docs section from the finished runs in --out")
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                   help="with --render: first add to --out the finished runs of these result files (rows or seeds "
                        "run as separate processes with the same budget and settings); --out is rewritten")
    p.add_argument("--section", default="accuracy", help="name of the docs section to (re)write")
    p.add_argument("--title", help="heading of the docs section")
    p.add_argument("--work-dir", type=Path, help="run folders (default: <out folder>/tmp-<out name>, kept until "
                   "each run finishes so a stopped benchmark continues an unfinished run from its last checkpoint)")
    p.add_argument("--keep-runs", action="store_true", help="keep the run folders (checkpoints, logs)")
    return p.parse_args(argv)


def split_budget(dcg: int, joint: int, total: int) -> tuple[int, int]:
    """Split ``total`` epochs into (DCG pre-training, joint) in the proportion ``dcg : joint``."""
    if joint == 0:
        return total, 0
    if dcg == 0 or total < 2:
        return 0, total
    d = min(max(round(total * dcg / (dcg + joint)), 1), total - 1)
    return d, total - d


def subsample(bundle: Any, n: int | None) -> Any:
    """The same random ``n`` training images for every seed and method (seed 0)."""
    from diffmic.data.base import DataBundle, ImageArray

    if not n or len(bundle.train) <= n:
        return bundle
    idx = np.sort(np.random.default_rng(0).permutation(len(bundle.train))[:n])
    train = ImageArray(bundle.train.images[idx], bundle.train.labels[idx])
    return DataBundle(train, bundle.val, bundle.test, bundle.class_names, source=bundle.source)


def run_one(method: str, cfg_path: Path, overrides: list[str], budget: dict[str, Any], data: Any,
            run_dir: Path, train_split: bool = False) -> dict[str, Any]:
    """Train and evaluate one row; returns its val/test metrics and timings.

    A DCG or DiffMIC run folder left by a stopped benchmark (``checkpoints/last.ckpt``, no
    ``metrics.json``) is continued from its last checkpoint instead of started again.
    ``train_split``: also evaluate DiffMIC on its own training images (every readout and the prior),
    the memorisation diagnostic: diffusion − prior on train against the same on test.
    """
    from diffmic.config import DiffMICConfig
    from diffmic.training.api import resume, train
    from diffmic.training.baseline import train_classifier

    e, (d, j), warm = budget["epochs"], budget["diffmic_split"], budget["warmup_fraction"]
    if method == "classifier":
        cfg = DiffMICConfig.from_yaml(cfg_path, [*overrides, f"train.warmup_epochs={warm * e}"])
        if run_dir.exists():
            shutil.rmtree(run_dir)  # the classifier cannot resume: start it again
        res = train_classifier(cfg, epochs=e, run_dir=run_dir, data=data)
        return {"val": res["val"], "test": res["test"], "fit_seconds": res["fit_seconds"],
                "selected_epoch": res["selected_epoch"]}
    if method == "dcg":
        extra = [f"train.dcg_pretrain_epochs={e}", "train.epochs=0", "eval.samples=1"]
    else:
        extra = [f"train.dcg_pretrain_epochs={d}", f"train.epochs={j}", f"train.warmup_epochs={warm * j}"]
    cfg = DiffMICConfig.from_yaml(cfg_path, [*overrides, *extra])
    if (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / "metrics.json").is_file():
        print(f"[accuracy] continuing {run_dir} from its last checkpoint", flush=True)
        m = resume(run_dir, data=data).metrics
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        m = train(cfg, run_dir=run_dir, data=data).metrics
    out = {"fit_seconds": m["fit_seconds"], "selected_epoch": m["selected_epoch"]}
    if method == "diffmic" and train_split:
        from diffmic.evaluation.report import evaluate
        from diffmic.models.checkpoint import load_model

        model = load_model(run_dir / "model.pt")
        rep = evaluate(model, data.train, split="train", batch_size=cfg.data.eval_batch_size,
                       samples=cfg.eval.samples, seed=cfg.eval.seed).to_dict()
        out |= {"train": rep["diffusion"], "train_guidance": rep["guidance"], "train_readouts": rep["readouts"]}
    if method == "dcg":
        return out | {"val": m["val"]["guidance"], "test": m["test"]["guidance"]}
    return out | {"val": m["val"]["diffusion"], "test": m["test"]["diffusion"],
                  "val_guidance": m["val"]["guidance"], "test_guidance": m["test"]["guidance"],
                  "val_readouts": m["val"].get("readouts"), "test_readouts": m["test"].get("readouts"),
                  "readout": m.get("readout"), "temperature": m.get("temperature"),
                  "calibration_test": m.get("calibration_test"),
                  "eval_settings": m["test"].get("settings")}


def _row(r: dict[str, Any]) -> str:
    return r.get("row", r["method"])


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± sd over seeds of the test metrics, per dataset and row (and DiffMIC's DCG head,
    its readouts and the per-seed paired difference diffusion − prior)."""
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in runs:
        if "error" in r:
            continue
        ds = rows.setdefault(r["dataset"], {})
        name = _row(r)
        ds.setdefault(name, []).append({**r["test"], "fit_seconds": r["fit_seconds"],
                                        "wall_seconds": r["wall_seconds"]})
        if "test_guidance" in r:
            g = r["test_guidance"]
            ds.setdefault(f"{name} (DCG head)", []).append(dict(g))
            ds.setdefault(f"{name} (diffusion − prior)", []).append(
                {k: r["test"][k] - g[k] for k in ("acc", "auroc", "ece") if k in g and k in r["test"]})
            if "train_guidance" in r:
                tg = r["train_guidance"]
                for ro, met in (r.get("train_readouts") or {}).items():
                    ds.setdefault(f"{name} [{ro}] − prior, train", []).append(
                        {k: met[k] - tg[k] for k in ("acc", "auroc") if k in tg and k in met})
            cal = r.get("calibration_test")
            if cal:  # diffusion and prior, each temperature-scaled on val, measured on test
                for who in ("diffusion", "guidance"):
                    ds.setdefault(f"{name} <cal {who}>", []).append(
                        {k: cal[who][k] for k in ("ece", "aurc", "nll", "ece_raw")})
                ds.setdefault(f"{name} <cal diffusion − prior>", []).append(
                    {k: cal["diffusion"][k] - cal["guidance"][k] for k in ("ece", "aurc", "nll", "ece_raw")})
            for ro, met in (r.get("test_readouts") or {}).items():
                ds.setdefault(f"{name} [{ro}]", []).append(dict(met))
                ds.setdefault(f"{name} [{ro}] − prior", []).append(
                    {k: met[k] - g[k] for k in ("acc", "auroc") if k in g and k in met})
    out: dict[str, Any] = {}
    for ds, per in rows.items():
        out[ds] = {}
        for row, vals in per.items():
            keys = [k for k in (*METRICS, "balanced_acc", "fit_seconds", "wall_seconds", "aurc", "nll", "ece_raw")
                    if k in vals[0]]
            out[ds][row] = {k: common.mean_sd([v[k] for v in vals]) for k in keys} | {"seeds": len(vals)}
    return out


MERGE_KEYS = ("config", "overrides", "quick", "epochs", "diffmic_split", "warmup_fraction", "max_train",
              "select_metric", "eval_samples", "resolved_config")


def _key(run: dict[str, Any]) -> tuple[str, int, str]:
    return run["dataset"], run["seed"], _row(run)


def merge_results(result: dict[str, Any], paths: list[Path]) -> None:
    """Add to ``result`` the finished runs of other result files (``--render --merge``).

    Only files made with the same budget and settings merge: ``MERGE_KEYS`` (the resolved config
    included, so a preset edited in between does not mix) and the overrides of every row both files
    have. A finished (dataset, seed, row) already in ``result`` is kept and the other file's copy left
    out; a failed one is replaced. Each added run records the file it came from, and
    ``result["run"]["merged"]`` the command and commit of each file (once per file, however often it
    is merged). Raises ``ValueError`` with a one-line reason.
    """
    for path in paths:
        if not path.is_file():
            raise ValueError(f"--merge: {path} not found")
        try:
            other = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"--merge: {path}: not a readable result file ({type(exc).__name__})") from None
        if other.get("benchmark") != "accuracy":
            raise ValueError(f"--merge: {path}: not an accuracy benchmark result")
        try:
            _merge_one(result, other, path.name)
        except KeyError as exc:
            raise ValueError(f"--merge: {path}: a result file without {exc}") from None


def _with_defaults(resolved: Any) -> Any:
    """A recorded resolved config with the keys added to the package since then at their defaults
    (a new key's default keeps the behaviour from before it existed); as recorded if it no longer loads."""
    from diffmic.config import DiffMICConfig
    from diffmic.errors import ConfigError

    try:
        return DiffMICConfig.from_dict(resolved).to_dict()
    except (ConfigError, TypeError, ValueError):
        return resolved


def settings_differ(s: dict[str, Any], o: dict[str, Any]) -> list[str]:
    """The settings (``MERGE_KEYS`` and shared rows' overrides) in which two result files differ."""
    s_over, o_over = s.get("row_overrides", {}), o.get("row_overrides", {})
    differ = [k for k in MERGE_KEYS if k != "resolved_config" and o.get(k) != s.get(k)]
    if _with_defaults(o.get("resolved_config")) != _with_defaults(s.get("resolved_config")):
        differ.append("resolved_config")
    return differ + [f"row_overrides of {r}" for r in sorted(set(s_over) & set(o_over)) if s_over[r] != o_over[r]]


def _merge_one(result: dict[str, Any], other: dict[str, Any], name: str) -> None:
    s, o = result["settings"], other["settings"]
    s_over, o_over = s.setdefault("row_overrides", {}), o.get("row_overrides", {})
    differ = settings_differ(s, o)
    if differ:
        raise ValueError(f"--merge: {name}: made with different settings ({', '.join(differ)}); render it "
                         "as its own section instead")
    have = {_key(r) for r in result["runs"] if "error" not in r}
    added = [r if "merged_from" in r else r | {"merged_from": name} for r in other["runs"]
             if "error" not in r and _key(r) not in have]
    replaced = {_key(r) for r in added}
    result["runs"] = [r for r in result["runs"] if not ("error" in r and _key(r) in replaced)] + added
    rows = s.setdefault("rows", list(METHODS))
    for row in o.get("rows", METHODS):
        if row not in rows:
            rows.append(row)
            s_over[row] = o_over.get(row, [])
    s["seeds"] = sorted(set(s.get("seeds", [])) | set(o.get("seeds", [])))
    s["train_images"] = o.get("train_images", {}) | s.get("train_images", {})
    result["datasets"] = sorted(set(result.get("datasets", [])) | set(other.get("datasets", [])))
    entry = {"file": name, "command": other["run"]["command"], "git_commit": other["run"].get("git_commit"),
             "runs": sum(r.get("merged_from") == name for r in result["runs"])}
    if other["run"].get("torch_threads") is not None:
        entry["torch_threads"] = other["run"]["torch_threads"]
    if other["run"].get("continues"):  # the merged file was itself built over several invocations
        entry["continues"] = list(other["run"]["continues"])
    merged = [m for m in result["run"].get("merged", []) if m["file"] != name]
    merged += [m for m in other["run"].get("merged", []) if m["file"] not in {x["file"] for x in merged}]
    result["run"]["merged"] = [*merged, entry]


def _command_threads(command: str, cpu_count: int | None) -> int | None:
    """Torch threads of a recorded ``accuracy.py`` command: its ``--threads N``, else all cores."""
    words = command.split()
    for i, w in enumerate(words):
        if w.startswith("--threads="):
            return int(w.split("=", 1)[1])
        if w == "--threads" and i + 1 < len(words):
            return int(words[i + 1])
    return cpu_count


def thread_counts(result: dict[str, Any]) -> list[int]:
    """Every torch-thread count the runs of ``result`` were made with: its own invocation, the earlier
    invocations it continues and each merged file (with theirs); the fit times average over them."""
    info = result["run"]
    cpus = info.get("cpu_count")
    found = {info.get("torch_threads")}
    found |= {_command_threads(c, cpus) for c in info.get("continues", [])}
    for m in (m for m in info.get("merged", []) if m.get("runs", 1)):  # files that added no run: not counted
        found.add(m.get("torch_threads", _command_threads(m["command"], cpus)))
        found |= {_command_threads(c, cpus) for c in m.get("continues", [])}
    return sorted(t for t in found if t is not None)


def markdown(result: dict[str, Any]) -> str:
    s, info = result["settings"], result["run"]
    commit = common.commit_label(info)
    d, j = s["diffmic_split"]
    joint = s.get("resolved_config", {}).get("train", {}).get("joint_train", True)
    lines = [
        f"## {s.get('title') or 'Accuracy against baselines'}",
        "",
        (f"Command: `{info['command']}` · {commit} · {info['cpu_count']} CPUs, {info['torch_threads']} torch "
        f"threads · {info['started']} · wall {result['wall_seconds']:.0f} s"
        f"{' (this invocation)' if info.get('continues') else ''}"),
        *[f"- Continues the finished runs of an earlier invocation: `{c}`" for c in info.get("continues", [])],
        *[f"- Merged from `{m['file']}` ({m['runs']} run(s), commit {m['git_commit']}): `{m['command']}`"
          + "".join(f", continuing `{c}`" for c in m.get("continues", []))
          for m in info.get("merged", [])],
        "",
        f"Budget: **{s['epochs']} epochs per method** (DiffMIC: {d} DCG pre-training + {j} diffusion, the DCG "
        f"{'trained jointly' if joint else 'frozen'} unless a row says otherwise). Backbone "
        f"`{s['backbone']}` (DCG global/local and classifier), denoiser encoder `{s['denoiser_backbone']}` unless a "
        f"row overrides it, "
        f"feature_dim {s['feature_dim']}, {s['sampler']} {s['sampling_steps']} steps, {s['eval_samples']} "
        f"sample(s). Selection on validation `{s['select_metric']}`; test split; mean ± sd over "
        f"{len(s['seeds'])} seed(s) {s['seeds']}. Training images: "
        + ", ".join(f"{k} {v}" for k, v in s["train_images"].items()) + ".",
    ]
    if s["quick"]:
        lines += ["", (f"**Quick mode** (backbone `{s['backbone']}`, training set capped at {s['max_train']} "
                  "images, few epochs): a smoke-level run, not comparable with published numbers.")]
    lines += ["", "| dataset | method | ACC | macro-F1 | QWK | macro AUROC | ECE | fit s / run |",
              "|---|---|---|---|---|---|---|---|"]
    order = [x for row in s.get("rows", METHODS) for x in (row, f"{row} (DCG head)")]
    for ds, per in result["summary"].items():
        ordinal = any(ds.startswith(o) for o in ORDINAL)
        for row in [r for r in order if r in per]:
            st = per[row]
            cells = [common.fmt_mean_sd(st.get(k)) if (k != "qwk" or ordinal) else "–" for k in METRICS]
            fit = st.get("fit_seconds", {}).get("mean")
            n = st.get("seeds")
            label = row if n is None or n == len(s["seeds"]) else f"{row} ({n} of {len(s['seeds'])} seeds)"
            lines.append(f"| {ds} | {label} | " + " | ".join(cells) + f" | {'–' if fit is None else f'{fit:.0f}'} |")
    threads = thread_counts(result)
    if len(threads) > 1:
        lines += ["", (f"`fit s / run` averages runs made with {' and '.join(map(str, threads))} torch threads "
                       "(see the commands above): it is not a cost figure.")]
    diff_rows = [r for r in s.get("rows", METHODS) if ROWS.get(r, ("",))[0] == "diffmic"]
    if any(f"{r} [mean_path]" in per for per in result["summary"].values() for r in diff_rows):
        lines += ["", ("Readouts of the same DiffMIC runs (test ACC / macro AUROC) and the per-seed paired "
                       "difference to the run's own DCG prior (mean ± sd over seeds):"), "",
                  "| dataset | row | shipped − prior ACC | AUROC | " + " | ".join(
                      f"{ro} ACC | AUROC | − prior ACC | − prior AUROC" for ro in READOUTS) + " |",
                  "|---|---|---|---|" + "---|" * (4 * len(READOUTS))]
        for ds, per in result["summary"].items():
            for row in [r for r in diff_rows if f"{r} [mean_path]" in per]:
                d0 = per.get(f"{row} (diffusion − prior)", {})
                cells = [common.fmt_mean_sd(d0.get("acc")), common.fmt_mean_sd(d0.get("auroc"))]
                for ro in READOUTS:
                    a, dd = per.get(f"{row} [{ro}]", {}), per.get(f"{row} [{ro}] − prior", {})
                    cells += [common.fmt_mean_sd(a.get("acc")), common.fmt_mean_sd(a.get("auroc")),
                              common.fmt_mean_sd(dd.get("acc")), common.fmt_mean_sd(dd.get("auroc"))]
                lines.append(f"| {ds} | {row} | " + " | ".join(cells) + " |")
        calibrated = [(ds, r) for ds, per in result["summary"].items() for r in diff_rows
                      if f"{r} <cal diffusion>" in per]
        if calibrated:
            lines += ["", ("Calibration on test after temperature scaling fitted on val, the shipped diffusion "
                           "readout against its own DCG prior (each with its own T; lower is better; "
                           "paired difference per seed):"), "",
                      ("| dataset | row | diffusion ECE | prior ECE | − prior ECE | diffusion AURC | prior AURC "
                       "| − prior AURC | diffusion NLL | prior NLL |"), "|---|---|---|---|---|---|---|---|---|---|"]
            for ds, row in calibrated:
                per = result["summary"][ds]
                dif, pri, dd = (per[f"{row} <cal {w}>"] for w in ("diffusion", "guidance", "diffusion − prior"))
                cells = [dif.get("ece"), pri.get("ece"), dd.get("ece"), dif.get("aurc"), pri.get("aurc"),
                         dd.get("aurc"), dif.get("nll"), pri.get("nll")]
                lines.append(f"| {ds} | {row} | " + " | ".join(common.fmt_mean_sd(c) for c in cells) + " |")
        trained = [(ds, r) for ds, per in result["summary"].items() for r in diff_rows
                   if f"{r} [mean_path] − prior, train" in per]
        if trained:
            lines += ["", ("Memorisation diagnostic: readout − prior ACC on the training images against the same "
                           "on test (a readout that gains on train and loses on test learned training residuals):"),
                      "",
                      "| dataset | row | " + " | ".join(f"{ro} train | {ro} test" for ro in READOUTS) + " |",
                      "|---|---|" + "---|" * (2 * len(READOUTS))]
            for ds, row in trained:
                per = result["summary"][ds]
                cells = [common.fmt_mean_sd(per.get(f"{row} [{ro}] − prior{sfx}", {}).get("acc"))
                         for ro in READOUTS for sfx in (", train", "")]
                lines.append(f"| {ds} | {row} | " + " | ".join(cells) + " |")
        lines += ["", "Rows: " + "; ".join(f"`{r}`: " + (" ".join(f"`{o}`" for o in ROWS[r][1]) or "as the config")
                                          for r in s.get("rows", METHODS) if r in ROWS) + "."]
    errors = [r for r in result["runs"] if "error" in r]
    if errors:
        lines += ["", "Failed runs: " + "; ".join(f"{r['dataset']}/{r['method']}/seed {r['seed']}: "
                                                   f"{r['error'].splitlines()[-1][:120]}" for r in errors)]
    lines += ["", ("QWK only for ordinal datasets (RetinaMNIST). ECE: 15 equal-width bins (L1). "
              "`<row> (DCG head)` is the guidance prior of the same DiffMIC runs."), ""]
    names = [ds for ds in result["summary"] if ds.split("_")[0] in MEDMNIST_V2] or \
        [ds for ds in result["datasets"] if ds.split("_")[0] in MEDMNIST_V2]
    if names:
        lines += ["### Published MedMNIST numbers at 28×28 (published, not re-measured)", "",
                  ("| dataset | v2 ResNet-18 (28) ACC | AUC | v2 ResNet-50 (28) ACC | AUC "
                  "| MedMNIST+ ResNet-18 28 ACC | AUC |"), "|---|---|---|---|---|---|---|"]
        for ds in names:
            key = ds.split("_")[0]
            r18, r50 = MEDMNIST_V2[key]
            mark = " †" if len(r50) > 2 else ""
            plus = MEDMNIST_PLUS_R18_28[key]
            lines.append(f"| {key} | {r18[0]:.3f} | {r18[1]:.3f} | {r50[0]:.3f}{mark} | {r50[1]:.3f}{mark} "
                         f"| {plus[0]:.3f} | {plus[1]:.3f} |")
        lines += ["", ("Sources (docs anchors.md §1–2): MedMNIST v2 (Yang et al., Sci Data 2023, Table 3; 100 "
                  "epochs, Adam 1e-3, no augmentation, selection on val AUC); MedMNIST+ (Doerrich et al., "
                  "Sci Rep 2025; mean of 3 seeds, 28×28 images zero-padded to 224 into ImageNet-pretrained timm "
                  "models, selection on val loss). "
                  "† recalled from the paper, not verified against the PDF.")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    threads = common.set_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    from diffmic.cli import quiet_library_warnings
    from diffmic.config import DiffMICConfig

    quiet_library_warnings()  # e.g. Lightning's LeafSpec deprecation, once per run otherwise
    from diffmic.data.medmnist import read_medmnist

    started = time.perf_counter()
    info = common.run_info("benchmarks/accuracy.py", argv)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    rows = args.rows or args.methods or list(METHODS)
    overrides = [*(QUICK["overrides"] if args.quick else []), *args.overrides]
    max_train = args.max_train if args.max_train is not None else (QUICK["max_train"] if args.quick else None)
    base = DiffMICConfig.from_yaml(args.config, overrides)
    for row in rows:  # every row's overrides must be valid before hours of training start
        DiffMICConfig.from_yaml(args.config, [*overrides, *ROWS[row][1]])
    t = base.train
    epochs = args.epochs or (QUICK["epochs"] if args.quick else t.dcg_pretrain_epochs + t.epochs)
    budget = {"epochs": epochs, "diffmic_split": split_budget(t.dcg_pretrain_epochs, t.epochs, epochs),
              "warmup_fraction": t.warmup_epochs / t.epochs if t.epochs else 0.0}

    files = sorted(args.data_dir.glob("*.npz"))
    if args.datasets:
        wanted = {Path(n).stem for n in args.datasets}
        missing = wanted - {f.stem for f in files}
        if missing:
            print(f"accuracy: error: no {sorted(missing)} .npz in {args.data_dir}", file=sys.stderr)
            return 2
        files = [f for f in files if f.stem in wanted]
    if not files:
        print(f"accuracy: error: no .npz files in {args.data_dir}", file=sys.stderr)
        return 2

    out = args.out or common.RESULTS / f"accuracy-{common.timestamp()}.json"
    if args.render:
        if not out.is_file():
            print(f"accuracy: error: --render needs an existing --out file, {out} not found", file=sys.stderr)
            return 2
        result = json.loads(out.read_text())
        if args.merge:
            try:
                merge_results(result, args.merge)
            except ValueError as exc:
                print(f"accuracy: error: {exc}", file=sys.stderr)
                return 2
        result["summary"] = summarise(result["runs"])
        if args.merge:
            common.write_json(out, result)
            print(f"[accuracy] merged {len(args.merge)} file(s) into {out}")
        if args.title:
            result["settings"]["title"] = args.title
        common.update_section(args.docs, args.section, markdown(result))
        print(f"[accuracy] rewrote the {args.section} section of {args.docs} from {out}")
        return 0
    work = args.work_dir or out.parent / f"tmp-{out.stem}"
    work.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    earlier: dict[str, Any] = {}
    if out.is_file():  # resume: keep the finished runs of an earlier invocation of this command
        earlier = json.loads(out.read_text())
        runs = [r for r in earlier.get("runs", []) if "error" not in r]
        print(f"[accuracy] {out} exists: keeping its {len(runs)} finished run(s)", flush=True)
    before = earlier.get("settings", {})
    # the file describes every run it holds: seeds and rows of the earlier invocations stay listed
    all_seeds = sorted(set(seeds) | set(before.get("seeds", [])))
    all_rows = [*(r for r in before.get("rows", []) if r not in rows), *rows]
    all_overrides = before.get("row_overrides", {}) | {r: ROWS[r][1] for r in rows}
    earlier_commands = ([*earlier.get("run", {}).get("continues", []), earlier["run"]["command"]]
                        if "run" in earlier else [])
    done = {(r["dataset"], r["seed"], _row(r)) for r in runs}
    print(f"[accuracy] {'QUICK mode: ' if args.quick else ''}backbone {base.model.backbone}, denoiser "
          f"{base.model.denoiser_backbone}, feature_dim {base.model.feature_dim}, {epochs} epochs per method "
          f"(DiffMIC {budget['diffmic_split'][0]} DCG + {budget['diffmic_split'][1]} joint), seeds {seeds}, "
          f"rows {rows}, train images capped at {max_train or 'all'}, {threads} torch threads", flush=True)
    method_seconds = {m: 0.0 for m in rows}
    train_images = {}

    def result() -> dict[str, Any]:
        return {
            "benchmark": "accuracy",
            "run": info | {"torch_threads": threads} | ({"continues": earlier_commands} if earlier_commands else {}),
            "settings": {
                "config": str(args.config), "overrides": overrides, "quick": args.quick, "seeds": all_seeds,
                "rows": all_rows, "row_overrides": all_overrides,
                "methods": sorted({ROWS[r][0] for r in rows} | set(before.get("methods", []))), "epochs": epochs,
                "diffmic_split": list(budget["diffmic_split"]), "title": args.title,
                "warmup_fraction": budget["warmup_fraction"], "max_train": max_train,
                "train_images": before.get("train_images", {}) | train_images,
                "backbone": base.model.backbone, "denoiser_backbone": base.model.denoiser_backbone,
                "feature_dim": base.model.feature_dim, "sampler": base.diffusion.sampler,
                "sampling_steps": base.diffusion.sampling_steps, "eval_samples": base.eval.samples,
                "select_metric": base.train.select_metric, "resolved_config": base.to_dict(),
            },
            "datasets": sorted({f.stem for f in files} | set(earlier.get("datasets", []))),
            "wall_seconds": round(time.perf_counter() - started, 1),
            "wall_seconds_per_method": {m: round(v, 1) for m, v in method_seconds.items()},
            "runs": runs,
            "summary": summarise(runs),
        }

    if before:
        differ = settings_differ(result()["settings"], before)
        if differ:
            print(f"accuracy: error: {out} holds runs made with different settings ({', '.join(differ)}); "
                  "give this command another --out", file=sys.stderr)
            return 2
    failed = False
    for f in files:
        data = subsample(read_medmnist(f), max_train)
        train_images[f.stem] = len(data.train)
        for seed in seeds:
            for row in rows:
                if (f.stem, seed, row) in done:
                    continue
                method, row_overrides = ROWS[row]
                ov = [*overrides, *row_overrides, f"data.path={f}", f"train.seed={seed}"]
                run_dir = work / f.stem / str(seed) / row
                tic = time.perf_counter()
                record: dict[str, Any] = {"dataset": f.stem, "seed": seed, "method": method, "row": row}
                try:
                    record |= run_one(method, args.config, ov, budget, data, run_dir, args.train_split)
                except Exception:  # noqa: BLE001 - keep going; the failure is recorded and makes the exit code 1
                    record["error"] = traceback.format_exc()
                    failed = True
                record["wall_seconds"] = round(time.perf_counter() - tic, 1)
                method_seconds[row] += record["wall_seconds"]
                what = (f"test acc {record['test']['acc']:.3f}" if "test" in record
                        else "FAILED: " + record["error"].strip().splitlines()[-1])
                print(f"[accuracy] {f.stem} seed {seed} {row}: {what} ({record['wall_seconds']:.0f} s)", flush=True)
                if "error" in record:
                    runs.append(record)
                    continue
                runs.append(record)
                if not args.keep_runs:
                    shutil.rmtree(run_dir, ignore_errors=True)
                common.write_json(out, result())  # a finished run is never lost
    common.publish("accuracy", out, result(), None if args.no_docs else args.docs, markdown, section=args.section)
    if not args.keep_runs and args.work_dir is None and not failed:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
