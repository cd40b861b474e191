"""Reader for a generic image folder: ``root/<class_name>/**/*.png|jpg|jpeg|bmp|tif``."""

from __future__ import annotations

import warnings
from pathlib import Path

from diffmic.config import DataConfig
from diffmic.data.base import DataBundle
from diffmic.data.splits import read_file_layout
from diffmic.errors import DataError
from diffmic.images import IMAGE_EXTENSIONS


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted; hidden files and folders ignored)."""
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).parts
        if any(part.startswith(".") for part in rel):
            continue
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            out.append(p)
    return sorted(out)


def read_folder(cfg: DataConfig, run_dir: Path | None) -> DataBundle:
    """Read ``cfg.path`` laid out as one sub-folder of images per class.

    Classes are the sub-folder names in sorted order, or ``cfg.class_names`` in its order (other
    sub-folders are then ignored with a warning). A class folder without images is an error.
    The split is stratified (``data.val_fraction``, ``data.test_fraction``, ``data.split_seed``).
    """
    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(
            f"data.path is not a folder: {root} (data.format=folder expects root/<class>/images)"
        )
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if cfg.class_names:
        missing = [c for c in cfg.class_names if c not in subdirs]
        if missing:
            raise DataError(f"{root}: no folder for class(es) {missing} listed in data.class_names")
        ignored = [d for d in subdirs if d not in cfg.class_names]
        if ignored:
            warnings.warn(
                f"{root}: ignoring folder(s) {ignored} not in data.class_names", stacklevel=2
            )
        class_names = list(cfg.class_names)
    else:
        class_names = subdirs
    if not class_names:
        raise DataError(f"{root}: no class sub-folders found (expected root/<class_name>/<images>)")

    paths: list[Path] = []
    labels: list[int] = []
    for c, name in enumerate(class_names):
        files = list_images(root / name)
        if not files:
            raise DataError(
                f"{root / name}: class folder {name!r} has no images "
                f"({', '.join(IMAGE_EXTENSIONS)})"
            )
        paths += files
        labels += [c] * len(files)
    ids = [p.relative_to(root).as_posix() for p in paths]
    return read_file_layout(
        cfg,
        run_dir,
        root=root,
        source=str(root),
        paths=paths,
        labels=labels,
        ids=ids,
        class_names=class_names,
        strict_classes=True,
    )
