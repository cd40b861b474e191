"""Reader for a generic CSV manifest: one row per image with a path and a label column.

Optional columns: ``data.group_column`` (rows sharing a value stay in one split) and ``split``
(train/val/test, used as the split instead of making one).
"""

from __future__ import annotations

from pathlib import Path

from diffmic.config import DataConfig
from diffmic.data.base import DataBundle
from diffmic.data.files import read_csv, resolve_dir
from diffmic.data.splits import read_file_layout
from diffmic.errors import DataError

SPLIT_COLUMN = "split"
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


def parse_labels(
    values: list[tuple[int, str]], class_names: list[str] | None, source: str
) -> tuple[list[int], list[str]]:
    """Map label cells to class indices.

    With ``class_names`` a cell is a class name (or an integer index into the names); an unknown
    name is an error naming the row. Without, all-integer cells are indices (names "0".."C-1") and
    anything else makes the sorted distinct values the class names.

    Args:
        values: (row number, cell) pairs.
        class_names: ``data.class_names`` or None.
        source: the CSV, for messages.
    """
    for line, v in values:
        if v == "":
            raise DataError(f"{source} row {line}: empty label")
    if class_names:
        index = {name: i for i, name in enumerate(class_names)}
        out = []
        for line, v in values:
            if v in index:
                out.append(index[v])
            elif _is_int(v) and 0 <= int(v) < len(class_names):
                out.append(int(v))
            else:
                raise DataError(
                    f"{source} row {line}: unknown class name {v!r}; "
                    f"data.class_names is {class_names}"
                )
        return out, list(class_names)
    if all(_is_int(v) for _, v in values):
        ints = [int(v) for _, v in values]
        for (line, _), k in zip(values, ints):
            if k < 0:
                raise DataError(f"{source} row {line}: negative label {k}")
        return ints, [str(i) for i in range(max(ints) + 1)]
    names = sorted({v for _, v in values})
    index = {name: i for i, name in enumerate(names)}
    return [index[v] for _, v in values], names


def _is_int(v: str) -> bool:
    try:
        int(v)
    except ValueError:
        return False
    return True


def read_csv_manifest(cfg: DataConfig, run_dir: Path | None) -> DataBundle:
    """Read the CSV manifest ``cfg.path``.

    Image paths (``data.path_column``) are absolute, or relative to ``data.image_dir`` (default: the
    CSV's folder). Labels come from ``data.label_column``. Row numbers in messages are the CSV's
    line numbers (the header is line 1).
    """
    csv_path = Path(cfg.path)
    if csv_path.is_dir():
        raise DataError(
            f"data.path must be the CSV file for data.format=csv, got a folder: {csv_path}"
        )
    required = [cfg.path_column, cfg.label_column] + (
        [cfg.group_column] if cfg.group_column else []
    )
    columns, rows = read_csv(csv_path, required)
    if not rows:
        raise DataError(f"{csv_path}: the CSV has no rows")
    base = resolve_dir(cfg.image_dir, csv_path.parent)
    if cfg.image_dir is not None and not base.is_dir():
        raise DataError(f"data.image_dir not found: {cfg.image_dir}")

    paths: list[Path] = []
    ids: list[str] = []
    for line, row in rows:
        cell = row.get(cfg.path_column, "")
        if not cell:
            raise DataError(f"{csv_path} row {line}: empty '{cfg.path_column}' cell")
        p = Path(cell).expanduser()
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            raise DataError(f"{csv_path} row {line}: image file not found: {p}")
        paths.append(p)
        ids.append(cell)
    labels, class_names = parse_labels(
        [(line, row.get(cfg.label_column, "")) for line, row in rows],
        cfg.class_names,
        str(csv_path),
    )
    groups = None
    if cfg.group_column:
        groups = [row.get(cfg.group_column) or f"\0row{line}" for line, row in rows]
    split_names = None
    if SPLIT_COLUMN in columns:
        split_names = []
        for line, row in rows:
            value = row.get(SPLIT_COLUMN, "").lower()
            if value not in SPLIT_ALIASES:
                raise DataError(
                    f"{csv_path} row {line}: split {row.get(SPLIT_COLUMN)!r} "
                    "must be train, val or test"
                )
            split_names.append(SPLIT_ALIASES[value])
    return read_file_layout(
        cfg,
        run_dir,
        root=csv_path.parent,
        source=str(csv_path),
        paths=paths,
        labels=labels,
        ids=ids,
        class_names=class_names,
        groups=groups,
        split_names=split_names,
        strict_classes=bool(cfg.class_names),
    )
