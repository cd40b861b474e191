"""Reader for APTOS 2019 Blindness Detection (5 diabetic-retinopathy grades).

Layout under ``data.path``: ``train.csv`` (``id_code, diagnosis``) and
``train_images/<id_code>.png`` (or ``data.image_dir``). Fundus preprocessing as the paper: centre
square crop of side min(H, W), then resize. Pixel-identical images (APTOS ships several exact
duplicates) are kept in one split.
"""

from __future__ import annotations

from pathlib import Path

from diffmic.config import DataConfig
from diffmic.data.base import DataBundle
from diffmic.data.files import read_csv, resolve_dir
from diffmic.data.splits import read_file_layout
from diffmic.errors import DataError

APTOS_CLASSES = ["No DR", "Mild", "Moderate", "Severe", "Proliferative DR"]
EXTENSIONS = (".png", ".jpg", ".jpeg")


def read_aptos2019(cfg: DataConfig, run_dir: Path | None) -> DataBundle:
    """Read the APTOS 2019 training set under ``cfg.path`` (split 70/15/15 by default)."""
    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(
            f"data.path is not a folder: {root} (data.format=aptos2019 expects the dataset root)"
        )
    csv_path = root / "train.csv"
    _, rows = read_csv(csv_path, ["id_code", "diagnosis"])
    if not rows:
        raise DataError(f"{csv_path}: the CSV has no rows")
    image_dir = (
        resolve_dir(cfg.image_dir, root) if cfg.image_dir is not None else root / "train_images"
    )
    if not image_dir.is_dir():
        raise DataError(f"{root}: image folder not found: {image_dir} (set data.image_dir)")
    names = list(cfg.class_names) if cfg.class_names else list(APTOS_CLASSES)

    paths: list[Path] = []
    labels: list[int] = []
    ids: list[str] = []
    for line, row in rows:
        code, diagnosis = row["id_code"], row["diagnosis"]
        if not code:
            raise DataError(f"{csv_path} row {line}: empty 'id_code' cell")
        try:
            label = int(diagnosis)
        except ValueError:
            raise DataError(
                f"{csv_path} row {line}: diagnosis {diagnosis!r} is not an integer 0-4"
            ) from None
        if not 0 <= label < len(names):
            raise DataError(
                f"{csv_path} row {line}: diagnosis {label} is outside 0-{len(names) - 1}"
            )
        path = next(
            (image_dir / (code + e) for e in EXTENSIONS if (image_dir / (code + e)).is_file()), None
        )
        if path is None:
            raise DataError(
                f"{csv_path} row {line}: image file not found: {image_dir / (code + '.png')}"
            )
        paths.append(path)
        labels.append(label)
        ids.append(code)
    return read_file_layout(
        cfg,
        run_dir,
        root=root,
        source=str(csv_path),
        paths=paths,
        labels=labels,
        ids=ids,
        class_names=names,
        group_duplicates=True,
    )
