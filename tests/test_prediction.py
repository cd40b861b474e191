"""``diffmic.prediction``'s engine choice: which engine ``auto`` means, and that the fused engine
predicts what the eager model predicts (through the API and through ``diffmic predict``)."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch
from conftest import bn_model as make_model
from PIL import Image

from diffmic import load_model
from diffmic.cli import main
from diffmic.config import DiffMICConfig
from diffmic.errors import ConfigError
from diffmic.models import build_model, save_model
from diffmic.prediction import for_inference, resolve_engine

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("size,engine,expected", [
    (28, "auto", "fused"), (64, "auto", "fused"), (96, "auto", "fused"),
    (28, "eager", "eager"), (96, "eager", "eager"),
])
def test_resolve_engine(size, engine, expected):
    cfg = DiffMICConfig.from_yaml(None, ["data.path=x", "model.backbone=test_resnet",
                                         "model.denoiser_backbone=test_resnet", "model.feature_dim=16"])
    model = build_model(cfg, num_classes=2, in_chans=1, image_size=size)
    assert resolve_engine(model, engine) == expected
    with pytest.raises(ConfigError, match="unknown engine 'onnx'.*auto, eager, fused"):
        resolve_engine(model, "onnx")


def test_for_inference_fused_matches_eager():
    model = make_model()  # BatchNorm statistics away from their defaults
    x = torch.rand(5, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    ref = model.predict_details(x, samples=4, generator=torch.Generator().manual_seed(0))
    eager = for_inference(model, "eager")
    assert eager is model and not model.inference_only
    fused = for_inference(model, "fused")
    assert fused is model and model.inference_only  # folded in place: one model in memory
    assert for_inference(model, "fused") is model  # folding twice is a no-op
    out = fused.predict_details(x, samples=4, generator=torch.Generator().manual_seed(0))
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-5)


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_cli_engines_agree(tmp_path):
    model = make_model(num_classes=3)
    model.class_names = ["a", "b", "c"]
    save_model(model, tmp_path / "model.pt")
    assert not load_model(tmp_path / "model.pt").inference_only
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
    tables = {}
    for engine in ("eager", "fused", "auto"):
        out = tmp_path / f"{engine}.csv"
        assert main(["predict", "--checkpoint", str(tmp_path / "model.pt"), *sorted(map(str, tmp_path.glob("im*.png"))),
                     "--samples", "3", "--engine", engine, "--out", str(out)]) == 0
        tables[engine] = _rows(out.read_text())
    assert tables["auto"] == tables["fused"]  # auto folds BatchNorm at every size
    eager, fused = tables["eager"], tables["fused"]
    assert [r["path"] for r in fused] == [r["path"] for r in eager] and len(eager) == 6
    for a, b in zip(fused, eager, strict=True):
        assert a["prediction"] == b["prediction"] or abs(float(a["p_a"]) - float(b["p_a"])) < 1e-4
        for key in a:
            if key.startswith("p_"):
                assert abs(float(a[key]) - float(b[key])) < 1e-4, (key, a[key], b[key])


def test_cli_rejects_an_unknown_engine(tmp_path, capsys):
    assert main(["predict", "--checkpoint", str(tmp_path / "model.pt"), str(tmp_path), "--engine", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "argument --engine: invalid choice: 'onnx'" in err and len(err.strip().splitlines()) == 1
