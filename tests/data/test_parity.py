"""Train/serve parity: for every layout, a file gives the network the same numbers in training and in predict.

Training path: the reader's stored uint8 array -> ``DiffMICModule._inputs`` (uint8 / 255, normalise).
Predict paths: ``DiffMIC.preprocess`` of the PIL image (``predict_proba``, ``explain``), of
``images.load_image`` (the CLI), and ``diffmic predict`` itself. Max abs difference must be 0.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES
from PIL import Image

from diffmic import load_model, save_model
from diffmic.config import DiffMICConfig
from diffmic.data.registry import build_data
from diffmic.images import ImageSpec, load_image
from diffmic.models import DiffMIC
from diffmic.training.module import DiffMICModule

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16
H, W = 30, 40  # non-square: the centre-crop layouts drop a border


# ----------------------------------------------------------------------------- case images
def _rgb(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, W)[None, :, None] * np.ones((H, 1, 3))  # a ramp: cropping changes it
    return np.clip(base + rng.integers(-40, 40, (H, W, 3)), 0, 255).astype(np.uint8)


def case_rgb8(path: Path) -> Path:
    p = path.with_suffix(".png")
    Image.fromarray(_rgb(1)).save(p)
    return p


def case_gray16(path: Path) -> Path:
    """12-bit data in a 16-bit PNG (the measured skew: /65535 in training, /max in the old predict)."""
    p = path.with_suffix(".png")
    arr = (np.linspace(0, 4095, W)[None, :] * np.ones((H, 1))).astype(np.uint16)
    Image.fromarray(arr).save(p)
    with Image.open(p) as im:
        assert im.mode.startswith("I")
    return p


def case_rgba(path: Path) -> Path:
    p = path.with_suffix(".png")
    alpha = np.full((H, W, 1), 90, np.uint8)
    Image.fromarray(np.concatenate([_rgb(2), alpha], axis=2), mode="RGBA").save(p)
    return p


def case_palette(path: Path) -> Path:
    p = path.with_suffix(".png")
    Image.fromarray(_rgb(3)).convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(p)
    with Image.open(p) as im:
        assert im.mode == "P"
    return p


def case_exif_jpeg(path: Path) -> Path:
    """A JPEG whose EXIF orientation (6: rotate 90° clockwise) makes it portrait."""
    p = path.with_suffix(".jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_rgb(4)).save(p, exif=exif.tobytes(), quality=95)
    return p


CASES = {f.__name__[5:]: f for f in (case_rgb8, case_gray16, case_rgba, case_palette, case_exif_jpeg)}


def _filler(path: Path, seed: int) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)


# --------------------------------------------------------------------------------- layouts
# Each: (root, case) -> (data.path, data.format, id of the case image in the bundle, its file).
def layout_folder(root: Path, case) -> tuple[Path, str, str, Path]:
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            _filler(root / c / f"f{i}.png", hash((c, i)) % 1000)
    f = case(root / "a" / "case")
    return root, "folder", f"a/{f.name}", f


def layout_csv(root: Path, case) -> tuple[Path, str, str, Path]:
    (root / "imgs").mkdir(parents=True)
    rows = ["path,label,split"]
    for i in range(6):
        _filler(root / "imgs" / f"f{i}.png", i)
        rows.append(f"imgs/f{i}.png,{i % 2},{['train', 'val', 'test'][i % 3]}")
    f = case(root / "imgs" / "case")
    rows.append(f"imgs/{f.name},0,train")
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    return root / "m.csv", "csv", f"imgs/{f.name}", f


def layout_isic2018(root: Path, case) -> tuple[Path, str, str, Path]:
    from diffmic.data.isic import GROUND_TRUTH, ISIC_CLASSES

    d = root / "ISIC2018_Task3_Training_Input"
    d.mkdir(parents=True)
    rows = ["image," + ",".join(ISIC_CLASSES)]
    for i in range(28):
        _filler(d / f"ISIC_{i:07d}.png", i)
        rows.append(f"ISIC_{i:07d}," + ",".join("1.0" if k == i % 7 else "0.0" for k in range(7)))
    f = case(d / "ISIC_9999999")
    rows.append("ISIC_9999999," + ",".join("1.0" if k == 0 else "0.0" for k in range(7)))
    (root / GROUND_TRUTH).write_text("\n".join(rows) + "\n")
    return root, "isic2018", "ISIC_9999999", f


def layout_aptos2019(root: Path, case) -> tuple[Path, str, str, Path]:
    d = root / "train_images"
    d.mkdir(parents=True)
    rows = ["id_code,diagnosis"]
    for i in range(20):
        _filler(d / f"u{i:03d}.png", i)
        rows.append(f"u{i:03d},{i % 5}")
    f = case(d / "case")
    rows.append("case,0")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root, "aptos2019", "case", f


def layout_pickle(root: Path, case) -> tuple[Path, str, str, Path]:
    (root / "images").mkdir(parents=True)
    train, test = [], []
    for i in range(16):
        _filler(root / "images" / f"f{i}.png", i)
        (train if i < 12 else test).append({"img_root": f"images/f{i}.png", "label": i % 2})
    f = case(root / "images" / "case")
    train.append({"img_root": f"images/{f.name}", "label": 0})
    (root / "x_train.pkl").write_bytes(pickle.dumps(train))
    (root / "x_test.pkl").write_bytes(pickle.dumps(test))
    return root, "pickle", f"images/{f.name}", f


LAYOUTS = {f.__name__[7:]: f for f in (layout_folder, layout_csv, layout_isic2018, layout_aptos2019, layout_pickle)}
CROP = {"folder": False, "csv": False, "isic2018": True, "aptos2019": True, "pickle": True}


# ------------------------------------------------------------------------------- helpers
def _cfg(path: Path, fmt: str, *extra: str) -> DiffMICConfig:
    return DiffMICConfig.from_yaml(None, [f"data.path={path}", f"data.format={fmt}", f"data.image_size={SIZE}",
                                          "data.mean=[0.4,0.5,0.6]", "data.std=[0.2,0.25,0.3]", *TINY_OVERRIDES,
                                          *extra])


def _module(cfg: DiffMICConfig, data) -> DiffMICModule:
    torch.manual_seed(0)
    args = {"num_classes": data.num_classes, "in_chans": data.channels, "image_size": data.image_size,
            "class_names": list(data.class_names)}
    return DiffMICModule(cfg.to_dict(), args).eval()


def _stored(data, image_id: str) -> np.ndarray:
    for name in ("train", "val", "test"):
        split = data.split(name)
        if image_id in (split.ids or []):
            return split.images[split.ids.index(image_id)]
    raise AssertionError(f"{image_id} not in the bundle")


def _training_input(module: DiffMICModule, stored: np.ndarray) -> torch.Tensor:
    return module._inputs(torch.from_numpy(stored[None]).permute(0, 3, 1, 2), train=False)


def _assert_identical(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape)
    assert (a - b).abs().max().item() == 0.0


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(layout, case) -> (module, data, image id, file), built once per pair."""
    cache: dict = {}

    def get(layout: str, case: str, *extra: str):
        key = (layout, case, extra)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{layout}_{case}")
            path, fmt, image_id, f = LAYOUTS[layout](root, CASES[case])
            cfg = _cfg(path, fmt, *extra)
            data = build_data(cfg.data)
            cache[key] = (_module(cfg, data), data, image_id, f)
        return cache[key]

    return get


