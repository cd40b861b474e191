"""data.format=folder: root/<class>/images, conversions, errors, split.json record and reuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmic.config import DataConfig
from diffmic.data.registry import READERS, build_data
from diffmic.errors import DataError

COUNTS = {"benign": 10, "malignant": 8, "normal": 6}


def _make_tree(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c, (name, n) in enumerate(COUNTS.items()):
        d = root / name
        d.mkdir(parents=True)
        for i in range(n):
            kind = i % 5
            if kind == 0:
                Image.fromarray(rng.integers(0, 256, (30, 40, 4), dtype=np.uint8)).save(
                    d / f"{i}.png"
                )
            elif kind == 1:
                Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8)).save(d / f"{i}.png")
            elif kind == 2:
                arr = rng.integers(0, 65536, (30, 40), dtype=np.uint16)
                Image.fromarray(arr).save(d / f"{i}.png")
            elif kind == 3:
                Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
                    d / f"{i}.JPG"
                )
            else:
                Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
                    d / f"{i}.bmp"
                )
    (root / "benign" / "notes.txt").write_text("not an image")
    return root


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(format="folder", path=str(root), image_size=kw.pop("image_size", 16), **kw)


def test_reads_all_classes_and_formats(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "ds")
    b = build_data(_cfg(root))
    assert b.class_names == ["benign", "malignant", "normal"]
    total = sum(len(b.split(s)) for s in ("train", "val", "test"))
    assert total == 24
    for s in ("train", "val", "test"):
        arr = b.split(s)
        assert arr.images.dtype == np.uint8 and arr.images.shape[1:] == (16, 16, 3)
        assert arr.labels.dtype == np.int64
        assert len(arr.ids) == len(arr.labels)
        for i, y in zip(arr.ids, arr.labels):
            assert i.split("/")[0] == b.class_names[y]
    ids = b.train.ids + b.val.ids + b.test.ids
    assert len(set(ids)) == 24 and all(not i.endswith(".txt") for i in ids)
    for c in range(3):
        assert np.any(b.train.labels == c)


def test_default_size_channels_and_class_order(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "ds")
    b = READERS["folder"](
        _cfg(root, image_size=None, channels=1, class_names=["normal", "benign", "malignant"]), None
    )
    assert b.train.images.shape[1:] == (224, 224, 1)
    assert b.class_names == ["normal", "benign", "malignant"]
    labels = np.concatenate([b.train.labels, b.val.labels, b.test.labels])
    assert np.bincount(labels).tolist() == [6, 10, 8]


def test_empty_and_missing_class_folder(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "ds")
    (root / "zempty").mkdir()
    with pytest.raises(DataError, match="zempty"):
        build_data(_cfg(root))
    with pytest.raises(DataError, match="other"):
        build_data(_cfg(root, class_names=["benign", "other"]))
    with pytest.raises(DataError, match="not a folder"):
        build_data(_cfg(tmp_path / "nope"))


def test_corrupt_image_error_and_skip(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "ds")
    (root / "normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    with pytest.raises(DataError, match="broken.png"):
        build_data(_cfg(root))
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        b = build_data(_cfg(root, skip_corrupt=True))
    assert sum(len(b.split(s)) for s in ("train", "val", "test")) == 24


def test_split_json_written_and_reused(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "ds")
    run = tmp_path / "run"
    b = build_data(_cfg(root, split_seed=1), run)
    saved = json.loads((run / "split.json").read_text())
    assert (
        saved["train"] == b.train.ids and saved["val"] == b.val.ids and saved["test"] == b.test.ids
    )
    fresh = build_data(_cfg(root, split_seed=2))
    assert fresh.test.ids != b.test.ids  # another seed gives another split ...
    again = build_data(_cfg(root, split_seed=2, split_file=str(run / "split.json")))
    assert again.test.ids == b.test.ids and again.val.ids == b.val.ids  # ... unless reused
    np.testing.assert_array_equal(again.test.images, b.test.images)
    saved["test"].append("normal/ghost.png")
    (tmp_path / "bad.json").write_text(json.dumps(saved))
    with pytest.raises(DataError, match="ghost.png"):
        build_data(_cfg(root, split_file=str(tmp_path / "bad.json")))


def test_cache_is_written_under_root(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "ds")
    build_data(_cfg(root))
    assert list((root / ".diffmic_cache").glob("*.npy"))
    other = tmp_path / "cache"
    build_data(_cfg(root, cache_dir=str(other)))
    assert list(other.glob("*.npy"))
    b = build_data(_cfg(root))  # the cache folder itself is not taken as a class
    assert b.class_names == ["benign", "malignant", "normal"]


def test_class_emptied_by_skipped_files_is_an_error(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "ds")
    (root / "rare").mkdir()
    (root / "rare" / "only.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with (
        pytest.warns(UserWarning, match="skipped 1"),
        pytest.raises(DataError, match=r"\['rare'\].*no images"),
    ):
        build_data(_cfg(root, skip_corrupt=True))
