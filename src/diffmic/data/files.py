"""Shared helpers of the file-based readers: decoding, mode conversion and a decode-once cache.

Every image is decoded with PIL, converted to 8-bit grey or RGB (RGBA/LA/P drop alpha, 16-bit and
32-bit grey are *scaled* to 8 bits), optionally centre-square cropped, and resized (bilinear) to a
fixed side. :func:`load_images` decodes a whole list once and keeps the uint8 result as ``.npy`` in
a cache folder, keyed by the files (paths, mtimes, sizes) and the preprocessing.
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
from PIL import Image

from diffmic._io import atomic_write, atomic_write_text
from diffmic.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DEFAULT_IMAGE_SIZE = 224
CACHE_VERSION = 1
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def decode_image(path: str | Path) -> Image.Image:
    """Open and fully decode one image file (the only place pixels are read from disk)."""
    img = Image.open(path)
    try:
        img.load()
    except BaseException:
        img.close()
        raise
    return img


def to_uint8_array(img: Image.Image) -> np.ndarray:
    """Convert a PIL image of any common mode to uint8 (H, W, 1) grey or (H, W, 3) RGB.

    Alpha is dropped, palettes are expanded, 16-bit grey is divided by 257 (65535 -> 255) and
    32-bit integer / float grey is scaled from its value range, never clipped.
    """
    mode = img.mode
    if mode in ("RGB", "L"):
        arr = np.asarray(img, dtype=np.uint8)
    elif mode in ("RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV"):
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    elif mode in ("1", "LA", "La"):
        arr = np.asarray(img.convert("L"), dtype=np.uint8)
    elif mode == "P" or mode == "PA":
        arr = np.asarray(img.convert("RGBA").convert("RGB"), dtype=np.uint8)
    elif mode.startswith("I;16"):
        arr = _scale(np.asarray(img).astype(np.float64), 65535.0)
    elif mode in ("I", "F"):
        raw = np.asarray(img).astype(np.float64)
        top = float(raw.max()) if raw.size else 0.0
        if mode == "F" and top <= 1.0:
            full = 1.0
        elif top <= 255:
            full = 255.0
        elif top <= 65535:
            full = 65535.0
        else:
            full = top
        arr = _scale(raw - min(0.0, float(raw.min()) if raw.size else 0.0), full)
    else:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    return arr


def _scale(raw: np.ndarray, full: float) -> np.ndarray:
    return np.clip(np.rint(raw * (255.0 / full)), 0, 255).astype(np.uint8)


def center_square(arr: np.ndarray) -> np.ndarray:
    """Crop the centred square of side min(H, W) (offsets as the original DiffMIC code)."""
    h, w = arr.shape[:2]
    s = min(h, w)
    y0, x0 = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
    return arr[y0 : y0 + s, x0 : x0 + s]


def _fit_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    have = arr.shape[2]
    if have == channels:
        return arr
    if have == 1 and channels == 3:
        return np.repeat(arr, 3, axis=2)
    if have == 3 and channels == 1:
        gray = arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return np.clip(np.rint(gray), 0, 255).astype(np.uint8)[..., None]
    raise DataError(f"cannot convert {have}-channel image to {channels} channels")


def _resize(arr: np.ndarray, size: int) -> np.ndarray:
    if arr.shape[0] == size and arr.shape[1] == size:
        return arr
    chans = [
        np.asarray(Image.fromarray(arr[..., c]).resize((size, size), Image.Resampling.BILINEAR))
        for c in range(arr.shape[2])
    ]
    return np.stack(chans, axis=2)


def _load(
    path: Path, channels: int, size: int, center: bool, want_hash: bool
) -> tuple[np.ndarray, str]:
    img = decode_image(path)
    digest = ""
    if want_hash:
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{img.mode}:{img.size}".encode())
        h.update(img.tobytes())
        digest = h.hexdigest()
    arr = to_uint8_array(img)
    if center:
        arr = center_square(arr)
    arr = _resize(_fit_channels(arr, channels), size)
    return np.ascontiguousarray(arr), digest


def load_image(
    path: str | Path, channels: int, size: int, *, center_square: bool = False
) -> np.ndarray:
    """Decode one image into uint8 (size, size, channels).

    Args:
        path: the image file.
        channels: 1 (grey) or 3 (RGB).
        size: output side in pixels (bilinear resize).
        center_square: crop the centred min(H, W) square before resizing.

    Raises:
        DataError: naming the file when it is missing or cannot be decoded.
    """
    p = Path(path)
    try:
        return _load(p, channels, size, center_square, False)[0]
    except FileNotFoundError:
        raise DataError(f"image file not found: {p}") from None
    except _DECODE_ERRORS as exc:
        raise DataError(f"{p}: unreadable or corrupt image ({exc})") from None


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
    channels: int,
    size: int,
    center_square: bool = False,
    cache_dir: str | Path | None = None,
    skip_corrupt: bool = False,
    want_hash: bool = False,
    source: str = "data",
) -> LoadedImages:
    """Decode (or read from the cache) a list of images into one uint8 array.

    Args:
        paths: image files; duplicates are decoded once.
        channels: 1 or 3.
        size: output side.
        center_square: centre-square crop before resizing.
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
        "size": size,
        "channels": channels,
        "center": center_square,
        "hash": want_hash,
    }
    key = hashlib.sha256(json.dumps([stats, prep]).encode()).hexdigest()[:32]

    cached = _cache_read(Path(cache_dir), key, uniq) if cache_dir is not None else None
    if cached is None:
        cached = _decode_all(uniq, channels, size, center_square, want_hash, skip_corrupt, source)
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
    images = arrays[rows] if len(rows) else np.zeros((0, size, size, channels), dtype=np.uint8)
    out_hashes = [hashes[r] for r in rows] if want_hash and hashes is not None else None
    return LoadedImages(np.ascontiguousarray(images), kept, out_hashes, list(skipped))


_Decoded = tuple[np.ndarray, list[str], list[str] | None, list[str]]


def _decode_all(
    uniq: list[str],
    channels: int,
    size: int,
    center: bool,
    want_hash: bool,
    skip: bool,
    source: str,
) -> _Decoded:
    def work(p: str) -> tuple[np.ndarray, str] | str:
        try:
            return _load(Path(p), channels, size, center, want_hash)
        except _DECODE_ERRORS as exc:
            return f"{p}: unreadable or corrupt image ({exc})"

    out = np.empty((len(uniq), size, size, channels), dtype=np.uint8)
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


def image_settings(size: int | None, channels: int | None) -> tuple[int, int]:
    """(side, channels) for file layouts: defaults 224 and 3."""
    return (size or DEFAULT_IMAGE_SIZE), (channels or 3)