# --------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_file_gives_training_pixels_to_predict(built, layout, case):
    module, data, image_id, f = built(layout, case)
    model = module.model
    assert model.image_spec.center_crop is CROP[layout]
    stored = _stored(data, image_id)
    assert stored.shape == (SIZE, SIZE, 3) and stored.dtype == np.uint8
    train_x = _training_input(module, stored)
    with Image.open(f) as im:
        _assert_identical(model.preprocess(im), train_x)  # predict_proba / explain on a PIL image
    _assert_identical(model.preprocess(load_image(f, model.image_spec)), train_x)  # the CLI's reading
    # the crop is really applied by the centre-crop layouts (and not by the others)
    other = ImageSpec(SIZE, 3, not CROP[layout])
    assert not np.array_equal(load_image(f, other), stored)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_grey_model_parity(built, layout):
    module, data, image_id, f = built(layout, "rgb8", "data.channels=1", "data.mean=[0.5]", "data.std=[0.5]")
    assert module.model.in_chans == 1
    stored = _stored(data, image_id)
    with Image.open(f) as im:
        _assert_identical(module.model.preprocess(im), _training_input(module, stored))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_cli_predict_feeds_the_training_tensor(built, layout, tmp_path, monkeypatch, capsys):
    """``diffmic predict`` on the file: the tensor reaching the network is the training one."""
    from diffmic.cli import main

    module, data, image_id, f = built(layout, "gray16")
    ckpt = tmp_path / "model.pt"
    save_model(module.model, ckpt)
    seen = []
    real = DiffMIC.preprocess

    def spy(self, images):
        x = real(self, images)
        seen.append(x)
        return x

    monkeypatch.setattr(DiffMIC, "preprocess", spy)
    code = main(["predict", "--checkpoint", str(ckpt), str(f), "--out", str(tmp_path / "p.csv")])
    assert code == 0, capsys.readouterr().err
    assert len(seen) == 1
    _assert_identical(seen[0], _training_input(module, _stored(data, image_id)))


