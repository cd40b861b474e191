"""Shared helpers of the file-based readers: the decode-once cache, CSV reading, folder options.

Every image goes through :func:`diffmic.images.load_image`'s path (decode, EXIF orientation, 8-bit
grey or RGB, centre crop per the layout's :class:`~diffmic.images.ImageSpec`, bilinear resize).
:func:`load_images` decodes a whole list once and keeps the uint8 result as ``.npy`` in a cache
folder, keyed by the files (paths, mtimes, sizes) and the spec.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffmic._io import atomic_write, atomic_write_text
from diffmic.config import DataConfig
from diffmic.errors import DataError
from diffmic.images import DECODE_ERRORS, ImageSpec, decode_image, image_to_array

DEFAULT_IMAGE_SIZE = 224
CACHE_VERSION = 2  # 2: one preprocessing path (diffmic.images), EXIF orientation applied


def _load(path: Path, spec: ImageSpec, want_hash: bool) -> tuple[np.ndarray, str]:
    img = decode_image(path)
    digest = ""
    if want_hash:
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{img.mode}:{img.size}".encode())
        h.update(img.tobytes())
        digest = h.hexdigest()
    return image_to_array(img, spec), digest


@dataclass
class LoadedImages:
    """Result of :func:`load_images`: images of the kept files, in the requested order."""

    images: np.ndarray  # uint8 (K, S, S, C)
    kept: np.ndarray  # int64 (K,) indices into the requested path list
    hashes: list[str] | None  # pixel hashes of the kept images (``want_hash`` only)
    skipped: list[str]


def load_images(
    paths: list[Path],
    *,
    spec: ImageSpec,
    cache_dir: str | Path | None = None,
    skip_corrupt: bool = False,
    want_hash: bool = False,
    source: str = "data",
) -> LoadedImages:
    """Decode (or read from the cache) a list of images into one uint8 array.

    Args:
        paths: image files; duplicates are decoded once.
        spec: the preprocessing (side, channels, centre crop).
        cache_dir: folder for the decode-once cache (None disables it; unwritable: warning).
        skip_corrupt: leave unreadable files out (one warning with the count) instead of failing.
        want_hash: also return a hash of each image's raw decoded pixels (duplicate detection).
        source: prefix of error and warning messages.
    """
    uniq = sorted({str(Path(p).absolute()) for p in paths})
    stats = []
    for p in uniq:
        try:
            st = os.stat(p)
        except OSError:
            raise DataError(f"{source}: image file not found: {p}") from None
        stats.append((p, st.st_mtime_ns, st.st_size))
    prep = {
        "v": CACHE_VERSION,
        "size": spec.size,
        "channels": spec.channels,
        "center": spec.center_crop,
        "hash": want_hash,
    }
    key = hashlib.sha256(json.dumps([stats, prep]).encode()).hexdigest()[:32]

    cached = _cache_read(Path(cache_dir), key, uniq) if cache_dir is not None else None
    if cached is None:
        cached = _decode_all(uniq, spec, want_hash, skip_corrupt, source)
        if cache_dir is not None:
            _cache_write(Path(cache_dir), key, *cached)
    arrays, kept_paths, hashes, skipped = cached
    if skipped:
        warnings.warn(
            f"{source}: skipped {len(skipped)} unreadable image(s) because data.skip_corrupt=true "
            f"(first: {skipped[0]})",
            stacklevel=2,
        )
    row = {p: i for i, p in enumerate(kept_paths)}
    want = [str(Path(p).absolute()) for p in paths]
    kept = np.array([i for i, p in enumerate(want) if p in row], dtype=np.int64)
    rows = np.array([row[want[i]] for i in kept], dtype=np.int64)
    images = arrays[rows] if len(rows) else np.zeros((0, spec.size, spec.size, spec.channels), dtype=np.uint8)
    out_hashes = [hashes[r] for r in rows] if want_hash and hashes is not None else None
    return LoadedImages(np.ascontiguousarray(images), kept, out_hashes, list(skipped))


_Decoded = tuple[np.ndarray, list[str], list[str] | None, list[str]]


def _decode_all(
    uniq: list[str],
    spec: ImageSpec,
    want_hash: bool,
    skip: bool,
    source: str,
) -> _Decoded:
    def work(p: str) -> tuple[np.ndarray, str] | str:
        try:
            return _load(Path(p), spec, want_hash)
        except DECODE_ERRORS as exc:
            return f"{p}: unreadable or corrupt image ({exc})"

    out = np.empty((len(uniq), spec.size, spec.size, spec.channels), dtype=np.uint8)
    kept: list[str] = []
    hashes: list[str] = []
    skipped: list[str] = []
    workers = max(1, min(8, os.cpu_count() or 1))
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for p, res in zip(uniq, pool.map(work, uniq)):
            if isinstance(res, str):
                if not skip:
                    raise DataError(
                        f"{source}: {res}; set data.skip_corrupt=true to skip such files"
                    )
                skipped.append(p)
                continue
            out[len(kept)] = res[0]
            kept.append(p)
            hashes.append(res[1])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # stop pending decodes on an error
    return out[: len(kept)], kept, hashes if want_hash else None, skipped


def _cache_read(folder: Path, key: str, uniq: list[str]) -> _Decoded | None:
    meta_path, npy_path = folder / f"{key}.json", folder / f"{key}.npy"
    if not (meta_path.is_file() and npy_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        arrays = np.load(npy_path, mmap_mode="r", allow_pickle=False)
        kept, skipped = list(meta["kept"]), list(meta["skipped"])
        if len(arrays) != len(kept) or sorted(kept + skipped) != uniq:
            raise ValueError("inconsistent cache entry")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"ignoring corrupt image cache {npy_path} ({exc})", stacklevel=3)
        return None
    return arrays, kept, meta.get("hashes"), skipped


def _cache_write(
    folder: Path,
    key: str,
    arrays: np.ndarray,
    kept: list[str],
    hashes: list[str] | None,
    skipped: list[str],
) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / f"{key}.npy", lambda f: np.save(f, arrays, allow_pickle=False))
        atomic_write_text(folder / f"{key}.json", json.dumps({"kept": kept, "skipped": skipped, "hashes": hashes}))
    except OSError as exc:
        warnings.warn(f"image cache disabled: cannot write to {folder} ({exc})", stacklevel=3)


def default_cache_dir(cache_dir: str | None, root: Path) -> Path:
    """``data.cache_dir`` if set, else ``<root>/.diffmic_cache``."""
    return Path(cache_dir) if cache_dir else root / ".diffmic_cache"


def read_csv(path: Path, required: list[str]) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Read a CSV with a header; return the columns and (line number, row) pairs.

    Raises:
        DataError: the file is missing/unreadable or lacks some ``required`` column.
    """
    if not path.is_file():
        raise DataError(f"CSV file not found: {path}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = columns
            rows = []
            for row in reader:
                rows.append((reader.line_num, {k: (v or "").strip() for k, v in row.items() if k}))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: unreadable CSV ({exc})") from None
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {columns}")
    return columns, rows


def resolve_dir(option: str | None, base: Path) -> Path:
    """Resolve a folder option: as given if it exists, else relative to ``base``."""
    if option is None:
        return base
    p = Path(option).expanduser()
    if p.is_absolute() or p.is_dir():
        return p
    return base / p


def image_spec(cfg: DataConfig) -> ImageSpec:
    """The :class:`ImageSpec` of a file layout: ``data.image_size`` (default 224), ``data.channels``
    (default 3), centre crop by ``data.format``, ``data.mean``/``data.std``."""
    return ImageSpec.for_format(cfg.format, size=cfg.image_size or DEFAULT_IMAGE_SIZE,
                                channels=cfg.channels or 3, mean=cfg.mean, std=cfg.std)
