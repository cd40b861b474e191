"""End-to-end ``diffmic predict`` on a folder of PNG files: images/s with decoding, next to the model alone.

Writes N PNG files (default 1000, the test images of a MedMNIST ``.npz``, repeated when the split is
smaller) into a temporary folder, then times, as medians over ``--repeats``:

* ``cli``: ``diffmic predict --checkpoint CKPT FOLDER --out preds.csv`` run in this process through
  :func:`diffmic.cli.main` (model loading, listing, decoding, prediction, CSV) — the end-to-end figure;
* ``cli_process`` (unless ``--no-process``): the same command as a new ``python -m diffmic`` process,
  which adds the interpreter start and the imports;
* ``pipeline``: the same steps through the API the command runs (:func:`diffmic.prediction.predict_files`),
  each phase timed: load the model, decode the files, predict, write the CSV;
* ``model_only``: :meth:`DiffMIC.predict_details` on the same images already in memory (a uint8
  tensor): no files, no decoding;
* ``per_image`` (``--per-image``): one model call per image, as ``diffmic predict`` did before it batched.

Without ``--checkpoint`` a randomly initialised model of ``--config`` (default: the RetinaMNIST
preset) is saved to the temporary folder and used (speed only). The command's probabilities are
checked against the model-only ones. The result goes to ``benchmarks/results/predict-folder-<time>.json``
and the ``predict-folder`` section of ``docs/benchmarks.md``.

    python benchmarks/predict_folder.py --threads 2                 # 1000 images, RetinaMNIST preset
    python benchmarks/predict_folder.py --checkpoint runs/retinamnist/model.pt --images 1000 --per-image
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common

DEFAULT_DATA = common.REPO.parent / "shared" / "data" / "retinamnist.npz"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="model.pt (or a run's .ckpt); default: a randomly "
                   "initialised model of --config")
    p.add_argument("--config", type=Path, default=common.REPO / "configs" / "retinamnist.yaml",
                   help="config of the random model (without --checkpoint)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override of the random model; repeatable")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MedMNIST .npz whose images are written")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--images", type=int, default=1000, help="number of PNG files (default 1000)")
    p.add_argument("--samples", type=int, default=1, help="reverse chains per image (diffmic predict --samples)")
    p.add_argument("--batch-size", type=int, default=256, help="images per model call (diffmic predict --batch-size)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each case (median reported)")
    p.add_argument("--per-image", action="store_true",
                   help="also time one model call per image (what diffmic predict did before batching)")
    p.add_argument("--no-process", action="store_true",
                   help="skip the case that runs the command as a new process (interpreter start and imports)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--workdir", type=Path, help="folder for the PNG files and the CSV (default: a temporary "
                   "folder, removed afterwards)")
    p.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/predict-folder-<timestamp>.json)")
    p.add_argument("--docs", type=Path, default=common.DOCS, help="markdown file to update")
    p.add_argument("--no-docs", action="store_true", help="do not update the markdown file")
    args = p.parse_args(argv)
    for name in ("images", "samples", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# ------------------------------------------------------------------------------ inputs
def write_pngs(images: np.ndarray, n: int, folder: Path) -> list[Path]:
    """``n`` PNG files ``img_00000.png`` ... from ``images`` (N, H, W[, C]) uint8, cycling through them."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        im = images[i % len(images)]
        if im.ndim == 3 and im.shape[-1] == 1:
            im = im[..., 0]
        path = folder / f"img_{i:05d}.png"
        Image.fromarray(im).save(path)
        paths.append(path)
    return paths


def random_checkpoint(args: argparse.Namespace, folder: Path) -> tuple[Path, dict[str, Any]]:
    """model.pt of a randomly initialised model of ``--config`` for the images of ``--data``."""
    import torch

    from diffmic.config import DiffMICConfig
    from diffmic.data.registry import build_data
    from diffmic.models import build_model, save_model

    cfg = DiffMICConfig.from_yaml(args.config, [*args.overrides, f"data.path={args.data}"])
    data = build_data(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=data.num_classes, in_chans=data.channels, image_size=data.image_size,
                        class_names=list(data.class_names))
    path = folder / "model.pt"
    save_model(model, path)
    return path, {"random_init": True, "config": str(args.config), "overrides": args.overrides}


