"""Reader for MedMNIST-format ``.npz`` files (keys ``{train,val,test}_{images,labels}``)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from diffmic.data.base import DataBundle, ImageArray, check_labels
from diffmic.errors import DataError
from diffmic.images import ImageSpec, prepare_batch

SPLITS = ("train", "val", "test")


def read_medmnist(
    path: str | Path,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    class_names: list[str] | None = None,
) -> DataBundle:
    """Read a MedMNIST ``.npz`` (any size, 1 or 3 channels) into a :class:`DataBundle`.

    Args:
        path: the ``.npz`` file.
        image_size: resize every image to this side (None keeps the stored size).
        channels: convert to 1 or 3 channels (None keeps them).

    Channel conversion and resizing are :func:`diffmic.images.prepare` (no centre crop).
        class_names: names of the classes; None gives "0".."C-1" with C = max label + 1.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    try:
        npz = np.load(p, allow_pickle=False)
        keys = set(npz.files)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{p}: not a readable .npz file ({exc})") from None
    needed = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
    missing = [k for k in needed if k not in keys]
    if missing:
        raise DataError(f"{p}: missing key(s) {missing}; MedMNIST files have {needed}")
    arrays = {}
    try:
        for split in SPLITS:
            images = np.asarray(npz[f"{split}_images"])
            labels = np.asarray(npz[f"{split}_labels"])
            arrays[split] = (images, labels)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{p}: corrupt .npz file ({exc})") from None

    splits = {}
    for split, (images, labels) in arrays.items():
        where = f"{p} [{split}]"
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[3] not in (1, 3):
            raise DataError(
                f"{where}: images must be (N, H, W) or (N, H, W, 1|3), got shape {images.shape}"
            )
        if images.dtype != np.uint8:
            raise DataError(f"{where}: images must be uint8, got {images.dtype}")
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1:
            raise DataError(
                f"{where}: labels must be (N,) or (N, 1) single-label ints, got shape {labels.shape}"
            )
        if len(labels) != len(images):
            raise DataError(f"{where}: {len(images)} images but {len(labels)} labels")
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{where}: labels must be integers, got {labels.dtype}")
        spec = ImageSpec(image_size or images.shape[1], channels or images.shape[3])  # no crop
        images = prepare_batch(images, spec)
        splits[split] = ImageArray(images, labels.astype(np.int64))

    if len(splits["train"]) == 0:
        raise DataError(f"{p}: the train split is empty")
    num_classes = int(max(int(s.labels.max()) for s in splits.values() if len(s)) + 1)
    if class_names is not None:
        num_classes = len(class_names)
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    for split, arr in splits.items():
        check_labels(arr.labels, num_classes, f"{p} [{split}]")
    return DataBundle(splits["train"], splits["val"], splits["test"], names, source=str(p))
