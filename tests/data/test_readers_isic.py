"""data.format=isic2018: one-hot ground truth, image discovery, lesion-grouped splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmic.config import DataConfig
from diffmic.data.isic import ISIC_CLASSES
from diffmic.data.registry import build_data
from diffmic.errors import DataError


def _make_isic(
    root: Path,
    *,
    n: int = 28,
    image_dir: str = "ISIC2018_Task3_Training_Input",
    metadata: bool = True,
) -> dict[str, tuple[int, str]]:
    """n images, 4 per class; lesions of 1-3 images with a single class each."""
    rng = np.random.default_rng(0)
    (root / image_dir).mkdir(parents=True)
    truth: dict[str, tuple[int, str]] = {}
    rows = ["image," + ",".join(ISIC_CLASSES)]
    meta = ["lesion_id,image_id,dx"]
    lesion = 0
    for i in range(n):
        c = i % 7
        image = f"ISIC_{i:07d}"
        if i >= 7 and rng.random() < 0.6:  # join the lesion of an earlier image of the same class
            lesion_id = truth[f"ISIC_{i - 7:07d}"][1]
        else:
            lesion_id, lesion = f"HAM_{lesion:07d}", lesion + 1
        truth[image] = (c, lesion_id)
        onehot = ["1.0" if k == c else "0.0" for k in range(7)]
        rows.append(image + "," + ",".join(onehot))
        meta.append(f"{lesion_id},{image},{ISIC_CLASSES[c].lower()}")
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
            root / image_dir / f"{image}.jpg"
        )
    (root / "ISIC2018_Task3_Training_GroundTruth.csv").write_text("\n".join(rows) + "\n")
    if metadata:
        (root / "HAM10000").mkdir()
        (root / "HAM10000" / "HAM10000_metadata.csv").write_text("\n".join(meta) + "\n")
    return truth


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(format="isic2018", path=str(root), image_size=16, **kw)


def test_labels_from_one_hot_and_lesion_grouping(tmp_path: Path) -> None:
    truth = _make_isic(tmp_path)
    assert len({les for _, les in truth.values()}) < len(truth)  # some lesions have several images
    for seed in range(4):
        b = build_data(_cfg(tmp_path, split_seed=seed, val_fraction=0.2, test_fraction=0.2))
        assert b.class_names == ISIC_CLASSES
        owner: dict[str, str] = {}
        n = 0
        for s in ("train", "val", "test"):
            arr = b.split(s)
            n += len(arr)
            assert arr.images.shape[1:] == (16, 16, 3)
            for image, y in zip(arr.ids, arr.labels):
                assert truth[image][0] == y
                assert owner.setdefault(truth[image][1], s) == s, "a lesion is in two splits"
        assert n == len(truth) and len(b.test) > 0
        assert set(b.train.labels.tolist()) == set(range(7))
        assert b.extra["lesions"] == len({les for _, les in truth.values()})


def test_images_folder_and_no_metadata(tmp_path: Path) -> None:
    _make_isic(tmp_path, image_dir="images", metadata=False)
    b = build_data(_cfg(tmp_path))
    assert sum(len(b.split(s)) for s in ("train", "val", "test")) == 28 and "lesions" not in b.extra


def test_images_anywhere_under_root(tmp_path: Path) -> None:
    _make_isic(tmp_path, image_dir="HAM10000_images_part_1")
    b = build_data(_cfg(tmp_path))
    assert sum(len(b.split(s)) for s in ("train", "val", "test")) == 28


def test_bad_one_hot_row_is_named(tmp_path: Path) -> None:
    _make_isic(tmp_path)
    gt = tmp_path / "ISIC2018_Task3_Training_GroundTruth.csv"
    lines = gt.read_text().splitlines()
    lines[3] = lines[3].split(",")[0] + ",1.0,1.0,0.0,0.0,0.0,0.0,0.0"
    gt.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"row 4 \(ISIC_0000002\).*exactly one 1"):
        build_data(_cfg(tmp_path))
    lines[3] = lines[3].split(",")[0] + ",0,0,0,0,0,0,0"
    gt.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="row 4"):
        build_data(_cfg(tmp_path))


def test_missing_image_and_missing_columns(tmp_path: Path) -> None:
    _make_isic(tmp_path)
    (tmp_path / "ISIC2018_Task3_Training_Input" / "ISIC_0000005.jpg").unlink()
    with pytest.raises(DataError, match=r"row 7.*ISIC_0000005"):
        build_data(_cfg(tmp_path))
    gt = tmp_path / "ISIC2018_Task3_Training_GroundTruth.csv"
    gt.write_text("image,MEL,NV\nISIC_0000000,1,0\n")
    with pytest.raises(
        DataError, match=r"missing column\(s\) \['BCC', 'AKIEC', 'BKL', 'DF', 'VASC'\]"
    ):
        build_data(_cfg(tmp_path))
    gt.unlink()
    with pytest.raises(DataError, match="GroundTruth.csv not found"):
        build_data(_cfg(tmp_path))
