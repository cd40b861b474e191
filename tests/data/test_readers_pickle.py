"""data.format=pickle: the original DiffMIC split lists, read with a restricted unpickler."""

from __future__ import annotations

import collections
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmic.config import DataConfig
from diffmic.data.pickle_split import safe_load_pickle
from diffmic.data.registry import build_data
from diffmic.errors import DataError


def _make_repo(repo: Path, n_train: int = 24, n_test: int = 8) -> tuple[list[dict], list[dict]]:
    """Original layout: <repo>/dataset/isic2018/{images/*.jpg, *_train.pkl, *_test.pkl}."""
    rng = np.random.default_rng(0)
    data = repo / "dataset" / "isic2018"
    (data / "images").mkdir(parents=True)
    train, test = [], []
    for i in range(n_train + n_test):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
            data / "images" / f"img{i}.jpg"
        )
        entry = {"img_root": f"./dataset/isic2018/images/img{i}.jpg", "label": i % 3}
        (train if i < n_train else test).append(entry)
    (data / "isic2018_train.pkl").write_bytes(pickle.dumps(train))
    (data / "isic2018_test.pkl").write_bytes(pickle.dumps(test))
    return train, test


def _cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(format="pickle", path=str(path), image_size=16, **kw)


def test_train_test_lists_round_trip_and_val_carved(tmp_path: Path) -> None:
    train, test = _make_repo(tmp_path)
    b = build_data(_cfg(tmp_path / "dataset" / "isic2018", val_fraction=0.25))
    assert b.class_names == ["0", "1", "2"]
    assert b.test.ids == [e["img_root"] for e in test]
    assert b.test.labels.tolist() == [e["label"] for e in test]
    assert sorted(b.train.ids + b.val.ids) == sorted(e["img_root"] for e in train)
    assert len(b.val) == 6 and np.bincount(b.val.labels).tolist() == [2, 2, 2]
    label_of = {e["img_root"]: e["label"] for e in train + test}
    for s in ("train", "val", "test"):
        assert [label_of[i] for i in b.split(s).ids] == b.split(s).labels.tolist()
    # the images really are the listed files (centre-square crop + resize as the original)
    img = np.asarray(Image.open(tmp_path / "dataset/isic2018/images/img30.jpg"))[:, 5:35]
    want = np.asarray(Image.fromarray(img).resize((16, 16), Image.Resampling.BILINEAR))
    got = b.test.images[b.test.ids.index("./dataset/isic2018/images/img30.jpg")]
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_single_pickle_is_split_and_image_dir_used(tmp_path: Path) -> None:
    train, test = _make_repo(tmp_path)
    single = tmp_path / "lists"
    single.mkdir()
    entries = [
        {"img_root": f"/elsewhere/{os.path.basename(e['img_root'])}", "label": e["label"]}
        for e in train + test
    ]
    (single / "all.pkl").write_bytes(pickle.dumps(entries))
    cfg = _cfg(single, image_dir=str(tmp_path / "dataset" / "isic2018" / "images"))
    b = build_data(cfg)
    assert sum(len(b.split(s)) for s in ("train", "val", "test")) == 32
    assert len(b.test) > 0 and len(b.val) > 0
    b2 = build_data(
        _cfg(single / "all.pkl", image_dir=str(tmp_path / "dataset" / "isic2018" / "images"))
    )
    assert b2.test.ids == b.test.ids


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "lists"
    folder.mkdir()
    (folder / "x_train.pkl").write_bytes(pickle.dumps([{"img_root": "a.png", "label": Evil()}]))
    (folder / "x_test.pkl").write_bytes(pickle.dumps([]))
    with pytest.raises(DataError, match=r"x_train\.pkl.*refusing to load global.*system"):
        build_data(_cfg(folder))
    assert not marker.exists()
    with pytest.raises(DataError, match="refusing"):
        safe_load_pickle(_dump(tmp_path / "od.pkl", collections.OrderedDict(a=1)))
    with pytest.raises(DataError, match="corrupt"):
        safe_load_pickle(_raw(tmp_path / "trunc.pkl", pickle.dumps([1, 2, 3])[:-3]))
    assert safe_load_pickle(
        _dump(tmp_path / "ok.pkl", [{"img_root": "a", "label": 1, "x": (1.5, None, True)}])
    ) == [{"img_root": "a", "label": 1, "x": (1.5, None, True)}]


def _dump(path: Path, obj: object) -> Path:
    path.write_bytes(pickle.dumps(obj))
    return path


def _raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_bad_entries_and_missing_images(tmp_path: Path) -> None:
    _make_repo(tmp_path)
    data = tmp_path / "dataset" / "isic2018"
    train = pickle.loads((data / "isic2018_train.pkl").read_bytes())
    _dump(
        data / "isic2018_train.pkl",
        train + [{"img_root": "./dataset/isic2018/images/ghost.jpg", "label": 0}],
    )
    with pytest.raises(DataError, match=r"isic2018_train\.pkl entry 24.*ghost\.jpg"):
        build_data(_cfg(data))
    _dump(data / "isic2018_train.pkl", train + [{"img_root": "x.jpg"}])
    with pytest.raises(DataError, match="entry 24.*'img_root' and 'label'"):
        build_data(_cfg(data))
    _dump(data / "isic2018_train.pkl", train + [{"img_root": train[0]["img_root"], "label": "mel"}])
    with pytest.raises(DataError, match="entry 24.*integer"):
        build_data(_cfg(data))
    _dump(data / "isic2018_test2.pkl", [])
    _dump(data / "isic2018_train.pkl", train)
    with pytest.raises(DataError, match="several"):
        build_data(_cfg(data))
