"""benchmarks/guidance_scale.py: the guided mean path against the model's own, and a smoke run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES, load_benchmark, shared_file


def _model(skip_out_zero: bool):
    from diffmic.config import DiffMICConfig
    from diffmic.models import build_model

    cfg = DiffMICConfig.from_yaml(None, [f"data.path={shared_file('breastmnist.npz')}", *TINY_OVERRIDES,
                                         "model.denoiser_skip=true", "train.image_dropout=0.2"])
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=2, in_chans=1, image_size=28, class_names=["malignant", "benign"])
    if not skip_out_zero:  # a denoiser whose image path matters
        with torch.no_grad():
            for p in model.denoiser.out.parameters():
                p.normal_(0, 0.5)
    return model.eval()


@pytest.mark.usefixtures("one_thread")
def test_guided_mean_path_interpolates_the_image_and_image_free_paths() -> None:
    from diffmic.diffusion.sampling import sample_mean_path

    mod = load_benchmark("guidance_scale")
    model = _model(skip_out_zero=False)
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        guide = model.guidance(model.normalize(x))
        prior = guide.logits.softmax(1)
        feats = model.encode(model.normalize(x), guide)
        torch.testing.assert_close(mod.guided_mean_path(model, feats, prior, 1.0), model.mean_path(feats, prior))
        ones = torch.ones_like(feats)
        free = sample_mean_path(model.schedule, lambda y, t: model.denoiser.denoise(ones, y, prior, t), prior,
                                model.sampling_steps)
        torch.testing.assert_close(mod.guided_mean_path(model, feats, prior, 0.0), free)
        assert not torch.allclose(mod.guided_mean_path(model, feats, prior, 2.0), model.mean_path(feats, prior))


@pytest.mark.usefixtures("one_thread")
def test_untrained_skip_denoiser_gives_the_prior_at_every_scale(tmp_path: Path) -> None:
    from diffmic.models import save_model

    ckpt = tmp_path / "model.pt"
    save_model(_model(skip_out_zero=True), ckpt)
    out = tmp_path / "g.json"
    assert load_benchmark("guidance_scale").main([str(ckpt), "--scales", "0", "1", "2", "--out", str(out)]) == 0
    (entry,) = json.loads(out.read_text())["models"].values()
    assert entry["image_dropout"] == 0.2
    r = entry["readouts"]
    assert set(r) == {"prior", "s=0", "s=1", "s=2"}
    for name in ("s=0", "s=2"):  # zero residual in, zero noise out: y_0 = prior whatever s is
        assert r[name] == r["s=1"]
    for split in ("val", "test"):  # the same classes and ranking as the prior (scored as log ŷ: up to float ties)
        assert r["s=1"][split]["acc"] == r["prior"][split]["acc"]
        assert r["s=1"][split]["auroc"] == pytest.approx(r["prior"][split]["auroc"], abs=2e-3)


def test_a_missing_model_is_one_error_line(tmp_path: Path, capsys) -> None:
    assert load_benchmark("guidance_scale").main([str(tmp_path / "nope.pt")]) == 1
    assert "guidance_scale: error:" in capsys.readouterr().err
