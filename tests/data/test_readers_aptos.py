"""data.format=aptos2019: train.csv + train_images, centre-square crop, duplicate grouping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmic.config import DataConfig
from diffmic.data.aptos import APTOS_CLASSES
from diffmic.data.registry import build_data
from diffmic.errors import DataError

DUP_SETS = [["d0a", "d0b", "d0c"], ["d1a", "d1b"], ["d2a", "d2b"], ["d3a", "d3b", "d3c", "d3d"]]


def _make_aptos(root: Path, n_unique: int = 20) -> dict[str, int]:
    rng = np.random.default_rng(0)
    img_dir = root / "train_images"
    img_dir.mkdir(parents=True)
    labels: dict[str, int] = {}
    for i in range(n_unique):
        code = f"u{i:03d}"
        labels[code] = i % 5
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
            img_dir / f"{code}.png"
        )
    for k, codes in enumerate(DUP_SETS):
        pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        for j, code in enumerate(codes):  # same pixels, different file bytes
            Image.fromarray(pixels).save(img_dir / f"{code}.png", compress_level=j * 3)
            labels[code] = k % 5
    rows = ["id_code,diagnosis"] + [f"{c},{y}" for c, y in labels.items()]
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return labels


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(format="aptos2019", path=str(root), image_size=kw.pop("image_size", 16), **kw)


def test_reads_labels_and_groups_exact_duplicates(tmp_path: Path) -> None:
    labels = _make_aptos(tmp_path)
    files = [tmp_path / "train_images" / f"{c}.png" for c in DUP_SETS[0]]
    assert len({f.read_bytes() for f in files}) == 3  # duplicates are not byte-identical files
    spread = 0
    for seed in range(6):
        b = build_data(_cfg(tmp_path, split_seed=seed, val_fraction=0.3, test_fraction=0.3))
        assert b.class_names == APTOS_CLASSES
        where = {i: s for s in ("train", "val", "test") for i in b.split(s).ids}
        assert len(where) == len(labels)
        for s in ("train", "val", "test"):
            for i, y in zip(b.split(s).ids, b.split(s).labels):
                assert labels[i] == y
        for codes in DUP_SETS:
            assert len({where[c] for c in codes}) == 1, f"duplicates {codes} split apart"
            spread += where[codes[0]] != "train"
        assert b.extra["duplicate_images"] == sum(len(c) - 1 for c in DUP_SETS)
    assert spread > 0  # duplicate sets do reach val/test, as whole sets


def test_centre_square_crop(tmp_path: Path) -> None:
    (tmp_path / "train_images").mkdir()
    arr = np.zeros((40, 60, 3), dtype=np.uint8)
    arr[:, 10:50] = 255
    for i in range(3):
        Image.fromarray(arr).save(tmp_path / "train_images" / f"w{i}.png")
    (tmp_path / "train.csv").write_text("id_code,diagnosis\nw0,0\nw1,0\nw2,0\n")
    with pytest.warns(UserWarning, match="no images"):  # grades 1-4 are absent from this tiny set
        b = build_data(_cfg(tmp_path, image_size=20, val_fraction=0.0, test_fraction=0.0))
    assert b.train.images.shape == (3, 20, 20, 3)
    assert np.all(b.train.images == 255)


def test_bad_rows(tmp_path: Path) -> None:
    _make_aptos(tmp_path)
    csv = tmp_path / "train.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines + ["u000,7"]) + "\n")
    with pytest.raises(DataError, match=f"row {len(lines) + 1}.*diagnosis 7"):
        build_data(_cfg(tmp_path))
    csv.write_text("\n".join(lines + ["nofile,1"]) + "\n")
    with pytest.raises(DataError, match=f"row {len(lines) + 1}.*nofile.png"):
        build_data(_cfg(tmp_path))
    csv.write_text("id_code,level\nu000,1\n")
    with pytest.raises(DataError, match=r"train\.csv.*missing column\(s\) \['diagnosis'\]"):
        build_data(_cfg(tmp_path))
