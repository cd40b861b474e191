"""Speed benchmark on CPU: DiffMIC inference and training cost against a plain classifier.

Random weights (speed only). For each image size: a plain classifier with the DCG's backbone (the
reference, same small-stem rule: 3x3 stride-1 stem for sizes <= 64), the DCG alone, DiffMIC with the
default DDIM sampler at several step counts (image features computed once), DiffMIC with several
samples per image, DiffMIC with the shared-encoder option, the original's "encoder recomputed at
every step" chain, and one training step of each phase (classifier, DCG pre-training, joint
DiffMIC step as ``DiffMICModule.training_step``). Each number is the median over timed repeats
after warm-up, reported as ms/img and as a ratio to the plain classifier of the same run.

    python benchmarks/speed.py                     # sizes 28 64 224, steps 10 50 250 1000
    python benchmarks/speed.py --full              # + 1000 steps at 224, 250-step reference chain
    python benchmarks/speed.py --quick             # the shipped presets against a plain ResNet-18 (issue 12)

``--quick`` (at most 10 minutes on 2 cores) measures, at 28 px with ``configs/retinamnist.yaml`` and at
224 px with ``configs/isic2018.yaml``: a plain ResNet-18 classifier (the reference of every ratio) and
a plain classifier of the preset's own backbone where it differs; the preset's inference as
``diffmic predict`` runs it by default (``predict_details``, the preset's readout, ``--samples 1``,
``--engine auto``: BatchNorm folded by ``DiffMIC.fuse_for_inference``), the same with 16 and
100 chains, the same with the other engine; and the training steps of the
classifier and of the preset (``DiffMICModule.training_step``). The preset's default inference case
and its joint training step carry ``"preset_default": true`` beside ``ratio_to_classifier``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common

RESULT_TAG = "@@SPEED-RESULT@@"
NUM_CLASSES = 7  # ISIC-like
FAITHFUL_224_FEATURE_DIM = 6144  # the original's denoiser width (ISIC / APTOS at 224)
QUICK_PRESETS = {28: common.REPO / "configs" / "retinamnist.yaml", 224: common.REPO / "configs" / "isic2018.yaml"}
QUICK_CLASSES = {28: 5, 224: 7}  # RetinaMNIST, ISIC 2018
QUICK_REFERENCE = "resnet18"  # the plain classifier
LIGHT_ENCODER = "resnet10t"  # a lighter denoiser encoder (accuracy row `light_encoder` of accuracy.py)
QUICK_TARGETS = {28: {"infer": 2.0, "train": 2.5, "chains16": 1.5}, 224: {"infer": 1.5, "train": 2.5, "chains16": 1.5}}
TARGETS = {"infer_ratio": 2.5, "shared_ratio": 1.5, "recompute_speedup": 20.0, "train_ratio": 3.0,
           "infer_ms_224": 110.0, "train_ms_224": 175.0, "original_steps": 250}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=common.REPO / "configs" / "benchmark.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override for every case; repeatable")
    p.add_argument("--sizes", nargs="+", type=int, default=[28, 64, 224])
    p.add_argument("--steps", nargs="+", type=int, default=[10, 50, 250, 1000],
                   help="DDIM step counts (the config's sampling_steps is always added)")
    p.add_argument("--ref-steps", nargs="+", type=int,
                   help="step counts of the encoder-recomputed-every-step chain (default 10 50; --full adds 250)")
    p.add_argument("--samples", nargs="+", type=int, default=[1, 16], help="samples per image at the default steps")
    p.add_argument("--full", action="store_true", help="also 1000 steps at sizes > 64 and the 250-step reference")
    p.add_argument("--quick", action="store_true",
                   help="the shipped presets (28 px: configs/retinamnist.yaml, 224 px: configs/isic2018.yaml) against "
                   "a plain ResNet-18: predict's default inference, 16 and 100 chains, the other --engine and "
                   "the joint training step (ignores --config, --sizes, --steps, --ref-steps, --samples)")
    p.add_argument("--chains", nargs="+", type=int, default=[16, 100],
                   help="--quick: chain counts measured beside predict's default (--samples 1)")
    p.add_argument("--backbone", help="backbone for the DCG, the denoiser encoder and the classifier "
                   "(default: the config's; e.g. test_resnet for a smoke run)")
    p.add_argument("--feature-dim", type=int, help="denoiser width at every size (default: the config's "
                   f"at sizes <= 64, {FAITHFUL_224_FEATURE_DIM} above)")
    p.add_argument("--batch", type=int, help="batch size (default 64 for sizes <= 64, 16 above)")
    p.add_argument("--warmup", type=int, help="untimed calls before timing (at least 1; default 2, --quick 1)")
    p.add_argument("--repeats", type=int, help="timed calls per case, median reported (default 5, --quick 3)")
    p.add_argument("--max-case-seconds", type=float,
                   help="fewer repeats (at least 1) for cases whose single call would exceed this in total "
                   "(default 60, --quick 25)")
    p.add_argument("--no-train", action="store_true", help="skip the training-step cases")
    p.add_argument("--in-process", action="store_true",
                   help="run every case in this process (faster; memory is then the cumulative process peak)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/speed-<timestamp>.json)")
    p.add_argument("--docs", type=Path, default=common.DOCS, help="markdown file to update")
    p.add_argument("--no-docs", action="store_true", help="do not update the markdown file")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one case (JSON spec) and exit
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------ cases
def plan(args: argparse.Namespace, default_steps: int, timesteps: int, backbone: str) -> tuple[list[dict], list[dict]]:
    """The cases to run and the ones skipped (with the reason)."""
    cases, skipped = [], []
    ref_steps = args.ref_steps or ([10, 50, 250] if args.full else [10, 50])

    def add(size: int, kind: str, name: str, **kw: Any) -> None:
        steps = kw.get("steps")
        reason = None
        if steps is not None and steps > timesteps:
            reason = f"{steps} steps exceed diffusion.timesteps={timesteps}"
        elif steps is not None and steps >= 1000 and size > 64 and not args.full:
            reason = f"{steps} steps at {size}px skipped (run with --full); not estimated"
        entry = {"size": size, "batch": args.batch or (64 if size <= 64 else 16), "kind": kind, "name": name, **kw}
        (skipped if reason else cases).append(entry | ({"reason": reason} if reason else {}))

    for size in args.sizes:
        add(size, "infer_classifier", f"plain {backbone} classifier")
        add(size, "infer_dcg", "DCG alone")
        for k in sorted(set(args.steps) | {default_steps}):
            add(size, "infer_diffmic", f"DiffMIC ddim {k} steps", steps=k, samples=1)
        for n in sorted(set(args.samples) - {1}):
            add(size, "infer_diffmic", f"DiffMIC ddim {default_steps} steps x {n} samples", steps=default_steps,
                samples=n)
        add(size, "infer_shared", f"DiffMIC shared encoder, ddim {default_steps} steps", steps=default_steps, samples=1)
        for k in sorted(set(ref_steps)):
            add(size, "infer_recompute", f"reference: encoder recomputed every step, {k} steps", steps=k)
        if not args.no_train:
            add(size, "train_classifier", f"train step: plain {backbone} classifier")
            add(size, "train_dcg", "train step: DCG pre-training")
            add(size, "train_joint", "train step: joint DiffMIC (diffusion + DCG CE)")
    return cases, skipped


def plan_quick(args: argparse.Namespace) -> list[dict]:
    """``--quick``: per size, the reference classifiers, the preset's inference and training cases."""
    from diffmic.config import DiffMICConfig
    from diffmic.prediction import AUTO_ENGINE

    cases = []
    for size, config in QUICK_PRESETS.items():
        preset = DiffMICConfig.from_yaml(config, args.overrides)
        backbone = args.backbone or preset.model.backbone
        reference = args.backbone or QUICK_REFERENCE
        base = {"size": size, "batch": args.batch or (64 if size <= 64 else 16), "config": str(config),
                "preset": True, "num_classes": QUICK_CLASSES[size]}
        readout = preset.eval.readout
        steps = preset.diffusion.sampling_steps

        def add(kind: str, name: str, base: dict[str, Any] = base, **kw: Any) -> None:
            cases.append(base | {"kind": kind, "name": name, "preset_default": False, **kw})

        add("infer_classifier", f"plain {reference} classifier (reference)", classifier_backbone=reference)
        if backbone != reference:
            add("infer_backbone_classifier", f"plain {backbone} classifier (the preset's DCG backbone)",
                classifier_backbone=backbone)
        what = f"{readout}, {preset.diffusion.sampler} {steps} steps"
        engine = AUTO_ENGINE  # what `diffmic predict --engine auto` runs
        add("infer_preset", f"preset as `diffmic predict` runs it ({what}, --samples 1, engine {engine})", samples=1,
            engine=engine, preset_default=True)
        for n in args.chains:
            batch = base["batch"] if n * base["batch"] * preset.model.feature_dim <= 16 * 16 * 6144 else \
                max(1, 16 * 16 * 6144 // (n * preset.model.feature_dim))  # the big MLP at 100 chains: fewer images
            add("infer_preset", f"preset, --samples {n} ({what}, engine {engine})", samples=n, engine=engine,
                batch=batch)
        other = "eager" if engine == "fused" else "fused"
        add("infer_preset", f"preset, --engine {other}, --samples 1", samples=1, engine=other, other_engine=True)
        if not preset.model.share_encoder:  # what flipping the accuracy-dependent switches would buy
            add("infer_preset", f"preset + model.share_encoder=true, --samples 1, engine {engine}", samples=1,
                engine=engine, extra_overrides=["model.share_encoder=true"])
            if preset.model.denoiser_backbone != LIGHT_ENCODER:
                add("infer_preset", f"preset + model.denoiser_backbone={LIGHT_ENCODER}, --samples 1, engine {engine}",
                    samples=1, engine=engine, extra_overrides=[f"model.denoiser_backbone={LIGHT_ENCODER}"])
        if (preset.model.local_backbone or preset.model.backbone) != LIGHT_ENCODER:  # a lighter DCG local branch
            add("infer_preset", f"preset + model.local_backbone={LIGHT_ENCODER}, --samples 1, engine {engine}",
                samples=1, engine=engine, extra_overrides=[f"model.local_backbone={LIGHT_ENCODER}"])
        if not args.no_train:
            add("train_classifier", f"train step: plain {reference} classifier (reference)",
                classifier_backbone=reference)
            what = "diffusion + DCG CE" if preset.train.joint_train else "diffusion, DCG frozen"
            add("train_joint", f"train step: preset DiffMIC diffusion phase ({what})", preset_default=True)
            if not preset.model.share_encoder:
                add("train_joint", "train step: preset + model.share_encoder=true",
                    extra_overrides=["model.share_encoder=true"])
                if preset.model.denoiser_backbone != LIGHT_ENCODER:
                    add("train_joint", f"train step: preset + model.denoiser_backbone={LIGHT_ENCODER}",
                        extra_overrides=[f"model.denoiser_backbone={LIGHT_ENCODER}"])
    return cases


def build_cfg(spec: dict[str, Any]) -> Any:
    from diffmic.config import DiffMICConfig

    ov = list(spec["overrides"])
    if spec.get("backbone"):
        ov += [f"model.backbone={spec['backbone']}", f"model.denoiser_backbone={spec['backbone']}",
               "model.local_backbone=null"]
    if spec.get("classifier_backbone"):
        ov += [f"model.backbone={spec['classifier_backbone']}"]
    default_fd = None if spec["size"] <= 64 or spec.get("preset") else FAITHFUL_224_FEATURE_DIM
    fd = spec.get("feature_dim") or default_fd
    if fd:
        ov.append(f"model.feature_dim={fd}")
    if spec["kind"] == "infer_shared":
        ov.append("model.share_encoder=true")
    ov += spec.get("extra_overrides", [])
    ov += ["train.dcg_pretrain_epochs=1", "train.epochs=10"]  # so the module has both phases
    return DiffMICConfig.from_yaml(spec["config"], ov)


def timed(fn: Callable[[], Any], warmup: int, repeats: int, max_seconds: float) -> dict[str, Any]:
    """Median seconds per call after warm-up; fewer calls for slow cases (at least one timed)."""
    tic = time.perf_counter()
    fn()
    first = time.perf_counter() - tic
    for _ in range(max(0, warmup - 1)):
        if first * 2 > max_seconds:
            break
        fn()
    n = max(1, min(repeats, int(max_seconds // max(first, 1e-9))))
    times = []
    for _ in range(n):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return {"seconds": statistics.median(times), "repeats": n, "all_seconds": [round(t, 5) for t in times]}


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Build what one case needs (random weights), time it, return the measurements."""
    import torch
    import torch.nn.functional as F

    from diffmic.diffusion.sampling import sample
    from diffmic.models.factory import build_model
    from diffmic.prediction import for_inference
    from diffmic.training.baseline import ClassifierModule

    cfg = build_cfg(spec)
    size, b, kind = spec["size"], spec["batch"], spec["kind"]
    torch.manual_seed(0)
    num_classes = spec.get("num_classes", NUM_CLASSES)
    images = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8)
    y = torch.randint(0, num_classes, (b,))
    margs = {"num_classes": num_classes, "in_chans": 3, "image_size": size}
    gen = torch.Generator().manual_seed(0)
    params = None

    if kind == "infer_preset":  # what `diffmic predict` calls, on one batch of [0, 1] images
        model = build_model(cfg, **margs).eval()
        params = sum(p.numel() for p in model.parameters())
        model = for_inference(model, spec.get("engine", "eager"))  # as `diffmic predict --engine` (fused: in place)
        x01 = images.float() / 255.0
        samples = spec["samples"]

        def fn() -> Any:
            return model.predict_details(x01, samples=samples, generator=gen, batch_size=b)
    elif kind in ("infer_classifier", "infer_backbone_classifier", "train_classifier"):
        cm = ClassifierModule(cfg.to_dict(), margs, epochs=1)
        params = sum(p.numel() for p in cm.parameters())
        if kind != "train_classifier":
            cm.eval()
            x = cm.inputs(images, train=False)

            def fn() -> Any:
                with torch.inference_mode():
                    return cm(x)
        else:
            cm.train()
            opt = torch.optim.Adam(cm.parameters(), lr=cfg.train.lr)

            def fn() -> Any:
                loss = F.cross_entropy(cm(cm.inputs(images, train=True)), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(cm.parameters(), cfg.train.grad_clip)
                opt.step()
    elif kind.startswith("infer"):
        model = build_model(cfg, **margs).eval()
        params = sum(p.numel() for p in model.parameters())
        x = model.normalize(images.float() / 255.0)
        steps, samples = spec.get("steps"), spec.get("samples", 1)
        if kind == "infer_dcg":
            params = sum(p.numel() for p in model.guidance.parameters())

            def call() -> Any:
                return model.guidance(x)
        elif kind in ("infer_diffmic", "infer_shared"):
            def call() -> Any:
                return model(x, samples=samples, generator=gen, sampler="ddim", num_steps=steps)
        else:  # the original: the denoiser's image encoder runs again inside every denoiser call
            def call() -> Any:
                prior = model.guidance(x).logits.softmax(1)

                def denoise_fn(y_t: Any, t: Any) -> Any:
                    return model.denoiser.denoise(model.denoiser.encode(x), y_t, prior, t)

                return sample(model.schedule, denoise_fn, prior, sampler="ddim", num_steps=steps, generator=gen)

        def fn() -> Any:
            with torch.inference_mode():
                return call()
    else:
        module = training_module(cfg, margs)
        params = sum(p.numel() for p in module.model.parameters())
        epoch = 0 if kind == "train_dcg" else cfg.train.dcg_pretrain_epochs
        module._trainer = SimpleNamespace(current_epoch=epoch, num_training_batches=100)
        module.train()

        def fn() -> Any:
            return module.training_step((images, y), 10)

    t = timed(fn, spec["warmup"], spec["repeats"], spec["max_case_seconds"])
    return {"ms_per_img": 1000 * t["seconds"] / b, "img_per_s": b / t["seconds"], "repeats": t["repeats"],
            "batch_seconds": t["all_seconds"], "params": params,
            "feature_dim": cfg.model.feature_dim, "backbone": cfg.model.backbone,
            "denoiser_backbone": cfg.model.denoiser_backbone, "share_encoder": cfg.model.share_encoder,
            "readout": cfg.eval.readout, "sampling_steps": cfg.diffusion.sampling_steps}


def training_module(cfg: Any, margs: dict[str, Any]) -> Any:
    """A ``DiffMICModule`` whose ``training_step`` runs outside a Trainer (optimisers, backward,
    clipping and logging wired to plain torch): the timed code is the module's own step."""
    import torch

    from diffmic.training.module import DiffMICModule

    module = DiffMICModule(cfg.to_dict(), margs | {"class_names": [str(i) for i in range(margs["num_classes"])]})
    opts = module.configure_optimizers()

    def clip(opt: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str = "norm") -> None:
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, gradient_clip_val or 0.0)

    module.optimizers = lambda use_pl_optimizer=True: opts  # type: ignore[method-assign]
    module.manual_backward = lambda loss, *a, **k: loss.backward()  # type: ignore[method-assign]
    module.clip_gradients = clip  # type: ignore[method-assign]
    module.log = lambda *a, **k: None  # type: ignore[method-assign]
    module.log_dict = lambda *a, **k: None  # type: ignore[method-assign]
    return module


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def in_subprocess(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    """Run one case in a fresh interpreter; its peak RSS is that process's ``ru_maxrss``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": f"worker exited with {proc.returncode}: " + " | ".join(tail)}


def worker(spec: dict[str, Any]) -> int:
    try:
        if spec["kind"] == "baseline":  # the imports of every case, nothing built
            for name in ("diffmic.diffusion.sampling", "diffmic.models.factory", "diffmic.training.baseline",
                         "diffmic.training.module"):
                importlib.import_module(name)
            out: dict[str, Any] = {}
        else:
            out = run_case(spec)
    except Exception:  # noqa: BLE001 - reported to the parent process
        out = {"error": traceback.format_exc()}
    out["peak_rss_mb"] = round(maxrss_mb(), 1)
    print(RESULT_TAG + json.dumps(out), flush=True)
    return 0


# ---------------------------------------------------------------------------------- report
def add_ratios(results: list[dict[str, Any]]) -> None:
    for r in results:
        ref_kind = "train_classifier" if r["kind"].startswith("train") else "infer_classifier"
        ref = next((q for q in results if q["kind"] == ref_kind and q["size"] == r["size"] and "ms_per_img" in q), None)
        r["ratio_to_classifier"] = r["ms_per_img"] / ref["ms_per_img"] if ref and "ms_per_img" in r else None
        if r["kind"] != "infer_preset" or "ms_per_img" not in r:
            continue
        own = next((q for q in results if q["kind"] == "infer_backbone_classifier" and q["size"] == r["size"]
                    and "ms_per_img" in q), None)
        if own:
            r["ratio_to_backbone_classifier"] = r["ms_per_img"] / own["ms_per_img"]
        one = next((q for q in results if q["kind"] == "infer_preset" and q["size"] == r["size"]
                    and q.get("preset_default") and "ms_per_img" in q), None)
        if one:
            r["ratio_to_one_chain"] = r["ms_per_img"] / one["ms_per_img"]


def quick_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 12's targets, on the --quick measurements (ratios of one run)."""
    rows = []

    def row(target: str, size: int, v: float | None, limit: float) -> None:
        if v is not None:
            rows.append({"target": target, "size": size, "measured": f"{v:.2f}×",
                         "status": "met" if v <= limit else "not met"})

    for size in sorted({r["size"] for r in results}):
        t = QUICK_TARGETS.get(size, QUICK_TARGETS[224])
        ok = [r for r in results if r["size"] == size and "ms_per_img" in r]
        default = next((r for r in ok if r["kind"] == "infer_preset" and r.get("preset_default")), None)
        if default:
            row(f"preset inference (predict's default) ≤ {t['infer']}× plain {QUICK_REFERENCE}", size,
                default["ratio_to_classifier"], t["infer"])
        other = next((r for r in ok if r["kind"] == "infer_preset" and r.get("other_engine")), None)
        if other:
            row(f"the same, --engine {other['engine']} ≤ {t['infer']}× plain {QUICK_REFERENCE}", size,
                other["ratio_to_classifier"], t["infer"])
        for r in (r for r in ok if r["kind"] == "infer_preset" and r.get("extra_overrides")):
            row(f"the same with {' '.join(r['extra_overrides'])} ≤ {t['infer']}× plain {QUICK_REFERENCE}", size,
                r["ratio_to_classifier"], t["infer"])
        chains = next((r for r in ok if r["kind"] == "infer_preset" and r.get("samples") == 16
                       and not r.get("other_engine") and not r.get("extra_overrides")), None)
        if chains:
            row(f"16 chains ≤ {t['chains16']}× predict's default", size, chains.get("ratio_to_one_chain"),
                t["chains16"])
        joint = next((r for r in ok if r["kind"] == "train_joint" and r.get("preset_default")), None)
        if joint:
            row(f"preset diffusion-phase training step ≤ {t['train']}× plain {QUICK_REFERENCE} training step", size,
                joint["ratio_to_classifier"], t["train"])
        for r in (r for r in ok if r["kind"] == "train_joint" and r.get("extra_overrides")):
            row(f"the same with {' '.join(r['extra_overrides'])} ≤ {t['train']}× plain {QUICK_REFERENCE} training step",
                size, r["ratio_to_classifier"], t["train"])
    return rows


def targets(results: list[dict[str, Any]], default_steps: int) -> list[dict[str, Any]]:
    """The goals of docs original-speed.md, evaluated on the measured numbers."""
    rows = []
    t = TARGETS

    def find(kind: str, size: int, **kw: Any) -> dict[str, Any] | None:
        return next((r for r in results if r["kind"] == kind and r["size"] == size and "ms_per_img" in r
                     and all(r.get(k) == v for k, v in kw.items())), None)

    for size in sorted({r["size"] for r in results}):
        default = find("infer_diffmic", size, steps=default_steps, samples=1)
        if default and default["ratio_to_classifier"] is not None:
            v = default["ratio_to_classifier"]
            rows.append({"target": f"DiffMIC inference, default sampler (ddim {default_steps} steps, 1 sample) "
                         f"≤ {t['infer_ratio']}× plain classifier", "size": size, "measured": f"{v:.2f}×",
                         "status": "met" if v <= t["infer_ratio"] else "not met"})
        shared = find("infer_shared", size)
        if shared and shared["ratio_to_classifier"] is not None:
            v = shared["ratio_to_classifier"]
            rows.append({"target": f"shared-encoder option ≤ {t['shared_ratio']}× plain classifier", "size": size,
                         "measured": f"{v:.2f}×", "status": "met" if v <= t["shared_ratio"] else "not met"})
        refs = sorted((r for r in results if r["kind"] == "infer_recompute" and r["size"] == size
                       and "ms_per_img" in r), key=lambda r: r["steps"])
        if default and refs:
            speed = {r["steps"]: r["ms_per_img"] / default["ms_per_img"] for r in refs}
            measured = ", ".join(f"{s:.1f}× vs {k} steps" for k, s in speed.items())
            upto = [k for k in speed if k <= t["original_steps"]]
            k = max(upto) if upto else None
            if k == t["original_steps"]:
                status = "met" if speed[k] >= t["recompute_speedup"] else "not met"
            elif k is not None and speed[k] >= t["recompute_speedup"]:
                status = f"met (already at {k} steps; the {t['original_steps']}-step chain is slower still)"
            else:
                status = f"not shown: the {t['original_steps']}-step reference was not run (--full)"
            rows.append({"target": f"≥ {t['recompute_speedup']:.0f}× faster than the original chain (encoder "
                         f"recomputed every step, {t['original_steps']} steps for ISIC)", "size": size,
                         "measured": measured, "status": status})
        joint = find("train_joint", size)
        if joint and joint["ratio_to_classifier"] is not None:
            v = joint["ratio_to_classifier"]
            rows.append({"target": f"joint training step ≤ {t['train_ratio']}× plain classifier step", "size": size,
                         "measured": f"{v:.2f}×", "status": "met" if v <= t["train_ratio"] else "not met"})
        if size >= 224:
            if default:
                v = default["ms_per_img"]
                rows.append({"target": f"inference ≤ {t['infer_ms_224']:.0f} ms/img at 224 (ISIC config; absolute, "
                             "the 2-core reference CPU)", "size": size, "measured": f"{v:.1f} ms",
                             "status": "met" if v <= t["infer_ms_224"] else "not met"})
            if joint:
                v = joint["ms_per_img"]
                rows.append({"target": f"training ≤ {t['train_ms_224']:.0f} ms/img at 224 (absolute, the 2-core "
                             "reference CPU)", "size": size, "measured": f"{v:.1f} ms",
                             "status": "met" if v <= t["train_ms_224"] else "not met"})
    return rows


def markdown(result: dict[str, Any]) -> str:
    info, s = result["run"], result["settings"]
    commit = common.commit_label(info)
    lines = [
        "## Speed: inference and training on CPU",
        "",
        (f"Command: `{info['command']}` · {commit} · {info['cpu_count']} CPUs, {info['torch_threads']} torch "
        f"threads · {info['started']} · wall {result['wall_seconds']:.0f} s"),
        "",
        (f"Random weights, {NUM_CLASSES} classes; median of up to {s['repeats']} timed batches after {s['warmup']} "
        f"warm-up call(s) (fewer for cases slower than {s['max_case_seconds']:.0f} s in total; see the JSON). "
        f"Backbone `{s['backbone']}` for the DCG (global branch + local branch on K crops), the denoiser encoder "
        f"and the plain classifier; small stem at ≤ 64 px. Denoiser width: {s['feature_dim_note']}. "
        f"Ratios: to the plain classifier of the same size in this run (inference cases to its inference, "
        f"training steps to its training step). Memory: {result['memory_method']}."),
    ]
    for size in s["sizes"]:
        rows = [r for r in result["results"] if r["size"] == size]
        if not rows:
            continue
        lines += ["", f"### {size}×{size} (batch {rows[0]['batch']})", "",
                  "| case | ms/img | img/s | × plain classifier | peak RSS MB |", "|---|---|---|---|---|"]
        for r in rows:
            if "ms_per_img" not in r:
                lines.append(f"| {r['name']} | error: {r.get('error', '?').strip().splitlines()[-1][:100]} | | | |")
                continue
            ratio = "–" if r["ratio_to_classifier"] is None else f"{r['ratio_to_classifier']:.2f}×"
            mem = r.get("peak_rss_mb")
            lines.append(f"| {r['name']} | {r['ms_per_img']:.2f} | {r['img_per_s']:.1f} | {ratio} | "
                         f"{'–' if mem is None else f'{mem:.0f}'} |")
        skipped = [q for q in result["skipped"] if q["size"] == size]
        if skipped:
            lines += ["", "Not run: " + "; ".join(f"{q['name']} ({q['reason']})" for q in skipped) + "."]
    if result["targets"]:
        lines += ["", "### Targets (docs original-speed.md) and where we stand", "",
                  "Computed from the measurements above by `benchmarks/speed.py`.", "",
                  "| target | size | measured | status |", "|---|---|---|---|"]
        lines += [f"| {r['target']} | {r['size']} | {r['measured']} | {r['status']} |" for r in result["targets"]]
    return "\n".join(lines) + "\n"


def quick_section_suffix(threads: int) -> tuple[str, str]:
    """(docs section suffix, title suffix) of a --quick run: the 2-thread run is the `speed-quick`
    section, a run at another thread count gets a section of its own, so the two stand side by side."""
    return ("", "") if threads == 2 else (f"-{threads}thread", f", {threads} torch thread{'s' * (threads != 1)}")


def markdown_quick(result: dict[str, Any]) -> str:
    info, s = result["run"], result["settings"]
    suffix = quick_section_suffix(info["torch_threads"])[1]
    lines = [
        f"## Speed of the shipped presets (`benchmarks/speed.py --quick`{suffix})",
        "",
        (f"Command: `{info['command']}` · {common.commit_label(info)} · {info['cpu_count']} CPUs, "
         f"{info['torch_threads']} torch threads · {info['started']} · wall {result['wall_seconds']:.0f} s"),
        "",
        (f"Random weights. 28 px: `configs/retinamnist.yaml` (5 classes); 224 px: `configs/isic2018.yaml` "
         f"(7 classes); denoiser width {s['feature_dim_note']}. Median of up to {s['repeats']} timed batches "
         f"after {s['warmup']} warm-up call(s). Inference cases call `DiffMIC.predict_details` on a batch of "
         f"images in [0, 1] (what `diffmic predict` calls in batches of --batch-size, without decoding; the "
         f"end-to-end figure is the predict-folder section). **Bold**: the preset cases marked `preset_default` "
         f"in the JSON. Ratios: to the "
         f"plain {s['quick_reference']} classifier of the same size and run (inference to its inference, training "
         f"step to its step), to a plain classifier of the preset's DCG backbone, and to predict's default "
         f"(the bold inference row). `model.share_encoder=true` rows show what that accuracy-dependent "
         f"switch would buy; the preset configs do not set it."),
    ]
    for size in s["sizes"]:
        rows = [r for r in result["results"] if r["size"] == size]
        lines += ["", f"### {size}×{size}", "",
                  ("| case | batch | ms/img | img/s | × plain classifier | × own-backbone classifier "
                   "| × predict's default |"),
                  "|---|---|---|---|---|---|---|"]

        def f(v: Any) -> str:
            return "–" if v is None else f"{v:.2f}×"

        for r in rows:
            name = f"**{r['name']}**" if r.get("preset_default") else r["name"]
            if "ms_per_img" not in r:
                lines.append(f"| {name} | {r['batch']} | error: "
                             f"{r.get('error', '?').strip().splitlines()[-1][:100]} | | | | |")
                continue
            lines.append(f"| {name} | {r['batch']} | {r['ms_per_img']:.2f} | {r['img_per_s']:.1f} | "
                         f"{f(r['ratio_to_classifier'])} | {f(r.get('ratio_to_backbone_classifier'))} | "
                         f"{f(r.get('ratio_to_one_chain'))} |")
    if result["targets"]:
        lines += ["", "### Targets of issue 12", "", "| target | size | measured | status |", "|---|---|---|---|"]
        lines += [f"| {r['target']} | {r['size']} | {r['measured']} | {r['status']} |" for r in result["targets"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    for name, default, quick in (("warmup", 2, 1), ("repeats", 5, 3), ("max_case_seconds", 60.0, 25.0)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    threads = common.set_threads(args.threads)
    if args.worker:
        return worker(json.loads(args.worker))
    from diffmic.config import DiffMICConfig

    started = time.perf_counter()
    info = common.run_info("benchmarks/speed.py", argv)
    base = DiffMICConfig.from_yaml(args.config, args.overrides)
    default_steps = base.diffusion.sampling_steps
    if args.quick:
        cases, skipped = plan_quick(args), []
        args.sizes = sorted({c["size"] for c in cases})
    else:
        cases, skipped = plan(args, default_steps, base.diffusion.timesteps, args.backbone or base.model.backbone)
    common_spec = {"config": str(args.config), "overrides": args.overrides, "backbone": args.backbone,
                   "feature_dim": args.feature_dim, "warmup": max(1, args.warmup), "repeats": max(1, args.repeats),
                   "max_case_seconds": args.max_case_seconds}
    baseline_rss = None
    if args.in_process:
        memory = ("cumulative peak RSS of the benchmark process after the case (ru_maxrss; monotone, an "
                  "upper bound per case, not per-case memory)")
    else:
        baseline_rss = in_subprocess(common_spec | {"kind": "baseline", "size": 0}, threads).get("peak_rss_mb")
        memory = (f"peak RSS (ru_maxrss) of a fresh subprocess per case; a subprocess that only imports "
                  f"torch, timm, lightning and diffmic peaks at {baseline_rss} MB")
    results = []
    for case in cases:
        spec = common_spec | case
        tic = time.perf_counter()
        if args.in_process:
            try:
                out = run_case(spec)
            except Exception:  # noqa: BLE001 - recorded in the results, the run goes on
                out = {"error": traceback.format_exc()}
            out["peak_rss_mb"] = round(maxrss_mb(), 1)
        else:
            out = in_subprocess(spec, threads)
        r = case | out | {"wall_seconds": round(time.perf_counter() - tic, 1)}
        results.append(r)
        what = f"{r['ms_per_img']:.2f} ms/img" if "ms_per_img" in r else "FAILED"
        print(f"[speed] {case['size']}px {case['name']}: {what}", flush=True)
    add_ratios(results)
    fd = args.feature_dim
    if args.quick:
        note = f"{fd} at every size" if fd else "the preset's (retinamnist 512, isic2018 6144)"
    else:
        note = (f"{fd} at every size" if fd else f"{base.model.feature_dim} (config) at ≤ 64 px, "
                f"{FAITHFUL_224_FEATURE_DIM} (ISIC-like, as the original) above")
    result = {
        "benchmark": "speed",
        "run": info | {"torch_threads": threads},
        "settings": {
            "config": str(args.config), "overrides": args.overrides, "sizes": args.sizes, "steps": args.steps,
            "ref_steps": args.ref_steps or ([10, 50, 250] if args.full else [10, 50]), "samples": args.samples,
            "full": args.full, "warmup": max(1, args.warmup), "repeats": max(1, args.repeats),
            "max_case_seconds": args.max_case_seconds, "default_sampling_steps": default_steps,
            "backbone": args.backbone or base.model.backbone, "num_classes": NUM_CLASSES,
            "feature_dim_note": note, "quick": args.quick, "quick_reference": args.backbone or QUICK_REFERENCE,
            "presets": {str(k): str(v) for k, v in QUICK_PRESETS.items()} if args.quick else None,
            "resolved_config": base.to_dict(),
        },
        "memory_method": memory,
        "baseline_rss_mb": baseline_rss,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "results": results,
        "skipped": skipped,
    }
    result["targets"] = quick_targets(results) if args.quick else targets(results, default_steps)
    out_path = args.out or common.RESULTS / f"speed-{'quick-' if args.quick else ''}{common.timestamp()}.json"
    if args.quick:
        common.publish("speed", out_path, result, None if args.no_docs else args.docs, markdown_quick,
                       section="speed-quick" + quick_section_suffix(result["run"]["torch_threads"])[0])
    else:
        common.publish("speed", out_path, result, None if args.no_docs else args.docs, markdown)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
