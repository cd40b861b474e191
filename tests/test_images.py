"""diffmic.images: the spec, decoding rules, value ranges, folders; and the output check against inputs.

(The train/serve parity per dataset layout is tests/data/test_parity.py.)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffmic._io import check_output_file
from diffmic.errors import ConfigError, DataError
from diffmic.images import (
    ImageSpec,
    list_image_files,
    load_image,
    normalize,
    pil_to_uint8,
    to_batch,
    to_model_input,
)

SPEC = ImageSpec(8, 3, False, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))


def test_spec_round_trip_and_format_rule():
    d = SPEC.to_dict()
    assert d == {"size": 8, "channels": 3, "center_crop": False, "mean": [0.4, 0.5, 0.6],
                 "std": [0.2, 0.25, 0.3]}
    assert ImageSpec.from_dict(d) == SPEC
    for fmt, crop in (("isic2018", True), ("aptos2019", True), ("pickle", True), ("folder", False),
                      ("csv", False), ("medmnist", False)):
        assert ImageSpec.for_format(fmt, size=8, channels=1, mean=[0.5], std=[0.5]).center_crop is crop


@pytest.mark.parametrize("bad, match", [
    ({"size": 0, "channels": 3, "center_crop": False, "mean": [0.5], "std": [0.5]}, "size"),
    ({"size": 8, "channels": 2, "center_crop": False, "mean": [0.5], "std": [0.5]}, "channels"),
    ({"size": 8, "channels": 3, "center_crop": "yes", "mean": [0.5], "std": [0.5]}, "center_crop"),
    ({"size": 8, "channels": 3, "center_crop": False, "mean": [0.5, 0.5], "std": [0.5, 0.5]}, "mean"),
    ({"size": 8, "channels": 1, "center_crop": False, "mean": [0.5], "std": [0.0]}, "std > 0"),
    ({"size": 8, "channels": 1, "center_crop": False, "mean": [0.5]}, "keys"),
    ([8, 1], "mapping"),
])
def test_spec_from_dict_rejects(bad, match):
    with pytest.raises(DataError, match=match):
        ImageSpec.from_dict(bad)


def test_to_model_input_is_the_training_normalisation():
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 8, 8), dtype=np.uint8))
    mean = torch.tensor(SPEC.mean).view(1, 3, 1, 1)
    std = torch.tensor(SPEC.std).view(1, 3, 1, 1)
    expected = (x.float() / 255.0 - mean) / std
    assert (to_model_input(x, SPEC) - expected).abs().max().item() == 0.0
    assert (normalize(x.float() / 255.0, SPEC) - expected).abs().max().item() == 0.0


def test_exif_orientation_is_applied(tmp_path):
    raw = np.zeros((10, 20, 3), np.uint8)
    raw[:, :5] = 255  # a white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90° clockwise: the band ends up on top
    p = tmp_path / "r.jpg"
    Image.fromarray(raw).save(p, exif=exif.tobytes(), quality=100)
    with Image.open(p) as im:
        arr = pil_to_uint8(im)
    assert arr.shape == (20, 10, 3)
    assert arr[:4].mean() > 240 and arr[6:].mean() < 15
    assert load_image(p, ImageSpec(20, 3)).shape == (20, 20, 3)


def test_16bit_is_divided_by_65535_not_by_the_image_maximum(tmp_path):
    p = tmp_path / "g.png"
    Image.fromarray(np.full((4, 4), 4095, np.uint16)).save(p)
    assert load_image(p, ImageSpec(4, 1))[0, 0, 0] == round(4095 * 255 / 65535)
    arr = np.full((4, 4), 4095, np.uint16)
    assert to_batch(arr, ImageSpec(4, 1))[0, 0, 0, 0].item() == round(4095 * 255 / 65535)


@pytest.mark.parametrize("bad, match", [
    (np.full((8, 8, 3), 4095.0, np.float32), r"in \[0, 1\]"),  # raw 12-bit values as floats
    (np.full((8, 8, 3), -0.1, np.float64), r"in \[0, 1\]"),
    (torch.full((1, 3, 8, 8), 2.0), r"in \[0, 1\]"),
    (torch.full((1, 3, 12, 12), 2.0), r"in \[0, 1\]"),
    (np.full((8, 8, 3), 7, np.int64), "dtype int64"),
    (torch.full((1, 3, 8, 8), 7, dtype=torch.int32), "dtype"),
])
def test_values_outside_the_accepted_ranges_are_errors(bad, match):
    with pytest.raises(DataError, match=match):
        to_model_input(to_batch(bad, SPEC), SPEC)


def test_float_nan_tiff_is_named_as_such(tmp_path):
    p = tmp_path / "nan.tiff"
    Image.fromarray(np.full((8, 8), np.nan, np.float32), mode="F").save(p)
    with pytest.raises(DataError, match=r"nan\.tiff.*NaN"):
        load_image(p, SPEC)


def test_list_image_files_sorted_with_the_rest_reported(tmp_path):
    for name in ("b.png", "a.JPG", "c.tif"):
        Image.new("L", (4, 4)).save(tmp_path / name, format="PNG" if name.endswith("png") else None)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "sub" / "d.png")
    images, others = list_image_files(tmp_path)
    assert [p.name for p in images] == ["a.JPG", "b.png", "c.tif"]
    assert [p.name for p in others] == ["notes.txt", "sub"]
    images, others = list_image_files(tmp_path, recursive=True)
    assert [p.relative_to(tmp_path).as_posix() for p in images] == ["a.JPG", "b.png", "c.tif", "sub/d.png"]
    assert [p.name for p in others] == ["notes.txt"]


def test_output_check_refuses_an_input_under_any_name(tmp_path):
    src = tmp_path / "a.png"
    src.write_bytes(b"x")
    os.symlink(src, tmp_path / "link.png")
    for out in (src, tmp_path / "link.png", tmp_path / "." / "a.png"):
        with pytest.raises(ConfigError, match="is an input"):
            check_output_file(Path(out), ConfigError, [src])
    check_output_file(tmp_path / "new.csv", ConfigError, [src])  # a new file is fine
    check_output_file(src, ConfigError, [tmp_path / "other.png"])  # not an input: overwriting is allowed


def test_images_module_sits_below_data_and_models():
    """diffmic.images may import only diffmic.errors and diffmic._io; data and models import it."""
    import ast

    import diffmic.images

    def package_imports(module) -> set[str]:
        tree = ast.parse(Path(module.__file__).read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        return {m for m in names if m.split(".")[0] == "diffmic"}

    assert package_imports(diffmic.images) <= {"diffmic.errors", "diffmic._io"}
    assert "diffmic.errors" in package_imports(diffmic.images)  # the probe sees imports at all
    import diffmic.data.files
    import diffmic.data.medmnist
    import diffmic.models.diffmic

    for user in (diffmic.data.files, diffmic.data.medmnist, diffmic.models.diffmic):
        assert "diffmic.images" in package_imports(user), user.__name__
