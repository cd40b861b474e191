"""MedMNIST by name: ``data.path: breastmnist`` finds the file, carries the class names and the task."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmic import save_model
from diffmic.cli import main
from diffmic.config import DataConfig, DiffMICConfig
from diffmic.data import medmnist_info
from diffmic.data.medmnist_info import TABLE, parse_flag, resolve_medmnist
from diffmic.data.medmnist_info import medmnist_info as info_of
from diffmic.data.registry import build_data
from diffmic.errors import DataError

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
README = Path(os.environ.get("DIFFMIC_SHARED_DATA", SHARED)) / "README.md"


def _npz(path: Path, size: int = 28, channels: int = 1, classes: int = 2, n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    shape = (n, size, size) if channels == 1 else (n, size, size, channels)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % classes).astype(np.uint8)[:, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


@pytest.fixture
def where(tmp_path, monkeypatch):
    """An isolated world: cwd with no ../shared/data, HOME without ~/.medmnist, MEDMNIST_ROOT unset."""
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("MEDMNIST_ROOT", raising=False)
    return {"root": tmp_path / "mroot", "home": home / ".medmnist", "shared": tmp_path / "a" / "shared" / "data"}


def test_parse_flag():
    assert parse_flag("breastmnist") == ("breastmnist", 28)
    assert parse_flag("retinamnist_64") == ("retinamnist", 64)
    assert parse_flag("PneumoniaMNIST_224") == ("pneumoniamnist", 224)
    assert parse_flag("organamnist_128") == ("organamnist", 128)
    for not_a_flag in ("breastmnist.npz", "data/breastmnist", "./breastmnist", "/x/retinamnist_64", "mydata",
                       "runs", "", "breastmnist_64.npz"):
        assert parse_flag(not_a_flag) is None, not_a_flag
    with pytest.raises(DataError, match="sizes are 28, 64, 128, 224"):
        parse_flag("breastmnist_32")
    with pytest.raises(DataError, match="3D"):
        parse_flag("nodulemnist3d")


def test_table_has_the_12_2d_datasets_and_matches_the_shared_readme():
    assert len(TABLE) == 12
    assert TABLE["breastmnist"][1:] == ("binary-class", 1, ("malignant", "normal, benign"))
    assert TABLE["pneumoniamnist"][1:] == ("binary-class", 1, ("normal", "pneumonia"))
    assert TABLE["retinamnist"][1:] == ("ordinal-regression", 3, ("0", "1", "2", "3", "4"))
    if README.is_file():
        text = README.read_text()
        assert "breastmnist: 0 = malignant, 1 = normal or benign" in text
        assert "pneumoniamnist: 0 = normal, 1 = pneumonia" in text
        assert "retinamnist: 0..4 = DR grade 0..4" in text


def test_table_matches_installed_medmnist_info():
    medmnist = pytest.importorskip("medmnist", reason="medmnist not installed: the table is the only source")
    for flag, (python_class, task, channels, names) in TABLE.items():
        info = medmnist.INFO[flag]
        assert (info["python_class"], info["task"], info["n_channels"]) == (python_class, task, channels), flag
        assert tuple(info["label"][str(i)] for i in range(len(info["label"]))) == names, flag


def test_table_used_without_the_package(monkeypatch):
    monkeypatch.setattr(medmnist_info, "_medmnist_module", lambda: None)
    info = info_of("breastmnist", 64)
    assert info.class_names == ("malignant", "normal, benign") and info.task == "binary-class"
    assert info.filename == "breastmnist_64.npz" and info_of("breastmnist").filename == "breastmnist.npz"


def test_flag_found_in_medmnist_root(where, monkeypatch):
    _npz(where["root"] / "breastmnist.npz")
    monkeypatch.setenv("MEDMNIST_ROOT", str(where["root"]))
    data = build_data(DataConfig(path="breastmnist"))
    assert data.class_names == ["malignant", "normal, benign"]
    assert Path(data.source) == where["root"] / "breastmnist.npz"
    assert data.extra["medmnist"] == {"flag": "breastmnist", "size": 28, "task": "binary-class"}
    # data.class_names still overrides
    assert build_data(DataConfig(path="breastmnist", class_names=["m", "b"])).class_names == ["m", "b"]


def test_search_order_root_then_home_then_shared(where, monkeypatch):
    for key in ("root", "home", "shared"):
        _npz(where[key] / "pneumoniamnist.npz")
    monkeypatch.setenv("MEDMNIST_ROOT", str(where["root"]))
    assert resolve_medmnist("pneumoniamnist")[0] == where["root"] / "pneumoniamnist.npz"
    monkeypatch.delenv("MEDMNIST_ROOT")
    assert resolve_medmnist("pneumoniamnist")[0] == where["home"] / "pneumoniamnist.npz"
    (where["home"] / "pneumoniamnist.npz").unlink()
    path, info = resolve_medmnist("pneumoniamnist")
    assert path.resolve() == (where["shared"] / "pneumoniamnist.npz").resolve()
    assert info.class_names == ("normal", "pneumonia")


def test_size_suffix_reads_the_sized_file(where, monkeypatch):
    _npz(where["root"] / "retinamnist_64.npz", size=64, channels=3, classes=5, n=10)
    monkeypatch.setenv("MEDMNIST_ROOT", str(where["root"]))
    data = build_data(DataConfig(path="retinamnist_64"))
    assert data.image_size == 64 and data.channels == 3
    assert data.class_names == ["0", "1", "2", "3", "4"]
    assert data.extra["medmnist"]["size"] == 64
    monkeypatch.setattr(medmnist_info, "_medmnist_module", lambda: None)
    with pytest.raises(DataError, match=r"retinamnist\.npz not found"):  # the 28x28 file is another file
        build_data(DataConfig(path="retinamnist"))


def test_a_path_works_as_before(breastmnist):
    data = build_data(DataConfig(path=str(breastmnist)))
    assert data.class_names == ["0", "1"] and "medmnist" not in data.extra


def test_missing_without_the_package_is_one_line_naming_the_folders(where, monkeypatch, capsys):
    monkeypatch.setattr(medmnist_info, "_medmnist_module", lambda: None)
    with pytest.raises(DataError) as exc:
        build_data(DataConfig(path="breastmnist"))
    msg = str(exc.value)
    assert "\n" not in msg and "breastmnist.npz not found" in msg
    assert "$MEDMNIST_ROOT (unset)" in msg and str(where["home"]) in msg
    assert str(Path("..") / "shared" / "data") in msg and "pip install medmnist" in msg
    code = main(["train", "--config", "configs/tiny.yaml", "--data", "breastmnist"]
                if Path("configs/tiny.yaml").is_file() else ["train", "--data", "breastmnist"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("diffmic: error: ") and len(err.strip().splitlines()) == 1
    assert "pip install medmnist" in err


def _offline(monkeypatch):
    import torchvision.datasets.utils as tvu

    def refuse(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(tvu, "download_url", refuse)


def test_missing_offline_with_the_package_is_one_line_with_the_url(where, monkeypatch):
    pytest.importorskip("medmnist", reason="medmnist not installed: nothing to download with")
    monkeypatch.setenv("MEDMNIST_ROOT", str(where["root"]))
    _offline(monkeypatch)
    with pytest.raises(DataError) as exc:
        resolve_medmnist("breastmnist_64")
    msg = str(exc.value)
    assert "\n" not in msg and "could not download" in msg
    assert "zenodo.org" in msg and "breastmnist_64.npz" in msg and str(where["root"]) in msg
    assert not (where["root"] / "breastmnist_64.npz").exists()


def test_download_uses_medmnist_into_medmnist_root(where, monkeypatch, capsys):
    pytest.importorskip("medmnist", reason="medmnist not installed: nothing to download with")
    import torchvision.datasets.utils as tvu

    calls = []

    def fake_download(url, root, filename, md5):  # stands in for the network: writes the file
        calls.append((url, Path(root), filename, md5))
        _npz(Path(root) / filename)

    monkeypatch.setattr(tvu, "download_url", fake_download)
    monkeypatch.setenv("MEDMNIST_ROOT", str(where["root"]))
    path, info = resolve_medmnist("breastmnist")
    assert info.flag == "breastmnist" and path == where["root"] / "breastmnist.npz" and path.is_file()
    (url, root, filename, md5), = calls
    assert root == where["root"] and filename == "breastmnist.npz" and "zenodo" in url and md5
    assert "downloading it with medmnist" in capsys.readouterr().err
    # found the second time: no second download
    assert resolve_medmnist("breastmnist")[0] == path and len(calls) == 1


def test_multilabel_flag_is_refused_before_any_download(where, monkeypatch):
    monkeypatch.setenv("MEDMNIST_ROOT", str(where["root"]))
    with pytest.raises(DataError, match="multi-label"):
        resolve_medmnist("chestmnist")
    assert not where["root"].exists()


def test_class_names_reach_the_predict_csv(where, monkeypatch, tmp_path, capsys):
    from conftest import TINY_OVERRIDES

    from diffmic.models import build_model

    _npz(where["root"] / "breastmnist.npz")
    monkeypatch.setenv("MEDMNIST_ROOT", str(where["root"]))
    cfg = DiffMICConfig.from_yaml(None, ["data.path=breastmnist", *TINY_OVERRIDES])
    data = build_data(cfg.data)
    model = build_model(cfg, num_classes=data.num_classes, in_chans=data.channels, image_size=data.image_size,
                        class_names=data.class_names)
    ckpt = tmp_path / "model.pt"
    save_model(model, ckpt)
    image = tmp_path / "x.png"
    Image.fromarray(data.test.images[0, :, :, 0]).save(image)
    assert main(["predict", "--checkpoint", str(ckpt), str(image)]) == 0
    header = next(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert header[:4] == ["path", "prediction", "p_malignant", "p_normal, benign"]
    assert "low_malignant" in header and "high_normal, benign" in header
