"""``diffmic`` command line: a thin shell over the Python API.

Every user error ends in one line on stderr (``diffmic: error: ...``) and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from diffmic._io import atomic_write, atomic_write_text, check_output_file, prepare_output_dir
from diffmic._version import __version__
from diffmic.errors import ConfigError, DiffMICError

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
    xp.add_argument("--steps", type=positive_int, default=None, help="DDIM steps (default: the checkpoint's sampling_steps)")
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


def _load_cfg(args: argparse.Namespace, extra: list[str] | None = None):
    from diffmic.config import DiffMICConfig

    overrides = list(args.overrides)
    if getattr(args, "data", None):
        overrides.append(f"data.path={args.data}")
    overrides += extra or []
    return DiffMICConfig.from_yaml(args.config, overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    from diffmic.config import replace
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
        if not DEFAULT_DATA.is_file():
            raise ConfigError("no dataset given: use --data PATH (or data.path in the config)")
        cfg = replace(cfg, data={"path": str(DEFAULT_DATA)})
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
    from diffmic import load_model
    from diffmic.evaluation.plots import write_evaluation_figures
    from diffmic.evaluation.report import evaluate_checkpoint

    if args.out:
        check_output_file(args.out, ConfigError, [args.checkpoint, *([args.data] if args.data else [])])
    if args.plots:
        prepare_output_dir(args.plots, ConfigError)
    model = load_model(args.checkpoint)
    data_path = args.data or model.config.get("data", {}).get("path", "")
    if args.out:  # the stored dataset is an input too
        check_output_file(args.out, ConfigError, [data_path])
    if args.medmnist_csv:  # before predicting: a MedMNIST dataset and a writable folder
        from diffmic.evaluation.medmnist_format import check_medmnist_path, prepare_folder

        check_medmnist_path(data_path)
        prepare_folder(args.medmnist_csv)
    ev = evaluate_checkpoint(
        args.checkpoint, model=model, split=args.split, data_path=args.data,
        data_format=args.format, samples=args.samples, sampler=args.sampler, num_steps=args.steps,
        seed=args.seed, calibrate=args.calibrate,
    )
    if args.calibrate and args.split == "val":
        print("diffmic: note: --calibrate fits the temperature on the split it evaluates (val); "
              "the calibrated ECE is optimistic", file=sys.stderr)
    report = ev.report
    if args.plots:
        names = write_evaluation_figures(args.plots, ev)
        print(f"figures written to {args.plots}: {', '.join(names)}")
    if args.medmnist_csv:  # the official MedMNIST result file; medmnist.Evaluator's ACC/AUC next to ours
        from diffmic.evaluation.medmnist_format import write_medmnist_result

        print(write_medmnist_result(args.medmnist_csv, ev.probs, ev.data, args.split, ours=report.diffusion,
                                    checkpoint=args.checkpoint).summary(), file=sys.stdout if args.out else sys.stderr)
    if not args.out:
        print(report.to_json())
        return 0
    report.to_json(args.out)
    _print_table(report.guidance, report.diffusion, args.split)
    if report.uncertainty is not None:
        u = report.uncertainty
        print(f"temperature scaling (T = {u['fitted_temperature']:.4g}, fitted on val): "
              f"ECE {u['ece']:.4f} -> {u['ece_calibrated']:.4f}; AURC {u['aurc']:.4f}")
    print(f"report written to {args.out}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from diffmic import load_model
    from diffmic.prediction import expand_images, predict_files, predictions_csv

    paths, notes = expand_images(args.images, args.recursive)
    if args.out:
        check_output_file(args.out, ConfigError, [*paths, args.checkpoint])
    model = load_model(args.checkpoint)

    def print_notes() -> None:  # once the images are read: a bad image's error stays one line
        for note in notes:
            print(note, file=sys.stderr)

    # Nothing is written before every image has been predicted; a bad image names its file.
    details = predict_files(model, paths, samples=args.samples, seed=args.seed, batch_size=args.batch_size,
                            on_loaded=print_notes)
    text = predictions_csv([str(p) for p in paths], [details], model.class_names)
    if args.out:
        atomic_write_text(args.out, text)
        print(f"{len(paths)} predictions written to {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    import torch

    from diffmic import load_model
    from diffmic.prediction import expand_images, load_images, named

    paths, notes = expand_images(args.images, args.recursive)
    targets = [args.out / f"{path.stem}_explain.png" for path in paths]
    seen: dict[Path, Path] = {}
    for path, target in zip(paths, targets, strict=True):
        if target in seen and seen[target] != path:
            raise ConfigError(f"{seen[target]} and {path} would both be explained in {target}; "
                              "give images with distinct file names")
        seen[target] = path
    prepare_output_dir(args.out, ConfigError)
    for target in targets:
        check_output_file(target, ConfigError, [*paths, args.checkpoint])
    model = load_model(args.checkpoint)
    images = load_images(paths, model.image_spec)  # fail on a bad file before writing anything
    for note in notes:
        print(note, file=sys.stderr)
    from diffmic.evaluation.plots import plot_explanation

    gen = torch.Generator().manual_seed(args.seed)
    for path, im, target in zip(paths, images, targets, strict=True):
        explanation = named(path, model.explain, im, samples=args.samples, generator=gen)
        # drawn as the model saw it (cropped, resized): the boxes and saliency are in those pixels
        fig = plot_explanation(im, explanation, model.class_names)
        atomic_write(target, lambda f, fig=fig: fig.savefig(f, format="png"))
        print(f"{target}")
    print(f"{len(images)} explanations written to {args.out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    if args.out:  # the run folder's files (model, config, metrics, split, logs) are its inputs
        if not args.run_dir.is_dir():
            raise ConfigError(f"run folder not found: {args.run_dir}")
        check_output_file(args.out, ConfigError,
                          [p for p in args.run_dir.rglob("*") if p.is_file() and p.suffix != ".html"])
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
    check_output_file(args.out, ConfigError, [args.checkpoint])  # before the (slow) checkpoint load and export
    from diffmic import load_model
    from diffmic.export import export_onnx

    model = load_model(args.checkpoint)
    path = export_onnx(model, args.out, samples=args.samples, num_steps=args.steps, batch_size=args.batch_size)
    steps = args.steps or model.sampling_steps
    batch = "B" if args.batch_size is None else str(args.batch_size)
    size = model.image_size
    print(f"exported {path}: images ({batch}, {model.in_chans}, {size}, {size}) in [0, 1] + noise "
          f"({args.samples}, {batch}, {model.num_classes}) -> probs, prior, y0; DDIM {steps} steps, eta=0, "
          f"batch {'dynamic' if args.batch_size is None else 'fixed'}")
    return 0


def _cmd_app(args: argparse.Namespace) -> int:
    from diffmic.app import launch

    launch(args.checkpoint, host=args.host, port=args.port, threshold=args.threshold, coverage=args.coverage,
           calibration=args.calibration, samples=args.samples, seed=args.seed, max_upload_mb=args.max_upload_mb)
    return 0


COMMANDS = {
    "train": _cmd_train,
    "evaluate": _cmd_evaluate,
    "predict": _cmd_predict,
    "explain": _cmd_explain,
    "report": _cmd_report,
    "config": _cmd_config,
    "export": _cmd_export,
    "app": _cmd_app,
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


def quiet_library_warnings() -> None:
    """Hide the libraries' warnings that no user can act on (the CLI without ``--debug``; benchmarks)."""
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
    # deprecations inside the libraries (e.g. Lightning's use of torch's LeafSpec): nothing a user can act on
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(lightning|torch|timm|torchmetrics)\b")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


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
        quiet_library_warnings()
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

