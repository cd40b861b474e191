"""``diffmic`` command line: a thin shell over the Python API.

Every user error ends in one line on stderr (``diffmic: error: ...``) and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from diffmic import __version__
from diffmic._io import atomic_write, atomic_write_text, check_output_file
from diffmic.errors import ConfigError, DataError, DiffMICError

DEFAULT_DATA = Path("..") / "shared" / "data" / "retinamnist.npz"  # relative to the working folder

EXAMPLES = {
    "train": "examples:\n  diffmic train --config configs/retinamnist.yaml --set train.epochs=20\n"
             "  diffmic train --resume runs/retinamnist-20261126-101500   # continue a killed run",
    "evaluate": "examples:\n  diffmic evaluate --checkpoint runs/retinamnist/model.pt --split test --out test.json\n"
                "  diffmic evaluate --checkpoint runs/retinamnist/model.pt --calibrate --out test.json "
                "--plots figures/\n"
                "  diffmic evaluate --checkpoint runs/retinamnist/model.pt --out test.json --medmnist-csv results/",
    "report": "example:\n  diffmic report runs/retinamnist --out retinamnist-report.html",
    "predict": "example:\n  diffmic predict --checkpoint runs/retinamnist/model.pt img1.png img2.jpg --out preds.csv",
    "explain": "example:\n  diffmic explain --checkpoint runs/retinamnist/model.pt img1.png img2.jpg --out explain/",
    "config": "example:\n  diffmic config --config configs/retinamnist.yaml --set train.epochs=5",
    "export": "example:\n  diffmic export --checkpoint runs/retinamnist/model.pt --format onnx --out model.onnx "
              "--samples 8 --steps 10\n(see docs/export.md for the graph's inputs and outputs)",
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``diffmic: error: ...``) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"diffmic: error: {self.prog}: {message} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="diffmic",
        description="DiffMIC: dual-guidance diffusion for medical image classification.",
        epilog="run 'diffmic COMMAND --help' for the options of a command",
    )
    p.add_argument("--version", action="version", version=f"diffmic {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    def config_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", type=Path, help="YAML config file (see configs/)")
        q.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value; repeatable")
        q.add_argument("--data", help="dataset path (shortcut for --set data.path=...)")

    t = add("train", "Train DiffMIC (DCG pre-training, joint diffusion training), select on "
                     "validation, evaluate on test.")
    config_args(t)
    t.add_argument("--out", help="output folder (shortcut for --set train.out_dir=...)")
    t.add_argument("--name", help="run name (shortcut for --set train.run_name=...)")
    t.add_argument("--resume", metavar="RUN_DIR|auto",
                   help="continue a killed run from its last checkpoint, with the run's own config; "
                        "'auto' picks the newest unfinished run of --config/--set (or starts a new one)")

    e = add("evaluate", "Evaluate a checkpoint on a dataset split (DCG prior and diffusion output).")
    e.add_argument("--checkpoint", required=True, type=Path, help="model.pt or a Lightning .ckpt")
    e.add_argument("--data", help="dataset path (default: the one stored in the checkpoint)")
    e.add_argument("--format", help="dataset format if different from the checkpoint's")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--samples", type=int, default=None, help="reverse chains per image")
    e.add_argument("--sampler", choices=["ddim", "ancestral", "truncated"], default=None)
    e.add_argument("--steps", type=int, default=None, help="sampling steps (denoiser calls)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", type=Path, help="write the JSON report here (default: stdout)")
    e.add_argument("--plots", type=Path, metavar="DIR",
                   help="also write reliability.png (before/after temperature scaling with --calibrate), "
                        "coverage.png (accuracy vs coverage) and confusion.png into DIR")
    e.add_argument("--calibrate", action="store_true",
                   help="fit a temperature on the val split and add an 'uncertainty' section: ECE before/after "
                        "temperature scaling, AURC, accuracy at 100/90/80/70/50%% coverage")
    e.add_argument("--medmnist-csv", type=Path, metavar="DIR",
                   help="also write the official MedMNIST result file {flag}_{split}_[AUC]..._[ACC]...@{run}.csv "
                        "into DIR (MedMNIST data only) and, with medmnist installed, its Evaluator's ACC/AUC")

    pr = add("predict", "Predict class probabilities for image files (PNG/JPEG/...).")
    pr.add_argument("--checkpoint", required=True, type=Path, help="model.pt or a Lightning .ckpt")
    pr.add_argument("images", nargs="+", type=Path, help="image files")
    pr.add_argument("--samples", type=int, default=1, help="reverse chains per image")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--out", type=Path, help="write a CSV here (default: stdout)")

    x = add("explain", "Save a figure per image: ROI crops with attention weights, the predicted class's "
                       "saliency map, and DCG prior vs diffusion probabilities.")
    x.add_argument("--checkpoint", required=True, type=Path, help="model.pt or a Lightning .ckpt")
    x.add_argument("images", nargs="+", type=Path, help="image files")
    x.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="output folder for <stem>_explain.png (created if its parent exists)")
    x.add_argument("--samples", type=int, default=1, help="reverse chains per image")
    x.add_argument("--seed", type=int, default=0)

    r = add("report", "Write one self-contained HTML report of a training run (metrics, calibration, "
                      "accuracy-coverage, training curves, ROI examples, model card).")
    r.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run folder (with model.pt)")
    r.add_argument("--out", type=Path, help="the HTML file (default: RUN_DIR/report.html)")
    r.add_argument("--samples", type=int, default=None, help="reverse chains per image (default: the run's)")
    r.add_argument("--seed", type=int, default=0)

    c = add("config", "Print the resolved configuration as YAML.")
    config_args(c)

    xp = add("export", "Export the inference graph (normalisation, DCG with ROI crops, image encoder, "
                       "fixed-step DDIM with eta=0) to ONNX; the starting noise is a graph input.")
    xp.add_argument("--checkpoint", required=True, type=Path, help="model.pt or a Lightning .ckpt")
    xp.add_argument("--format", default="onnx", help="export format (only onnx is supported)")
    xp.add_argument("--out", required=True, type=Path, metavar="FILE", help="the file to write (e.g. model.onnx)")
    xp.add_argument("--samples", type=int, default=1, help="reverse chains per image, fixed in the graph")
    xp.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the checkpoint's sampling_steps)")
    xp.add_argument("--batch-size", type=int, default=None,
                    help="fix the batch size (default: dynamic batch axis)")
    return p


def _load_cfg(args: argparse.Namespace, extra: list[str] | None = None):
    from diffmic.config import DiffMICConfig

    overrides = list(args.overrides)
    if getattr(args, "data", None):
        overrides.append(f"data.path={args.data}")
    overrides += extra or []
    return DiffMICConfig.from_yaml(args.config, overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    from diffmic.training.api import find_resumable_run, resume, train

    if args.resume and args.resume != "auto":
        if args.config or args.overrides or args.data or args.out or args.name:
            raise ConfigError("--resume RUN_DIR uses the run's own config.yaml; drop --config/--set/--data/--out/--name")
        return _report_run(resume(Path(args.resume)))
    extra = []
    if args.out:
        extra.append(f"train.out_dir={args.out}")
    if args.name:
        extra.append(f"train.run_name={args.name}")
    cfg = _load_cfg(args, extra)
    if not cfg.data.path:
        if DEFAULT_DATA.is_file():
            cfg.data.path = str(DEFAULT_DATA)
        else:
            raise ConfigError("no dataset given: use --data PATH (or data.path in the config)")
    if args.resume == "auto":
        run_dir = find_resumable_run(cfg)
        if run_dir is not None:
            print(f"resuming {run_dir}")
            return _report_run(resume(run_dir))
        print("no unfinished run to resume: starting a new one")
    return _report_run(train(cfg))


def _report_run(result) -> int:
    if not result.metrics:  # not the main process of a multi-process run
        return 0
    test = result.metrics["test"]
    print(f"run folder: {result.run_dir}")
    print(f"selected epoch ({result.metrics['select_metric']}): {result.metrics['selected_epoch']}")
    _print_table(test["guidance"], test["diffusion"], "test")
    return 0


def _print_table(guidance: dict, diffusion: dict, split: str) -> None:
    keys = ["acc", "balanced_acc", "f1", "qwk", "auroc", "ece"]
    print(f"{split:<10}" + "".join(f"{k:>13}" for k in keys))
    for name, m in (("DCG", guidance), ("DiffMIC", diffusion)):
        print(f"{name:<10}" + "".join(f"{m[k]:>13.4f}" for k in keys))


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from diffmic.config import DiffMICConfig
    from diffmic.data.registry import build_data
    from diffmic.evaluation.report import build_report, predict_split
    from diffmic.models.diffmic import DiffMIC

    _check_samples(args)
    if args.out:
        _check_writable(args.out)
    if args.plots:
        _prepare_out_dir(args.plots)
    model = DiffMIC.from_checkpoint(args.checkpoint)
    cfg = DiffMICConfig.from_dict(model.config)
    data_cfg = cfg.data
    if args.data:
        data_cfg.path = args.data
    if args.format:
        data_cfg.format = args.format
    data_cfg.image_size = model.image_size
    data_cfg.channels = model.in_chans
    if args.data:
        data_cfg.class_names = None  # another dataset: take its own class count and names
    elif data_cfg.split_file is None:  # the split the run was trained on (run/model.pt, run/checkpoints/x.ckpt)
        for folder in (args.checkpoint.parent, args.checkpoint.parent.parent):
            if (folder / "split.json").is_file() and (folder / "config.yaml").is_file():
                data_cfg.split_file = str(folder / "split.json")
                break
    data = build_data(data_cfg)
    split = data.split(args.split)
    if len(split) == 0:
        raise DataError(f"{data.source}: the {args.split} split is empty")
    if data.num_classes > model.num_classes:
        raise DataError(
            f"{data.source} has {data.num_classes} classes but the checkpoint predicts {model.num_classes}"
        )
    if args.medmnist_csv:  # before predicting: a MedMNIST dataset and a writable folder
        from diffmic.evaluation.medmnist_format import prepare_folder, result_flag
        result_flag(data), prepare_folder(args.medmnist_csv)
    calibrate_on = None
    if args.calibrate:
        calibrate_on = data.val
        if len(calibrate_on) == 0:
            raise DataError(f"{data.source}: the val split is empty; --calibrate fits the temperature on it")
        if args.split == "val":
            print("diffmic: note: --calibrate fits the temperature on the split it evaluates (val); "
                  "the calibrated ECE is optimistic", file=sys.stderr)
    settings = {"batch_size": cfg.data.eval_batch_size, "samples": args.samples or cfg.eval.samples,
                "seed": args.seed, "sampler": args.sampler, "num_steps": args.steps}
    probs, priors, labels = predict_split(model, split, **settings)
    calibration = None
    if calibrate_on is not None:
        val_probs, _, val_labels = predict_split(model, calibrate_on, **settings)
        calibration = (val_probs, val_labels)
    report = build_report(
        probs, priors, labels, model.class_names, split=args.split, calibration=calibration,
        settings={"samples": settings["samples"], "seed": args.seed, "sampler": args.sampler or model.sampler,
                  "sampling_steps": args.steps or model.sampling_steps, "temperature": model.temperature},
    )
    if args.plots:
        _write_eval_plots(args.plots, report, probs, priors, labels, model.class_names)
    if args.medmnist_csv:  # the official MedMNIST result file; medmnist.Evaluator's ACC/AUC next to ours
        from diffmic.evaluation.medmnist_format import write_medmnist_result
        print(write_medmnist_result(args.medmnist_csv, probs, data, args.split, ours=report.diffusion,
                                    checkpoint=args.checkpoint).summary(), file=sys.stdout if args.out else sys.stderr)
    if args.out:
        _check_writable(args.out)
        report.to_json(args.out)
        _print_table(report.guidance, report.diffusion, args.split)
        if report.uncertainty is not None:
            u = report.uncertainty
            print(f"temperature scaling (T = {u['fitted_temperature']:.4g}, fitted on val): "
                  f"ECE {u['ece']:.4f} -> {u['ece_calibrated']:.4f}; AURC {u['aurc']:.4f}")
        print(f"report written to {args.out}")
    else:
        print(report.to_json())
    return 0


def _write_eval_plots(folder: Path, report, probs, priors, labels, class_names) -> None:
    from diffmic.evaluation.calibration import apply_temperature
    from diffmic.evaluation.plots import (
        plot_accuracy_coverage,
        plot_confusion_matrix,
        plot_reliability,
    )

    u = report.uncertainty
    calibrated = apply_temperature(probs, u["fitted_temperature"]) if u else None
    figures = {
        "reliability.png": plot_reliability(probs, labels, calibrated,
                                            temperature=u["fitted_temperature"] if u else None),
        "coverage.png": plot_accuracy_coverage({"DiffMIC (diffusion)": probs, "DCG prior": priors}, labels),
        "confusion.png": plot_confusion_matrix(report.confusion_matrix, class_names),
    }
    for name, fig in figures.items():
        atomic_write(folder / name, lambda f, fig=fig: fig.savefig(f, format="png"))
    print(f"figures written to {folder}: {', '.join(figures)}")


def _read_image_file(path: Path):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image ({type(exc).__name__})") from None


def _cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from diffmic.models.diffmic import DiffMIC

    if args.samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {args.samples}")
    model = DiffMIC.from_checkpoint(args.checkpoint)
    if args.out:
        _check_writable(args.out)
    images = [_read_image_file(p) for p in args.images]
    gen = torch.Generator().manual_seed(args.seed)
    # Nothing is written before every image has been predicted; a bad image names its file.
    details = [_named(path, model.predict_details, im, samples=args.samples, generator=gen)
               for path, im in zip(args.images, images, strict=True)]
    cols = {k: torch.cat([d[k] for d in details]).tolist()
            for k in ("probs", "entropy", "votes", "interval_low", "interval_high")}
    names = model.class_names
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "prediction", *[f"p_{c}" for c in names], "entropy", *[f"vote_{c}" for c in names],
                *[f"low_{c}" for c in names], *[f"high_{c}" for c in names]])
    for i, path in enumerate(args.images):
        p = cols["probs"][i]
        w.writerow([
            str(path), names[max(range(len(p)), key=p.__getitem__)], *[f"{v:.6f}" for v in p],
            f"{cols['entropy'][i]:.6f}", *[f"{v:.6f}" for v in cols["votes"][i]],
            *[f"{v:.6f}" for v in cols["interval_low"][i]], *[f"{v:.6f}" for v in cols["interval_high"][i]],
        ])
    if args.out:
        atomic_write_text(args.out, buf.getvalue())
        print(f"{len(images)} predictions written to {args.out}")
    else:
        sys.stdout.write(buf.getvalue())
    return 0


def _named(path: Path, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; an image the model cannot take (NaN pixels, unconvertible channels) names its file."""
    try:
        return fn(*args, **kwargs)
    except DiffMICError as exc:
        raise DataError(f"{path}: {exc}") from None


