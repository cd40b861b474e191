"""The ``diffmic`` sub-commands: each reads its parsed arguments, calls the Python API and prints.

Every function takes the ``argparse.Namespace`` of :func:`diffmic.cli.parser.build_parser` and returns
the exit code; errors are raised as :class:`diffmic.errors.DiffMICError` and reported by
:func:`diffmic.cli.main`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffmic._io import atomic_write, atomic_write_text, check_output_file, prepare_output_dir
from diffmic.errors import ConfigError

DEFAULT_DATA = Path("..") / "shared" / "data" / "retinamnist.npz"  # relative to the working folder


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
            raise ConfigError("--resume RUN_DIR uses the run's own config.yaml; "
                              "drop --config/--set/--data/--out/--name")
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
    from diffmic.prediction import expand_images, for_inference, predict_files, predictions_csv

    paths, notes = expand_images(args.images, args.recursive)
    if args.out:
        check_output_file(args.out, ConfigError, [*paths, args.checkpoint])
    model = for_inference(load_model(args.checkpoint), args.engine)

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
