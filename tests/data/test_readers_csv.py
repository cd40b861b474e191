"""data.format=csv: path/label manifest, class names, groups, split column and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmic.config import DataConfig
from diffmic.data.registry import build_data
from diffmic.errors import DataError


def _images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
            folder / f"im{i}.png"
        )
        names.append(f"im{i}.png")
    return names


def _write(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    lines = [",".join(header)] + [",".join(str(x) for x in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(format="csv", path=str(path), image_size=kw.pop("image_size", 12), **kw)


def _all_labels(b) -> dict[str, int]:
    return {
        i: int(y)
        for s in ("train", "val", "test")
        for i, y in zip(b.split(s).ids, b.split(s).labels)
    }


def test_int_labels_relative_to_csv_folder(tmp_path: Path) -> None:
    names = _images(tmp_path / "imgs", 18)
    csv = _write(
        tmp_path / "m.csv", ["path", "label"], [[f"imgs/{n}", i % 3] for i, n in enumerate(names)]
    )
    b = build_data(_cfg(csv))
    assert b.class_names == ["0", "1", "2"]
    assert _all_labels(b) == {f"imgs/{n}": i % 3 for i, n in enumerate(names)}
    assert b.train.images.shape[1:] == (12, 12, 3) and b.train.images.dtype == np.uint8


def test_class_name_labels_image_dir_and_custom_columns(tmp_path: Path) -> None:
    names = _images(tmp_path / "pics", 12)
    labels = ["cat", "dog", "emu"]
    (tmp_path / "meta").mkdir()
    csv = _write(
        tmp_path / "meta" / "m.csv",
        ["file", "dx"],
        [[n, labels[i % 3]] for i, n in enumerate(names)],
    )
    cfg = _cfg(csv, path_column="file", label_column="dx", image_dir=str(tmp_path / "pics"))
    b = build_data(cfg)
    assert b.class_names == ["cat", "dog", "emu"]
    assert _all_labels(b)["im4.png"] == 1
    b2 = build_data(
        _cfg(
            csv,
            path_column="file",
            label_column="dx",
            image_dir=str(tmp_path / "pics"),
            class_names=["emu", "dog", "cat"],
        )
    )
    assert b2.class_names == ["emu", "dog", "cat"] and _all_labels(b2)["im4.png"] == 1
    assert _all_labels(b2)["im0.png"] == 2


def test_unknown_class_name_names_the_row(tmp_path: Path) -> None:
    names = _images(tmp_path, 4)
    csv = _write(
        tmp_path / "m.csv",
        ["path", "label"],
        [[names[0], "a"], [names[1], "b"], [names[2], "zebra"]],
    )
    with pytest.raises(DataError, match=r"row 4.*zebra"):
        build_data(_cfg(csv, class_names=["a", "b"]))


def test_missing_columns_named(tmp_path: Path) -> None:
    csv = _write(tmp_path / "m.csv", ["filename", "y"], [["a.png", 0]])
    with pytest.raises(DataError, match=r"m\.csv.*missing column\(s\) \['path', 'label'\]"):
        build_data(_cfg(csv))
    with pytest.raises(DataError, match=r"missing column\(s\) \['patient'\]"):
        build_data(_cfg(csv, path_column="filename", label_column="y", group_column="patient"))


def test_missing_image_names_file_and_row(tmp_path: Path) -> None:
    names = _images(tmp_path, 2)
    csv = _write(
        tmp_path / "m.csv", ["path", "label"], [[names[0], 0], [names[1], 1], ["gone.png", 0]]
    )
    with pytest.raises(DataError, match=r"row 4.*gone\.png"):
        build_data(_cfg(csv))


def test_empty_class_with_class_names_is_an_error(tmp_path: Path) -> None:
    names = _images(tmp_path, 6)
    csv = _write(
        tmp_path / "m.csv",
        ["path", "label"],
        [[n, "a" if i % 2 else "b"] for i, n in enumerate(names)],
    )
    with pytest.raises(DataError, match=r"\['c'\].*no images"):
        build_data(_cfg(csv, class_names=["a", "b", "c"]))


def test_split_column_is_used_and_val_carved_when_absent(tmp_path: Path) -> None:
    names = _images(tmp_path, 20)
    rows = [
        [n, i % 2, "test" if i < 4 else ("val" if i < 8 else "train")] for i, n in enumerate(names)
    ]
    csv = _write(tmp_path / "m.csv", ["path", "label", "split"], rows)
    b = build_data(_cfg(csv))
    assert sorted(b.test.ids) == sorted(names[:4])
    assert sorted(b.val.ids) == sorted(names[4:8])
    assert sorted(b.train.ids) == sorted(names[8:])
    rows = [[n, i % 2, "test" if i < 4 else "train"] for i, n in enumerate(names)]
    csv = _write(tmp_path / "m2.csv", ["path", "label", "split"], rows)
    b = build_data(_cfg(csv, val_fraction=0.25))
    assert sorted(b.test.ids) == sorted(names[:4])
    assert len(b.val) == 4 and set(b.val.labels.tolist()) == {0, 1}
    assert sorted(b.train.ids + b.val.ids) == sorted(names[4:])
    bad = _write(tmp_path / "m3.csv", ["path", "label", "split"], [[names[0], 0, "holdout"]])
    with pytest.raises(DataError, match="row 2.*holdout"):
        build_data(_cfg(bad))


def test_group_column_keeps_patients_together(tmp_path: Path) -> None:
    names = _images(tmp_path, 30)
    rows = [[n, (i // 3) % 2, f"p{i // 3}"] for i, n in enumerate(names)]
    csv = _write(tmp_path / "m.csv", ["path", "label", "patient"], rows)
    patient = {n: f"p{i // 3}" for i, n in enumerate(names)}
    for seed in range(4):
        b = build_data(
            _cfg(csv, group_column="patient", split_seed=seed, val_fraction=0.2, test_fraction=0.2)
        )
        seen: dict[str, str] = {}
        for s in ("train", "val", "test"):
            for i in b.split(s).ids:
                assert seen.setdefault(patient[i], s) == s
        assert len(b.val) and len(b.test)
