"""Deterministic stratified, group-aware train/val/test splits and their JSON record.

Layouts that ship no split get one from :func:`stratified_group_split` (fixed seed, stratified by
label, whole groups such as lesions or duplicate images kept together). The split actually used
is written as ``split.json`` (ids per split) next to the run; reuse it with ``data.split_file``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffmic._io import atomic_write_text
from diffmic.config import DataConfig
from diffmic.data.base import DataBundle, ImageArray, check_labels
from diffmic.data.files import default_cache_dir, image_spec, load_images
from diffmic.errors import DataError

SPLITS = ("train", "val", "test")
SPLIT_FILE_NAME = "split.json"


def stratified_group_split(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[Any] | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Split sample indices into train/val/test, stratified by label and keeping groups whole.

    Each group (all samples sharing a ``groups`` value; every sample alone when None) gets the
    majority label of its members (ties: smallest label). Within each label the groups are shuffled
    with ``seed`` and dealt to test, val and train so that the sample counts approach the fractions;
    every label keeps at least one group in train.

    Returns:
        ``{"train", "val", "test"}`` -> sorted int64 index arrays.
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    n = len(y)
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in [0, 1) "
            "and sum below 1"
        )
    if groups is None:
        unit_of = np.arange(n)
    else:
        if len(groups) != n:
            raise DataError(f"{len(groups)} group values for {n} labels")
        index: dict[str, int] = {}
        unit_of = np.array([index.setdefault(str(g), len(index)) for g in groups], dtype=np.int64)
    n_units = int(unit_of.max()) + 1 if n else 0
    members: list[list[int]] = [[] for _ in range(n_units)]
    for i, u in enumerate(unit_of):
        members[u].append(i)
    unit_label = np.array([int(np.bincount(y[m]).argmax()) for m in members], dtype=np.int64)

    rng = np.random.default_rng(seed)
    assign = np.zeros(n_units, dtype=np.int64)  # 0 train, 1 val, 2 test
    for c in np.unique(unit_label):
        units = np.flatnonzero(unit_label == c)
        order = units[rng.permutation(len(units))]
        sizes = np.array([len(members[u]) for u in order], dtype=np.float64)
        total = sizes.sum()
        t_test, t_val = test_fraction * total, (test_fraction + val_fraction) * total
        cum = 0.0
        for u, size in zip(order, sizes):
            mid = cum + size / 2.0
            assign[u] = 2 if mid < t_test else 1 if mid < t_val else 0
            cum += size
        if not np.any(assign[order] == 0):
            assign[order[-1]] = 0
    sample_assign = assign[unit_of] if n else np.zeros(0, dtype=np.int64)
    return {
        name: np.flatnonzero(sample_assign == k).astype(np.int64) for k, name in enumerate(SPLITS)
    }


def unique_ids(ids: Sequence[str]) -> list[str]:
    """Make ids unique: the k-th repeat of ``a`` becomes ``a#k`` (k >= 2)."""
    seen: dict[str, int] = {}
    out = []
    for i in ids:
        seen[i] = seen.get(i, 0) + 1
        out.append(i if seen[i] == 1 else f"{i}#{seen[i]}")
    return out


def save_split(path: str | Path, split: dict[str, np.ndarray], ids: Sequence[str]) -> None:
    """Write ``{"train": [ids], "val": [ids], "test": [ids]}`` as JSON."""
    data: dict[str, Any] = {"format": "diffmic-split", "version": 1}
    for name in SPLITS:
        data[name] = [ids[int(i)] for i in split.get(name, [])]
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, json.dumps(data, indent=1))


def load_split(path: str | Path) -> dict[str, list[str]]:
    """Read a split written by :func:`save_split` (ids per split).

    Raises:
        DataError: missing/invalid file, or an id listed in two splits.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data.split_file not found: {p}")
    try:
        raw = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{p}: not a readable split JSON file ({exc})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{p}: a split file must be a JSON object with keys {list(SPLITS)}")
    out: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for name in SPLITS:
        ids = raw.get(name, [])
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise DataError(f"{p}: '{name}' must be a list of id strings")
        for i in ids:
            if i in owner:
                raise DataError(f"{p}: id {i!r} is listed in both '{owner[i]}' and '{name}'")
            owner[i] = name
        out[name] = ids
    return out


def apply_split(
    saved: dict[str, list[str]], ids: Sequence[str], source: str, ignore: Sequence[str] = ()
) -> dict[str, np.ndarray]:
    """Turn a saved split (ids) into index arrays over ``ids``.

    Ids in ``ignore`` (e.g. images skipped as corrupt) may be referenced without error; any other
    unknown id is an error. Dataset ids absent from the split file are left out with a warning.
    """
    where = {i: k for k, i in enumerate(ids)}
    skip = set(ignore)
    out = {}
    unknown: list[str] = []
    for name in SPLITS:
        idx = []
        for i in saved.get(name, []):
            if i in where:
                idx.append(where[i])
            elif i not in skip:
                unknown.append(i)
        out[name] = np.array(sorted(idx), dtype=np.int64)
    if unknown:
        raise DataError(
            f"{source}: data.split_file references {len(unknown)} id(s) not in the dataset "
            f"(first: {unknown[0]!r}); it was written for other data"
        )
    covered = sum(len(v) for v in out.values())
    if covered < len(ids):
        warnings.warn(
            f"{source}: {len(ids) - covered} image(s) are not in data.split_file and are left out",
            stacklevel=2,
        )
    return out


def carve_val(
    labels: np.ndarray,
    groups: Sequence[Any] | None,
    train_idx: np.ndarray,
    fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``train_idx`` into (train, val) with a stratified, group-aware ``fraction`` for val."""
    sub_groups = [groups[int(i)] for i in train_idx] if groups is not None else None
    part = stratified_group_split(labels[train_idx], sub_groups, fraction, 0.0, seed)
    return train_idx[part["train"]], train_idx[part["val"]]


