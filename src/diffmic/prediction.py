"""Predictions for image files: what ``diffmic predict`` and ``diffmic explain`` run, as Python API.

Kept apart from :mod:`diffmic.evaluation` so that predicting on files imports only torch, the model
and the image decoder (no torchmetrics, matplotlib or scipy): a new ``diffmic predict`` process
starts faster.

    from diffmic import load_model
    from diffmic.prediction import expand_images, predict_files, predictions_csv

    model = for_inference(load_model("runs/retinamnist/model.pt"))  # engine "auto"
    paths, notes = expand_images([Path("scans/")])
    details = predict_files(model, paths, samples=16)
    csv_text = predictions_csv([str(p) for p in paths], [details], model.class_names)
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffmic.errors import ConfigError, DataError, DiffMICError

ENGINES = ("auto", "eager", "fused")
AUTO_ENGINE = "fused"  # what "auto" stands for, at every image size (docs/speed.md)


def resolve_engine(model, engine: str = "auto") -> str:
    """The engine ``engine`` stands for with this model: ``"eager"`` or ``"fused"``.

    ``"fused"`` is :meth:`DiffMIC.fuse_for_inference` (BatchNorm folded into the layers before it, the
    same function to float rounding: parity-tested at 1e-5). ``"auto"`` picks it at every image size: it
    measured faster at 224 px in every idle-machine run and at 28 px in three of four (docs/speed.md).
    """
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r} (choose one of: {', '.join(ENGINES)})")
    if engine == "auto":
        return AUTO_ENGINE
    return engine


def for_inference(model, engine: str = "auto"):
    """``model`` ready for prediction with ``engine`` (:func:`resolve_engine`).

    With the fused engine, BatchNorm is folded into ``model`` itself (no second copy in memory):
    pass a model loaded only to predict; it can no longer be trained or saved.
    """
    if resolve_engine(model, engine) == "fused" and not model.inference_only:
        return model.fuse_for_inference(inplace=True)
    return model.eval()


def expand_images(items: list[Path], recursive: bool) -> tuple[list[Path], list[str]]:
    """Image arguments with each folder replaced by its images (sorted), and one note per folder:
    its image count and the entries left out (printed to stderr once the images are read, so a
    CSV on stdout stays clean and an error stays one line)."""
    from diffmic.images import IMAGE_EXTENSIONS, list_image_files

    out: list[Path] = []
    notes: list[str] = []
    for item in items:
        if not item.is_dir():
            out.append(item)
            continue
        found, others = list_image_files(item, recursive=recursive)
        subfolders = [p for p in others if p.is_dir()]
        if not found:
            hint = "; use --recursive to search its sub-folders" if subfolders else ""
            raise DataError(f"{item}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder{hint}")
        note = f"diffmic: {item}: {len(found)} image(s)"
        if others:
            names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in others[:5])
            more = f", ... ({len(others) - 5} more)" if len(others) > 5 else ""
            why = " (sub-folders need --recursive)" if subfolders else ""
            note += f"; not used: {len(others)} other entr{'y' if len(others) == 1 else 'ies'}{why}: {names}{more}"
        notes.append(note)
        out += found
    return out, notes


def load_images(paths: list[Path], spec) -> list:
    """Each file as the uint8 array a dataset reader stores (:func:`diffmic.images.load_image`)."""
    from diffmic.images import load_image

    return [load_image(p, spec) for p in paths]


def predict_files(model, paths: Sequence[str | Path], *, samples: int = 1, seed: int = 0, batch_size: int = 256,
                  on_loaded=None) -> dict:
    """What ``diffmic predict`` computes for image files: :meth:`DiffMIC.predict_details` of their images.

    Each file is decoded once (:func:`diffmic.images.load_image`: the uint8 array a dataset reader
    stores); the images are then predicted together, ``batch_size`` per model call, with one
    generator seeded by ``seed``. ``on_loaded()`` is called once every file is decoded. Errors
    name the file.
    """
    paths = [Path(p) for p in paths]
    images = np.stack(load_images(paths, model.image_spec)) if paths else None  # all (size, size, channels)
    if on_loaded is not None:
        on_loaded()
    if images is None:
        raise DataError("no images given")
    gen = torch.Generator().manual_seed(seed)
    try:
        return model.predict_details(images, samples=samples, generator=gen, batch_size=batch_size)
    except DiffMICError:
        for path, im in zip(paths, images, strict=True):  # which image the model cannot take
            named(path, model.predict_details, im, samples=1, generator=torch.Generator().manual_seed(seed))
        raise


def named(path: Path, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; an image the model cannot take (NaN pixels, unconvertible channels) names its file."""
    try:
        return fn(*args, **kwargs)
    except DiffMICError as exc:
        raise DataError(f"{path}: {exc}") from None


def predictions_csv(paths: list[str], details: list[dict[str, Tensor]], class_names: list[str]) -> str:
    """The CSV of ``diffmic predict``: one row per image from :meth:`DiffMIC.predict_details` outputs.

    Columns: ``path``, ``prediction`` (class name), ``p_<class>``, ``entropy``, ``vote_<class>``,
    ``low_<class>``, ``high_<class>``.
    """
    cols = {k: torch.cat([d[k] for d in details]).tolist()
            for k in ("probs", "entropy", "votes", "interval_low", "interval_high")}
    names = class_names
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "prediction", *[f"p_{c}" for c in names], "entropy", *[f"vote_{c}" for c in names],
                *[f"low_{c}" for c in names], *[f"high_{c}" for c in names]])
    for i, path in enumerate(paths):
        p = cols["probs"][i]
        w.writerow([
            str(path), names[max(range(len(p)), key=p.__getitem__)], *[f"{v:.6f}" for v in p],
            f"{cols['entropy'][i]:.6f}", *[f"{v:.6f}" for v in cols["votes"][i]],
            *[f"{v:.6f}" for v in cols["interval_low"][i]], *[f"{v:.6f}" for v in cols["interval_high"][i]],
        ])
    return buf.getvalue()


__all__ = ["expand_images", "load_images", "named", "predict_files", "predictions_csv"]