def _check_samples(args: argparse.Namespace) -> None:
    for name in ("samples", "steps"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{name} must be >= 1, got {value}")


def _prepare_out_dir(path: Path) -> None:
    """Create the output folder if its parent exists; one-line errors otherwise."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output path exists and is not a folder: {path}")
    if not path.is_dir():
        _check_writable(path)
        try:
            path.mkdir()
        except OSError as exc:
            raise ConfigError(f"cannot create output folder {path} ({exc.strerror or type(exc).__name__})") from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"output folder is not writable: {path}")


def _cmd_explain(args: argparse.Namespace) -> int:
    import torch

    from diffmic.models.diffmic import DiffMIC

    if args.samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {args.samples}")
    _prepare_out_dir(args.out)
    model = DiffMIC.from_checkpoint(args.checkpoint)
    images = [_read_image_file(p) for p in args.images]  # fail on a bad file before writing anything
    from diffmic.evaluation.plots import plot_explanation

    gen = torch.Generator().manual_seed(args.seed)
    for path, im in zip(args.images, images, strict=True):
        explanation = _named(path, model.explain, im, samples=args.samples, generator=gen)
        fig = plot_explanation(_display_array(im), explanation, model.class_names)
        target = args.out / f"{path.stem}_explain.png"
        atomic_write(target, lambda f, fig=fig: fig.savefig(f, format="png"))
        print(f"{target}")
    print(f"{len(images)} explanations written to {args.out}")
    return 0


def _display_array(im):
    """PIL image -> uint8 array (H, W) or (H, W, 3) for plotting."""
    import numpy as np

    if im.mode.startswith(("I", "F")):  # 16/32-bit grey: scale by the maximum
        arr = np.asarray(im).astype(np.float64)
        return (255 * np.clip(arr, 0, None) / max(1.0, float(arr.max()))).astype(np.uint8)
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
    return np.asarray(im)


def _cmd_report(args: argparse.Namespace) -> int:
    if args.samples is not None and args.samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {args.samples}")
    if not args.run_dir.is_dir():
        raise ConfigError(f"run folder not found: {args.run_dir}")
    if not (args.run_dir / "model.pt").is_file():  # checked before importing torch and matplotlib
        from diffmic.errors import CheckpointError

        raise CheckpointError(f"{args.run_dir / 'model.pt'} not found: {args.run_dir} is not a finished "
                              "diffmic run folder")
    if args.out:
        _check_writable(args.out)
    from diffmic.evaluation.html_report import write_report

    path = write_report(args.run_dir, args.out, samples=args.samples, seed=args.seed)
    print(f"report written to {path}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    print(_load_cfg(args).to_yaml(), end="")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    if args.format.lower() != "onnx":
        raise ConfigError(f"unsupported export format {args.format!r}; supported: onnx")
    for flag, value in (("--samples", args.samples), ("--steps", args.steps), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    _check_writable(args.out)  # before the (slow) checkpoint load and export
    from diffmic.export import export_onnx
    from diffmic.models.diffmic import DiffMIC

    model = DiffMIC.from_checkpoint(args.checkpoint)
    path = export_onnx(model, args.out, samples=args.samples, num_steps=args.steps, batch_size=args.batch_size)
    steps = args.steps or model.sampling_steps
    batch = "B" if args.batch_size is None else str(args.batch_size)
    size = model.image_size
    print(f"exported {path}: images ({batch}, {model.in_chans}, {size}, {size}) in [0, 1] + noise "
          f"({args.samples}, {batch}, {model.num_classes}) -> probs, prior, y0; DDIM {steps} steps, eta=0, "
          f"batch {'dynamic' if args.batch_size is None else 'fixed'}")
    return 0


def _check_writable(path: Path) -> None:
    check_output_file(path, ConfigError)


COMMANDS = {
    "train": _cmd_train,
    "evaluate": _cmd_evaluate,
    "predict": _cmd_predict,
    "explain": _cmd_explain,
    "report": _cmd_report,
    "config": _cmd_config,
    "export": _cmd_export,
}


class _StderrHandler(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record is written (tests replace it)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging() -> None:
    """diffmic's own messages: one line each on stderr, through one handler on the ``diffmic`` logger.

    The root logger is left alone on purpose. ``import lightning`` puts an ``INFO: ...`` handler on the
    ``lightning`` logger, and ``lightning.pytorch`` / ``lightning.fabric`` add their own plain handler
    (and stop propagating) only when the root logger has none. A root handler here (the former
    ``logging.basicConfig``) therefore printed every Lightning line twice: ``INFO: GPU available ...``
    and again ``GPU available ...``.
    """
    log = logging.getLogger("diffmic")
    log.setLevel(logging.INFO)
    log.propagate = False
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 error, 2 usage error, 130 interrupted)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors: already reported in one line; --help/--version: exit 0
        if exc.code in (0, None):
            raise
        return int(exc.code) if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    _configure_logging()
    if not args.debug:
        warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
        # deprecations inside the libraries (e.g. Lightning's use of torch's LeafSpec): nothing a user can act on
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(lightning|torch|timm|torchmetrics)\b")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    try:
        return COMMANDS[args.command](args)
    except DiffMICError as exc:
        if args.debug:
            raise
        print(f"diffmic: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("diffmic: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, permission denied, ... while reading or writing a file
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"diffmic: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except MemoryError:
        print("diffmic: error: out of memory (try a smaller data.batch_size)", file=sys.stderr)
        return 1
    except Exception as exc:
        if args.debug:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"diffmic: error: {type(exc).__name__}: {msg[:300]} (rerun with --debug for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

