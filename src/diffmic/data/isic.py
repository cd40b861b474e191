"""Reader for ISIC 2018 Task 3 / HAM10000 (7 skin-lesion classes).

Layout under ``data.path``: ``ISIC2018_Task3_Training_GroundTruth.csv`` (``image`` + one-hot
``MEL, NV, BCC, AKIEC, BKL, DF, VASC``) and the ``<image>.jpg`` files in ``data.image_dir``, or
else a folder named ``ISIC2018_Task3_Training_Input`` or ``images`` under the root, or else
anywhere under the root (e.g. ``HAM10000_images_part_1/2``). When ``HAM10000_metadata.csv``
(``lesion_id, image_id``) is present, all images of one lesion go to the same split.
Images are centre-square cropped then resized, as the original DiffMIC data loader.
"""

from __future__ import annotations

from pathlib import Path

from diffmic.config import DataConfig
from diffmic.data.base import DataBundle
from diffmic.data.files import read_csv, resolve_dir
from diffmic.data.splits import read_file_layout
from diffmic.errors import DataError

ISIC_CLASSES = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
GROUND_TRUTH = "ISIC2018_Task3_Training_GroundTruth.csv"
METADATA = "HAM10000_metadata.csv"
IMAGE_DIRS = ("ISIC2018_Task3_Training_Input", "images")
EXTENSIONS = (".jpg", ".jpeg", ".png")


def _find(root: Path, name: str, *, directory: bool = False) -> Path | None:
    direct = root / name
    if direct.is_dir() if directory else direct.is_file():
        return direct
    hits = sorted(
        p
        for p in root.rglob(name)
        if (p.is_dir() if directory else p.is_file()) and ".diffmic_cache" not in p.parts
    )
    return hits[0] if hits else None


def _image_index(root: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in EXTENSIONS and ".diffmic_cache" not in p.parts and p.is_file():
            index.setdefault(p.stem, p)
    return index


def _one_hot_label(row: dict[str, str], line: int, source: str) -> int:
    values = []
    for name in ISIC_CLASSES:
        try:
            values.append(float(row[name]))
        except ValueError:
            raise DataError(f"{source} row {line}: {name}={row[name]!r} is not a number") from None
    ones = [i for i, v in enumerate(values) if v == 1.0]
    if len(ones) != 1 or any(v not in (0.0, 1.0) for v in values):
        raise DataError(
            f"{source} row {line} ({row['image']}): the one-hot columns {ISIC_CLASSES} must hold "
            f"exactly one 1, got {values}"
        )
    return ones[0]


def read_lesion_groups(path: Path) -> dict[str, str]:
    """``image_id -> lesion_id`` from ``HAM10000_metadata.csv``."""
    _, rows = read_csv(path, ["lesion_id", "image_id"])
    return {row["image_id"]: row["lesion_id"] for _, row in rows if row["image_id"]}


def read_isic2018(cfg: DataConfig, run_dir: Path | None) -> DataBundle:
    """Read the ISIC 2018 Task 3 training set under ``cfg.path`` (split 70/15/15 by default)."""
    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(
            f"data.path is not a folder: {root} (data.format=isic2018 expects the dataset root)"
        )
    gt = _find(root, GROUND_TRUTH)
    if gt is None:
        raise DataError(f"{root}: {GROUND_TRUTH} not found under the dataset root")
    _, rows = read_csv(gt, ["image", *ISIC_CLASSES])
    if not rows:
        raise DataError(f"{gt}: the ground-truth CSV has no rows")

    index: dict[str, Path] | None = None
    if cfg.image_dir is not None:
        image_dir = resolve_dir(cfg.image_dir, root)
        if not image_dir.is_dir():
            raise DataError(f"data.image_dir not found: {cfg.image_dir}")
    else:
        found = [d for d in (_find(root, n, directory=True) for n in IMAGE_DIRS) if d is not None]
        image_dir = found[0] if found else root
        if not found:
            index = _image_index(root)

    paths: list[Path] = []
    labels: list[int] = []
    ids: list[str] = []
    for line, row in rows:
        image = row["image"]
        if not image:
            raise DataError(f"{gt} row {line}: empty 'image' cell")
        labels.append(_one_hot_label(row, line, str(gt)))
        if index is not None:
            path = index.get(image)
        else:
            path = next(
                (
                    image_dir / (image + e)
                    for e in EXTENSIONS
                    if (image_dir / (image + e)).is_file()
                ),
                None,
            )
        if path is None:
            raise DataError(
                f"{gt} row {line}: image file not found: {image_dir / (image + '.jpg')}"
            )
        paths.append(path)
        ids.append(image)

    groups = None
    extra: dict = {}
    meta = _find(root, METADATA)
    if meta is not None:
        lesion_of = read_lesion_groups(meta)
        groups = [lesion_of.get(i, f"image:{i}") for i in ids]
        extra["lesions"] = len(set(groups))
        extra["lesion_metadata"] = str(meta)
    names = list(cfg.class_names) if cfg.class_names else list(ISIC_CLASSES)
    if len(names) != len(ISIC_CLASSES):
        raise DataError(
            f"data.class_names must list {len(ISIC_CLASSES)} names for isic2018, got {names}"
        )
    return read_file_layout(
        cfg,
        run_dir,
        root=root,
        source=str(gt),
        paths=paths,
        labels=labels,
        ids=ids,
        class_names=names,
        groups=groups,
        extra=extra,
    )
