"""Image decoding, mode conversion, centre crop (diffmic.images) and the decode-once cache (data.files)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmic.data import files
from diffmic.data.files import load_images, read_csv
from diffmic.errors import DataError
from diffmic.images import ImageSpec
from diffmic.images import load_image as _load_image
from diffmic.images import pil_to_uint8 as to_uint8_array


def load_image(path, channels, size, *, center_square=False):
    return _load_image(path, ImageSpec(size, channels, center_square))


def _spec(size, channels, center=False):
    return ImageSpec(size, channels, center)


def _save(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr, mode) if mode else Image.fromarray(arr)
    img.save(path)
    return path


def test_rgb_resize_shape_and_dtype(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    out = load_image(_save(tmp_path / "a.png", arr), 3, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    same = load_image(tmp_path / "a.png", 3, 30, center_square=True)
    np.testing.assert_array_equal(same, arr[:, 5:35])


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    arr = np.zeros((8, 8, 4), dtype=np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2], arr[..., 3] = 200, 100, 50, 255
    arr[:4, ..., 3] = 0  # transparent half keeps its colour values
    out = load_image(_save(tmp_path / "rgba.png", arr), 3, 8)
    assert out.shape == (8, 8, 3)
    assert np.all(out == np.array([200, 100, 50], dtype=np.uint8))


def test_gray_l_to_rgb_and_back(tmp_path: Path) -> None:
    arr = np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1))
    p = _save(tmp_path / "l.png", arr)
    rgb = load_image(p, 3, 8)
    assert rgb.shape == (8, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], arr)
    np.testing.assert_array_equal(load_image(p, 1, 8)[..., 0], arr)


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 257 * 100, 65535, 257 * 7]], dtype=np.uint16).repeat(4, axis=0)
    p = _save(tmp_path / "g16.png", arr)
    with Image.open(p) as img:
        assert img.mode in ("I;16", "I")
    out = load_image(p, 1, 4)
    np.testing.assert_array_equal(out[..., 0], np.array([[0, 100, 255, 7]]).repeat(4, axis=0))
    assert load_image(p, 3, 4).shape == (4, 4, 3)


def test_int32_and_float_and_palette_modes() -> None:
    i32 = Image.fromarray(np.array([[0, 65535]], dtype=np.int32), "I")
    np.testing.assert_array_equal(to_uint8_array(i32)[..., 0], [[0, 255]])
    small = Image.fromarray(np.array([[0, 200]], dtype=np.int32), "I")
    np.testing.assert_array_equal(to_uint8_array(small)[..., 0], [[0, 200]])
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    np.testing.assert_array_equal(to_uint8_array(f)[..., 0], [[0, 128, 255]])
    pal = Image.fromarray(np.full((2, 2, 3), (10, 20, 30), dtype=np.uint8)).convert(
        "P", palette=Image.Palette.ADAPTIVE
    )
    assert to_uint8_array(pal).shape == (2, 2, 3)
    np.testing.assert_array_equal(to_uint8_array(pal)[0, 0], [10, 20, 30])


def test_center_square_crop_keeps_only_the_centre(tmp_path: Path) -> None:
    arr = np.zeros((40, 60, 3), dtype=np.uint8)  # H=40, W=60
    arr[:, 10:50] = 255
    p = _save(tmp_path / "wide.png", arr)
    assert np.all(load_image(p, 3, 20, center_square=True) == 255)
    assert not np.all(load_image(p, 3, 20) == 255)  # plain resize keeps the black sides
    tall = _save(tmp_path / "tall.png", np.ascontiguousarray(arr.transpose(1, 0, 2)))
    assert np.all(load_image(tall, 3, 20, center_square=True) == 255)


def test_corrupt_file_errors_or_is_skipped_with_warning(tmp_path: Path) -> None:
    good = _save(tmp_path / "good.png", np.zeros((10, 10, 3), dtype=np.uint8))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match="bad.png"):
        load_image(bad, 3, 8)
    with pytest.raises(DataError, match="bad.png"):
        load_images([good, bad], spec=_spec(8, 3))
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        res = load_images([bad, good], spec=_spec(8, 3), skip_corrupt=True)
    assert res.kept.tolist() == [1] and res.images.shape == (1, 8, 8, 3)
    with pytest.raises(DataError, match="not found.*missing.png"):
        load_images([tmp_path / "missing.png"], spec=_spec(8, 3))


def test_cache_hit_skips_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    paths = [
        _save(tmp_path / f"{i}.png", rng.integers(0, 256, (12, 9, 3), dtype=np.uint8))
        for i in range(5)
    ]
    calls = []
    real = files.decode_image

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(files, "decode_image", counting)
    cache = tmp_path / "cache"
    first = load_images(paths, spec=_spec(8, 3), cache_dir=cache, want_hash=True)
    assert len(calls) == 5 and any(cache.glob("*.npy"))

    def boom(path):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(files, "decode_image", boom)
    order = paths[::-1] + [paths[0]]  # other order and a repeat: served from the same entry
    second = load_images(order, spec=_spec(8, 3), cache_dir=cache, want_hash=True)
    np.testing.assert_array_equal(second.images[:5], first.images[::-1])
    np.testing.assert_array_equal(second.images[5], first.images[0])
    assert second.hashes[:5] == first.hashes[::-1]

    monkeypatch.setattr(files, "decode_image", counting)
    calls.clear()
    load_images(paths, spec=_spec(8, 1), cache_dir=cache)  # other preprocessing: new entry
    assert len(calls) == 5
    _save(paths[2], np.zeros((12, 10, 3), dtype=np.uint8))  # changed file: new entry
    os.utime(paths[2], ns=(1, 1))
    calls.clear()
    third = load_images(paths, spec=_spec(8, 3), cache_dir=cache)
    assert len(calls) == 5 and np.all(third.images[2] == 0)


def test_unwritable_cache_warns_and_still_loads(tmp_path: Path) -> None:
    p = _save(tmp_path / "a.png", np.zeros((10, 10, 3), dtype=np.uint8))
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.warns(UserWarning, match="cache disabled"):
        res = load_images([p], spec=_spec(8, 3), cache_dir=not_a_dir / "cache")
    assert res.images.shape == (1, 8, 8, 3)


def test_cache_records_skipped_files_and_warns_again(tmp_path: Path) -> None:
    good = _save(tmp_path / "good.png", np.zeros((10, 10, 3), dtype=np.uint8))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    for _ in range(2):
        with pytest.warns(UserWarning, match="skipped 1"):
            res = load_images(
                [good, bad], spec=_spec(8, 3), cache_dir=tmp_path / "c", skip_corrupt=True
            )
        assert res.kept.tolist() == [0]


def test_read_csv_missing_columns_named(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_text("path,other\na.png,1\n")
    with pytest.raises(DataError, match=r"m\.csv.*missing column\(s\) \['label'\]"):
        read_csv(p, ["path", "label"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cols, rows = read_csv(p, ["path"])
    assert cols == ["path", "other"] and rows == [(2, {"path": "a.png", "other": "1"})]