# ------------------------------------------------------------------------------ timing
def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Wall seconds of ``repeats`` calls of ``fn`` (after one untimed warm-up call) and the last result."""
    out = fn()
    seconds = []
    for _ in range(repeats):
        tic = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - tic)
    return seconds, out


def rate(n: int, seconds: list[float]) -> dict[str, Any]:
    med = statistics.median(seconds)
    return {"seconds": [round(s, 4) for s in seconds], "median_seconds": round(med, 4),
            "images_per_s": round(n / med, 2) if med > 0 else None,
            "ms_per_image": round(1000 * med / n, 4)}


def csv_probs(text: str, class_names: list[str]) -> np.ndarray:
    import csv

    rows = list(csv.DictReader(io.StringIO(text)))
    return np.array([[float(r[f"p_{c}"]) for c in class_names] for r in rows])


def process_run(argv: list[str], threads: int) -> float:
    """Wall seconds of ``python -m diffmic <argv>`` in a new process (this checkout's diffmic, ``threads``)."""
    import os
    import subprocess

    import diffmic

    src = str(Path(diffmic.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS=str(threads))
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "diffmic", *argv], check=False, capture_output=True, text=True,
                          env=env)
    seconds = time.perf_counter() - tic
    if proc.returncode != 0:
        raise RuntimeError(f"diffmic predict failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return seconds


def run(args: argparse.Namespace, work: Path, threads: int) -> dict[str, Any]:
    import torch

    from diffmic import load_model
    from diffmic.cli import main as cli_main
    from diffmic.images import load_image
    from diffmic.prediction import for_inference, predict_files, predictions_csv

    source = np.load(args.data)[f"{args.split}_images"]
    tic = time.perf_counter()
    folder = work / "images"
    paths = write_pngs(source, args.images, folder)
    write_seconds = time.perf_counter() - tic
    folder_bytes = sum(p.stat().st_size for p in paths)
    if args.checkpoint is not None:
        ckpt, model_info = args.checkpoint, {"random_init": False, "checkpoint": str(args.checkpoint)}
    else:
        ckpt, model_info = random_checkpoint(args, work)
    n, csv_path = len(paths), work / "preds.csv"
    print(f"[predict-folder] {n} PNG files ({folder_bytes / 1e6:.1f} MB) in {folder}; model {ckpt}", flush=True)

    # --- end to end: the command itself
    argv = ["predict", "--checkpoint", str(ckpt), str(folder), "--out", str(csv_path),
            "--samples", str(args.samples), "--seed", "0", "--batch-size", str(args.batch_size)]

    def command() -> str:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            if cli_main(argv) != 0:
                raise RuntimeError("diffmic predict failed: " + " ".join(argv))
        return csv_path.read_text()

    cli_seconds, cli_csv = timed(command, args.repeats)
    print(f"[predict-folder] cli: {n / statistics.median(cli_seconds):.1f} images/s", flush=True)
    process_seconds = None if args.no_process else [process_run(argv, threads) for _ in range(args.repeats)]

    # --- the same through the API, phase by phase
    phases: dict[str, list[float]] = {"load_model": [], "decode": [], "predict": [], "csv": []}
    model = load_model(ckpt)
    for i in range(args.repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        model = for_inference(load_model(ckpt))  # as the command: --engine auto
        t1 = time.perf_counter()
        marks: list[float] = []
        details = predict_files(model, paths, samples=args.samples, seed=0, batch_size=args.batch_size,
                                on_loaded=lambda marks=marks: marks.append(time.perf_counter()))
        t3 = time.perf_counter()
        predictions_csv([str(p) for p in paths], [details], model.class_names)
        t4 = time.perf_counter()
        if i:
            for key, value in zip(phases, (t1 - t0, marks[0] - t1, t3 - marks[0], t4 - t3), strict=True):
                phases[key].append(value)
    pipeline = {k: rate(n, v) for k, v in phases.items()}
    pipeline_total = [sum(v) for v in zip(*phases.values(), strict=True)]
    without_load = [d + p + c for d, p, c in zip(phases["decode"], phases["predict"], phases["csv"], strict=True)]

    # --- the model alone on the same images, already in memory
    images = torch.from_numpy(np.stack([load_image(p, model.image_spec) for p in paths])).permute(0, 3, 1, 2)

    def model_only() -> dict:
        return model.predict_details(images, samples=args.samples, generator=torch.Generator().manual_seed(0),
                                     batch_size=args.batch_size)

    model_seconds, model_details = timed(model_only, args.repeats)
    print(f"[predict-folder] model only: {n / statistics.median(model_seconds):.1f} images/s", flush=True)
    cases: dict[str, Any] = {
        "cli": rate(n, cli_seconds) | {"what": "diffmic predict FOLDER --out CSV, in process (load, list, "
                                              "decode, predict, CSV)"},
        "pipeline": rate(n, pipeline_total) | {"what": "the same steps through diffmic.prediction.predict_files"},
        "pipeline_without_model_load": rate(n, without_load) | {"what": "decode + predict + CSV"},
        "model_only": rate(n, model_seconds) | {"what": "DiffMIC.predict_details on the decoded images, "
                                                        "a uint8 tensor in memory"},
    }
    if process_seconds is not None:
        cases["cli_process"] = rate(n, process_seconds) | {
            "what": "python -m diffmic predict ... as a new process (adds interpreter start and imports)"}
    if args.per_image:
        def per_image() -> None:
            gen = torch.Generator().manual_seed(0)
            for i in range(n):
                model.predict_details(images[i : i + 1], samples=args.samples, generator=gen)

        cases["per_image"] = rate(n, timed(per_image, 1)[0]) | {
            "what": "one predict_details call per decoded image (diffmic predict before batching)"}
    max_diff = float(np.abs(csv_probs(cli_csv, model.class_names) - model_details["probs"].numpy()).max())
    spec = model.image_spec
    return {
        "images": n,
        "image_files": {"format": "png", "source": f"{args.data} ({args.split} split, {len(source)} images, cycled)",
                        "shape": list(source.shape[1:]), "folder_mb": round(folder_bytes / 1e6, 2),
                        "write_seconds": round(write_seconds, 2)},
        "model": model_info | {"image_size": spec.size, "channels": spec.channels,
                               "num_classes": model.num_classes, "readout": model.readout,
                               "parameters": sum(p.numel() for p in model.parameters())},
        "phases": pipeline,
        "cases": cases,
        "decode_share_of_pipeline": round(statistics.median(phases["decode"]) / statistics.median(pipeline_total), 4),
        "end_to_end_over_model_only": round(statistics.median(cli_seconds) / statistics.median(model_seconds), 3),
        "max_abs_diff_cli_vs_model_only_probs": max_diff,
    }


def markdown(result: dict[str, Any]) -> str:
    r, s = result["result"], result["settings"]
    c = r["cases"]
    lines = [
        "## End-to-end `diffmic predict` on a folder",
        "",
        (f"Generated by `benchmarks/predict_folder.py` ({common.commit_label(result['run'])}, "
         f"{result['run']['torch_threads']} torch threads, {result['run']['cpu_count']} CPUs): {r['images']} PNG files "
         f"({'x'.join(map(str, r['image_files']['shape']))}), {'a random' if r['model']['random_init'] else 'the'} "
         f"model ({r['model']['image_size']} px, readout {r['model']['readout']}), --samples {s['samples']}, "
         f"--batch-size {s['batch_size']}; medians of {s['repeats']} runs."),
        "",
        "| case | images/s | ms/image |",
        "|---|---|---|",
    ]
    for name, label in (("cli_process", "`python -m diffmic predict` as a new process (+ start, imports)"),
                        ("cli", "`diffmic predict` end to end (load, list, decode, predict, CSV)"),
                        ("pipeline_without_model_load", "decode + predict + CSV (no model load)"),
                        ("model_only", "model only (decoded images in memory)"),
                        ("per_image", "one model call per image (before batching)")):
        if name in c:
            lines.append(f"| {label} | {c[name]['images_per_s']} | {c[name]['ms_per_image']} |")
    ph = r["phases"]
    lines += ["", "Phases (median seconds): " + ", ".join(f"{k} {v['median_seconds']}" for k, v in ph.items())
              + f"; decoding is {100 * r['decode_share_of_pipeline']:.1f}% of the pipeline."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    threads = common.set_threads(args.threads)
    info = common.run_info("benchmarks/predict_folder.py", argv)
    started = time.perf_counter()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result_body = run(args, args.workdir, threads)
    else:
        with tempfile.TemporaryDirectory(prefix="diffmic-predict-") as tmp:
            result_body = run(args, Path(tmp), threads)
    result = {
        "benchmark": "predict_folder",
        "run": info | {"torch_threads": threads},
        "settings": {"images": args.images, "samples": args.samples, "batch_size": args.batch_size,
                     "repeats": args.repeats, "data": str(args.data), "split": args.split,
                     "checkpoint": str(args.checkpoint) if args.checkpoint else None,
                     "config": None if args.checkpoint else str(args.config), "overrides": args.overrides},
        "wall_seconds": round(time.perf_counter() - started, 1),
        "result": result_body,
    }
    out = args.out or common.RESULTS / f"predict-folder-{common.timestamp()}.json"
    common.publish("predict-folder", out, result, None if args.no_docs else args.docs, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
