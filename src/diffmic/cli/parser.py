"""The ``diffmic`` argument parser: sub-commands, options, help texts and examples."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NoReturn

from diffmic._version import __version__

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
    "app": "examples:\n  diffmic app --checkpoint runs/retinamnist/model.pt   # then open http://127.0.0.1:7860\n"
           "  diffmic app --checkpoint runs/retinamnist/model.pt --coverage 0.9 --calibration test.json\n"
           "(needs pip install 'diffmic[app]'; see docs/app.md)",
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``diffmic: error: ...``) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"diffmic: error: {self.prog}: {message} (see '{self.prog} --help')\n")


def positive_int(text: str) -> int:
    """argparse type of ``--samples``, ``--steps`` and ``--batch-size``: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
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
    e.add_argument("--samples", type=positive_int, default=None, help="reverse chains per image")
    e.add_argument("--sampler", choices=["ddim", "ancestral", "truncated"], default=None)
    e.add_argument("--steps", type=positive_int, default=None, help="sampling steps (denoiser calls)")
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

    pr = add("predict", "Predict class probabilities for image files (PNG/JPEG/...) or folders of them.")
    pr.add_argument("--checkpoint", required=True, type=Path, help="model.pt or a Lightning .ckpt")
    pr.add_argument("images", nargs="+", type=Path, metavar="IMAGE|DIR",
                    help="image files, or folders: their images, sorted by path (other files are listed, not used)")
    pr.add_argument("--recursive", action="store_true", help="also take the images in sub-folders of a folder")
    pr.add_argument("--samples", type=positive_int, default=1, help="reverse chains per image")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--batch-size", type=positive_int, default=256,
                    help="images per model call (default 256; lower it to use less memory)")
    pr.add_argument("--engine", choices=["auto", "eager", "fused"], default="auto",
                    help="fused: BatchNorm folded into the layers before it (same outputs to float rounding); "
                         "auto (default): fused, at every image size; eager: the model as trained")
    pr.add_argument("--out", type=Path, help="write a CSV here (default: stdout)")

    x = add("explain", "Save a figure per image: ROI crops with attention weights, the predicted class's "
                       "saliency map, and DCG prior vs diffusion probabilities.")
    x.add_argument("--checkpoint", required=True, type=Path, help="model.pt or a Lightning .ckpt")
    x.add_argument("images", nargs="+", type=Path, metavar="IMAGE|DIR",
                   help="image files, or folders: their images, sorted by path (other files are listed, not used)")
    x.add_argument("--recursive", action="store_true", help="also take the images in sub-folders of a folder")
    x.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="output folder for <stem>_explain.png (created if its parent exists)")
    x.add_argument("--samples", type=positive_int, default=1, help="reverse chains per image")
    x.add_argument("--seed", type=int, default=0)

    r = add("report", "Write one self-contained HTML report of a training run (metrics, calibration, "
                      "accuracy-coverage, training curves, ROI examples, model card).")
    r.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run folder (with model.pt)")
    r.add_argument("--out", type=Path, help="the HTML file (default: RUN_DIR/report.html)")
    r.add_argument("--samples", type=positive_int, default=None, help="reverse chains per image (default: the run's)")
    r.add_argument("--seed", type=int, default=0)

    c = add("config", "Print the resolved configuration as YAML.")
    config_args(c)

    xp = add("export", "Export the inference graph (normalisation, DCG with ROI crops, image encoder, "
                       "fixed-step DDIM with eta=0) to ONNX; the starting noise is a graph input.")
    xp.add_argument("--checkpoint", required=True, type=Path, help="model.pt or a Lightning .ckpt")
    xp.add_argument("--format", default="onnx", help="export format (only onnx is supported)")
    xp.add_argument("--out", required=True, type=Path, metavar="FILE", help="the file to write (e.g. model.onnx)")
    xp.add_argument("--samples", type=positive_int, default=1, help="reverse chains per image, fixed in the graph")
    xp.add_argument("--steps", type=positive_int, default=None,
                    help="DDIM steps (default: the checkpoint's sampling_steps)")
    xp.add_argument("--batch-size", type=positive_int, default=None,
                    help="fix the batch size (default: dynamic batch axis)")
    ap = add("app", "Serve a local web page (Gradio, offline) that classifies dropped images with a checkpoint.")
    ap.add_argument("--checkpoint", required=True, type=Path, help="model.pt or a Lightning .ckpt")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    ap.add_argument("--port", type=positive_int, default=7860, help="port (default: 7860)")
    ap.add_argument("--coverage", type=float, default=None, metavar="C",
                    help="flag 'refer to a specialist' under the confidence that keeps a fraction C of the "
                         "validation split (computed at start-up, or read from --calibration)")
    ap.add_argument("--calibration", type=Path, default=None, metavar="FILE",
                    help="the JSON of 'diffmic evaluate --calibrate --out FILE' (its referral thresholds)")
    ap.add_argument("--threshold", type=float, default=None, metavar="T",
                    help="flag 'refer to a specialist' when the confidence (max probability) is under T")
    ap.add_argument("--samples", type=positive_int, default=16,
                    help="reverse chains per image, for the 95%% intervals and votes (default: 16)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted upload (default: 20 MB)")
    return p