def test_16bit_mean_is_the_training_mean(built):
    """The measured skew: a 12-bit PNG had mean 0.032 in training and 0.594 in predict."""
    module, data, image_id, f = built("folder", "gray16")
    stored = _stored(data, image_id)
    expected = np.linspace(0, 4095, W).mean() / 65535
    assert abs(stored.mean() / 255 - expected) < 0.002
    x01 = module.model.preprocess(load_image(f, module.model.image_spec)) * module.model.std + module.model.mean
    assert abs(x01.mean().item() - expected) < 0.002


def test_uint16_array_equals_its_16bit_png(built):
    module, data, image_id, f = built("folder", "gray16")
    with Image.open(f) as im:
        arr = np.asarray(im).astype(np.uint16)
    assert arr.max() == 4095
    _assert_identical(module.model.preprocess(arr), _training_input(module, _stored(data, image_id)))
    _assert_identical(module.model.preprocess(torch.from_numpy(arr.astype(np.int32)).to(torch.uint16)[None]),
                      module.model.preprocess(arr))


def test_medmnist_arrays_and_pngs(tmp_path):
    """data.format=medmnist, resized: the npz array, its PNG and the stored array agree."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (4, 20, 20, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.arange(4)[:, None] % 2
    np.savez(tmp_path / "d.npz", **arrays)
    cfg = _cfg(tmp_path / "d.npz", "medmnist")
    data = build_data(cfg.data)
    module = _module(cfg, data)
    assert module.model.image_spec.center_crop is False
    raw = arrays["train_images"][1]
    Image.fromarray(raw).save(tmp_path / "x.png")
    train_x = _training_input(module, data.train.images[1])
    _assert_identical(module.model.preprocess(raw), train_x)
    _assert_identical(module.model.preprocess(load_image(tmp_path / "x.png", module.model.image_spec)), train_x)


def test_old_checkpoint_without_spec_derives_it_from_the_config(built, tmp_path):
    module, *_ = built("isic2018", "rgb8")
    path = tmp_path / "m.pt"
    save_model(module.model, path)
    payload = torch.load(path, weights_only=True)
    assert ImageSpec.from_dict(payload["model_args"]["image_spec"]) == module.model.image_spec
    del payload["model_args"]["image_spec"]  # what the previous version wrote
    torch.save(payload, tmp_path / "old.pt")
    old = load_model(tmp_path / "old.pt")
    assert old.image_spec == module.model.image_spec and old.image_spec.center_crop


def test_checkpoint_with_a_tampered_spec_is_one_clear_error(built, tmp_path):
    from diffmic.errors import CheckpointError

    module, *_ = built("isic2018", "rgb8")
    save_model(module.model, tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["model_args"]["image_spec"]["size"] = SIZE + 1
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt.*image_spec"):
        load_model(tmp_path / "bad.pt")
    payload["model_args"]["image_spec"] = {"size": SIZE}
    torch.save(payload, tmp_path / "bad2.pt")
    with pytest.raises(CheckpointError, match="bad2.pt: invalid image_spec"):
        load_model(tmp_path / "bad2.pt")
