"""Where the time goes: torch.profiler per module of DiffMIC inference and of the diffusion-phase training step.

Random weights (speed only). For each size the shipped preset (28 px: ``configs/retinamnist.yaml``,
224 px: ``configs/isic2018.yaml``) is built and run under ``torch.profiler`` with one labelled region
per part: the DCG's global backbone, the ROI retrieval (saliency, greedy windows, crop gather), the
local backbone on the K crops, the MIL head, the denoiser's image encoder, every denoiser MLP call
and the rest of the sampler; the training step adds the backward passes, the optimiser steps and
the EMA update. A plain classifier (the DCG's global backbone with a linear head) is the reference.
Times are the profiler's inclusive CPU times of each label, summed over the timed calls and divided
by the number of images; shares are of the whole call. Relative shares stay informative on a busy
machine; absolute times do not.

    python benchmarks/profile_modules.py --threads 1 --sizes 28 224 --out prof.json --md prof.md
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common

PRESETS = {28: common.REPO / "configs" / "retinamnist.yaml", 224: common.REPO / "configs" / "isic2018.yaml"}
NUM_CLASSES = {28: 5, 224: 7}
ROI_FUNCS = ("saliency_map", "greedy_max_windows", "cells_to_pixels", "crop_batch")
INFER_LABELS = ("dcg", "dcg.global", "dcg.roi", "dcg.local", "dcg.mil", "encoder", "mlp", "sampler")
TRAIN_LABELS = ("dcg.prior_nograd", "encoder", "mlp", "loss", "backward.diffusion", "clip", "opt.denoiser",
                "ema", "dcg.step", "dcg.step.forward", "backward.dcg", "opt.dcg", "augment")


_PATCHED: list[tuple[Any, str, Any]] = []  # module-level functions replaced while profiling, restored by main


def _patch(module: Any, name: str, label: str) -> None:
    original = getattr(module, name)
    _PATCHED.append((module, name, original))
    setattr(module, name, _label(original, label))


def _label(fn: Any, name: str) -> Any:
    @functools.wraps(fn)
    def wrapped(*a: Any, **k: Any) -> Any:
        with record_function(name):
            return fn(*a, **k)
    return wrapped


def instrument(model: Any) -> None:
    """Label the parts of a DiffMIC (instance attributes shadow the methods; nothing else changes)."""
    import diffmic.models.guidance as guidance_mod

    g = model.guidance
    g.forward = _label(g.forward, "dcg")
    g.global_net.forward = _label(g.global_net.forward, "dcg.global")
    g.local_net.forward = _label(g.local_net.forward, "dcg.local")
    g.mil.forward = _label(g.mil.forward, "dcg.mil")
    if not any(m is guidance_mod for m, _, _ in _PATCHED):
        for name in ROI_FUNCS:
            _patch(guidance_mod, name, "dcg.roi")
    model.encode = _label(model.encode, "encoder")
    model.denoiser.denoise = _label(model.denoiser.denoise, "mlp")
    model.run_chains = _label(model.run_chains, "sampler")


def build(size: int, overrides: list[str], backbone: str | None) -> tuple[Any, Any]:
    from diffmic.config import DiffMICConfig

    ov = [f"data.image_size={size}", *overrides]
    if backbone:
        ov += [f"model.backbone={backbone}", f"model.denoiser_backbone={backbone}"]
    cfg = DiffMICConfig.from_yaml(PRESETS[size], ov + ["train.dcg_pretrain_epochs=1", "train.epochs=10"])
    return cfg, {"num_classes": NUM_CLASSES[size], "in_chans": 3, "image_size": size}


def summarise(prof: Any, labels: tuple[str, ...], n_images: int, top: int = 12) -> dict[str, Any]:
    events = prof.key_averages()
    by_key = {e.key: e for e in events}
    total = by_key["total"].cpu_time_total
    parts = {}
    for name in labels:
        e = by_key.get(name)
        if e is not None:
            parts[name] = {"ms_per_img": e.cpu_time_total / 1000 / n_images, "share": e.cpu_time_total / total,
                           "calls": e.count}
    ops = sorted((e for e in events if not e.key.startswith(("dcg", "encoder", "mlp", "sampler", "total", "opt",
                                                             "backward", "ema", "clip", "loss", "augment",
                                                             "classifier", "ProfilerStep"))),
                 key=lambda e: -e.self_cpu_time_total)[:top]
    return {"total_ms_per_img": total / 1000 / n_images, "parts": parts,
            "top_ops": [{"op": e.key, "self_ms_per_img": e.self_cpu_time_total / 1000 / n_images,
                         "share": e.self_cpu_time_total / total, "calls": e.count} for e in ops]}


def run_profiled(fn: Any, warmup: int, repeats: int) -> Any:
    for _ in range(warmup):
        fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(repeats):
            with record_function("total"):
                fn()
    return prof


def profile_inference(size: int, batch: int, samples: int, args: argparse.Namespace) -> dict[str, Any]:
    from diffmic.models.factory import build_model

    cfg, margs = build(size, args.overrides, args.backbone)
    torch.manual_seed(0)
    model = build_model(cfg, **margs).eval()
    instrument(model)
    x = model.normalize(torch.rand(batch, 3, size, size))
    gen = torch.Generator().manual_seed(0)

    def fn() -> Any:
        with torch.inference_mode():
            return model(x, samples=samples, generator=gen)

    prof = run_profiled(fn, args.warmup, args.repeats)
    out = summarise(prof, INFER_LABELS, batch * args.repeats)
    return out | {"case": f"inference, readout {model.readout}, samples {samples}", "size": size, "batch": batch,
                  "feature_dim": cfg.model.feature_dim, "backbone": cfg.model.backbone,
                  "denoiser_backbone": cfg.model.denoiser_backbone, "share_encoder": cfg.model.share_encoder,
                  "steps": model.sampling_steps, "readout": model.readout, "samples": samples}


def profile_classifier(size: int, batch: int, train: bool, args: argparse.Namespace) -> dict[str, Any]:
    from diffmic.training.baseline import ClassifierModule

    cfg, margs = build(size, args.overrides, args.backbone)
    cm = ClassifierModule(cfg.to_dict(), margs, epochs=1)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    y = torch.randint(0, margs["num_classes"], (batch,))
    if train:
        cm.train()
        opt = torch.optim.Adam(cm.parameters(), lr=1e-3)

        def fn() -> Any:
            with record_function("classifier"):
                loss = F.cross_entropy(cm(cm.inputs(images, train=True)), y)
            with record_function("backward"):
                opt.zero_grad(set_to_none=True)
                loss.backward()
            with record_function("opt"):
                opt.step()
        labels: tuple[str, ...] = ("classifier", "backward", "opt")
    else:
        cm.eval()
        x = cm.inputs(images, train=False)

        def fn() -> Any:
            with torch.inference_mode(), record_function("classifier"):
                return cm(x)
        labels = ("classifier",)
    prof = run_profiled(fn, args.warmup, args.repeats)
    return summarise(prof, labels, batch * args.repeats) | {
        "case": f"plain {cfg.model.backbone} classifier, {'training step' if train else 'inference'}",
        "size": size, "batch": batch}


def profile_training(size: int, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import speed

    import diffmic.training.module as module_mod

    cfg, margs = build(size, args.overrides, args.backbone)
    torch.manual_seed(0)
    module = speed.training_module(cfg, margs | {"num_classes": margs["num_classes"]})
    model = module.model
    # label the parts; the DCG forward under no_grad (the priors) vs in the DCG step
    in_dcg_step = {"on": False}
    dcg_step = _label(module._dcg_step, "dcg.step")

    def flagged_dcg_step(*a: Any, **k: Any) -> Any:
        in_dcg_step["on"] = True
        try:
            return dcg_step(*a, **k)
        finally:
            in_dcg_step["on"] = False
    module._dcg_step = flagged_dcg_step
    g = model.guidance
    g_forward = g.forward

    def guidance_forward(x: Any) -> Any:
        name = "dcg.prior_nograd" if not torch.is_grad_enabled() else "dcg.step.forward"
        with record_function(name):
            return g_forward(x)
    g.forward = guidance_forward
    model.encode = _label(model.encode, "encoder")
    model.denoiser.denoise = _label(model.denoiser.denoise, "mlp")
    _patch(module_mod, "diffmic_loss", "loss")
    _patch(module_mod, "augment_batch", "augment")
    opt_d, opt_g = module.optimizers()
    opt_d.step = _label(opt_d.step, "opt.denoiser")
    opt_g.step = _label(opt_g.step, "opt.dcg")
    module.ema.update = _label(module.ema.update, "ema")

    def backward(loss: Any, *a: Any, **k: Any) -> None:  # labelled by whether the DCG step is running
        with record_function("backward.dcg" if in_dcg_step["on"] else "backward.diffusion"):
            loss.backward()
    module.manual_backward = backward  # type: ignore[method-assign]
    clip = module.clip_gradients
    module.clip_gradients = _label(clip, "clip")  # type: ignore[method-assign]
    module._trainer = SimpleNamespace(current_epoch=cfg.train.dcg_pretrain_epochs, num_training_batches=100)
    module.train()
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    y = torch.randint(0, margs["num_classes"], (batch,))

    def fn() -> Any:
        return module.training_step((images, y), 10)

    prof = run_profiled(fn, args.warmup, args.repeats)
    return summarise(prof, TRAIN_LABELS, batch * args.repeats) | {
        "case": "diffusion-phase training step (DiffMICModule.training_step, DCG "
                + ("trained jointly)" if cfg.train.joint_train else "frozen)"), "size": size, "batch": batch,
        "feature_dim": cfg.model.feature_dim, "noise_draws": cfg.train.noise_draws,
        "denoiser_params": sum(p.numel() for p in model.denoiser.parameters())}


def markdown(result: dict[str, Any]) -> str:
    lines = [(f"Command: `{result['run']['command']}` · {common.commit_label(result['run'])} · "
              f"{result['run']['torch_threads']} torch thread(s) · {result['run']['started']}"), ""]
    for case in result["cases"]:
        lines += [f"#### {case['size']} px: {case['case']} (batch {case['batch']})", "",
                  f"total {case['total_ms_per_img']:.2f} ms/img (profiled)", "",
                  "| part | ms/img | share | calls |", "|---|---|---|---|"]
        for name, p in case["parts"].items():
            lines.append(f"| {name} | {p['ms_per_img']:.2f} | {100 * p['share']:.1f}% | {p['calls']} |")
        lines += ["", "Top ops by self time: " + ", ".join(
            f"`{o['op']}` {100 * o['share']:.0f}%" for o in case["top_ops"][:6]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[28, 224], choices=sorted(PRESETS))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--backbone", help="override every backbone (e.g. test_resnet for a smoke run)")
    p.add_argument("--batch", type=int, help="batch (default 64 at 28 px, 8 at 224 px)")
    p.add_argument("--samples", nargs="+", type=int, default=[1, 16])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--md", type=Path)
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    info = common.run_info("benchmarks/profile_modules.py", argv)
    cases = []
    try:
        for size in args.sizes:
            batch = args.batch or (64 if size <= 64 else 8)
            tic = time.perf_counter()
            cases.append(profile_classifier(size, batch, False, args))
            for s in args.samples:
                cases.append(profile_inference(size, batch, s, args))
            if not args.no_train:
                cases.append(profile_classifier(size, batch, True, args))
                cases.append(profile_training(size, batch, args))
            print(f"[profile] {size} px done in {time.perf_counter() - tic:.0f} s", flush=True)
    finally:
        while _PATCHED:
            module, name, original = _PATCHED.pop()
            setattr(module, name, original)
    result = {"benchmark": "profile_modules", "run": info, "cases": cases}
    common.write_json(args.out, result)
    if args.md:
        args.md.write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