def merge_groups(groups: Sequence[Any], other: Sequence[Any]) -> list[str]:
    """Union of two groupings: samples sharing a value in either end up in one group."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for g, o in zip(groups, other, strict=True):
        a, b = find(f"g:{g}"), find(f"o:{o}")
        if a != b:
            parent[b] = a
    return [find(f"g:{g}") for g in groups]


def check_classes(labels: np.ndarray, class_names: list[str], source: str, *, strict: bool) -> None:
    """Labels must be in range; a class without images is an error (``strict``) or a warning."""
    check_labels(labels, len(class_names), source)
    counts = np.bincount(labels, minlength=len(class_names))
    empty = [class_names[c] for c in np.flatnonzero(counts == 0)]
    if empty and strict:
        raise DataError(f"{source}: class(es) {empty} have no images")
    if empty:
        warnings.warn(f"{source}: class(es) {empty} have no images", stacklevel=2)


def split_and_bundle(
    cfg: DataConfig,
    *,
    images: np.ndarray,
    labels: np.ndarray,
    ids: list[str],
    class_names: list[str],
    run_dir: Path | None,
    source: str,
    groups: Sequence[Any] | None = None,
    preset: dict[str, np.ndarray] | None = None,
    skipped_ids: Sequence[str] = (),
    extra: dict | None = None,
) -> DataBundle:
    """Choose the split (``data.split_file`` > ``preset`` > a new stratified one), record, bundle.

    A ``preset`` with an empty val split gets a stratified val split carved out of its train split.
    When ``run_dir`` is given the split used is written to ``run_dir/split.json``.
    """
    if len(labels) == 0:
        raise DataError(f"{source}: no images found")
    ids = unique_ids(ids)
    if cfg.split_file:
        split = apply_split(
            load_split(cfg.split_file), ids, f"{source} ({cfg.split_file})", skipped_ids
        )
    elif preset is not None:
        split = {k: np.asarray(preset.get(k, []), dtype=np.int64) for k in SPLITS}
        if len(split["val"]) == 0 and cfg.val_fraction > 0 and len(split["train"]):
            split["train"], split["val"] = carve_val(
                labels, groups, split["train"], cfg.val_fraction, cfg.split_seed
            )
    else:
        split = stratified_group_split(
            labels, groups, cfg.val_fraction, cfg.test_fraction, cfg.split_seed
        )
    if len(split["train"]) == 0:
        raise DataError(f"{source}: the train split is empty")
    if run_dir is not None:
        save_split(Path(run_dir) / SPLIT_FILE_NAME, split, ids)
    parts = {
        k: ImageArray(images[idx], labels[idx].astype(np.int64), [ids[int(i)] for i in idx])
        for k, idx in split.items()
    }
    info = {"split_counts": {k: len(v) for k, v in parts.items()}}
    info.update(extra or {})
    return DataBundle(parts["train"], parts["val"], parts["test"], list(class_names), source, info)


def read_file_layout(
    cfg: DataConfig,
    run_dir: Path | None,
    *,
    root: Path,
    source: str,
    paths: list[Path],
    labels: list[int] | np.ndarray,
    ids: list[str],
    class_names: list[str],
    groups: list[str] | None = None,
    split_names: list[str] | None = None,
    group_duplicates: bool = False,
    strict_classes: bool = False,
    extra: dict | None = None,
) -> DataBundle:
    """Decode the listed images (cached), drop skipped ones, split them and build the bundle.

    Args:
        cfg: the data options (image size, channels, cache, split settings); the preprocessing is
            :func:`diffmic.data.files.image_spec` of it (``data.format`` decides the centre crop).
        run_dir: where ``split.json`` is written (None: not written).
        root: dataset root (default cache folder ``<root>/.diffmic_cache``).
        source: prefix of messages.
        paths, labels, ids: one entry per image.
        class_names: names of the classes (labels index it).
        groups: per-image group keys kept together by the split (None: independent images).
        split_names: per-image "train"/"val"/"test" from the layout itself (None: make a split).
        group_duplicates: group pixel-identical images (hash of the decoded pixels).
        strict_classes: a class without images is an error (else a warning).
        extra: merged into ``DataBundle.extra``.
    """
    ids = unique_ids(ids)
    loaded = load_images(
        paths,
        spec=image_spec(cfg),
        cache_dir=default_cache_dir(cfg.cache_dir, root),
        skip_corrupt=cfg.skip_corrupt,
        want_hash=group_duplicates,
        source=source,
    )
    kept = loaded.kept
    kept_set = set(kept.tolist())
    y = np.asarray(labels, dtype=np.int64)[kept]
    kept_groups = [groups[i] for i in kept] if groups is not None else None
    info = dict(extra or {})
    if group_duplicates and loaded.hashes is not None:
        hashes = loaded.hashes
        kept_groups = list(hashes) if kept_groups is None else merge_groups(kept_groups, hashes)
        info["duplicate_images"] = len(hashes) - len(set(hashes))
    preset = None
    if split_names is not None:
        names = [split_names[i] for i in kept]
        preset = {
            k: np.array([j for j, s in enumerate(names) if s == k], dtype=np.int64) for k in SPLITS
        }
    check_classes(y, class_names, source, strict=strict_classes)
    return split_and_bundle(
        cfg,
        images=loaded.images,
        labels=y,
        ids=[ids[i] for i in kept],
        class_names=class_names,
        run_dir=run_dir,
        source=source,
        groups=kept_groups,
        preset=preset,
        skipped_ids=[i for k, i in enumerate(ids) if k not in kept_set],
        extra=info,
    )
