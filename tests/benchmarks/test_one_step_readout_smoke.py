"""benchmarks/one_step_readout.py on an untrained skip denoiser: every readout is the prior's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES, load_benchmark, shared_file


@pytest.mark.usefixtures("one_thread")
def test_untrained_skip_denoiser_reads_out_the_prior(tmp_path: Path) -> None:
    from diffmic.config import DiffMICConfig
    from diffmic.models import build_model, save_model

    cfg = DiffMICConfig.from_yaml(None, [f"data.path={shared_file('breastmnist.npz')}", *TINY_OVERRIDES,
                                         "model.denoiser_skip=true"])
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=2, in_chans=1, image_size=28, class_names=["malignant", "benign"])
    ckpt = tmp_path / "model.pt"
    save_model(model, ckpt)
    out = tmp_path / "r.json"
    assert load_benchmark("one_step_readout").main([str(ckpt), "--splits", "val", "--timesteps", "99", "50", "0",
                                                    "--chains", "2", "--vote-chains", "4", "--out", str(out)]) == 0
    (per_split,) = json.loads(out.read_text())["models"].values()
    r = per_split["val"]
    assert set(r) == {"prior", "mean_path", "chains_mean_y0", "one_step_99", "one_step_50", "one_step_0",
                      "vote_random_4", "vote_qmc_4", "mean_qmc_4"}
    # zero residual in, the MMSE skip predicts zero noise: y_0 = prior, so ACC and (binary) AUROC match it
    for name in ("mean_path", "one_step_99", "one_step_50", "one_step_0"):
        assert r[name] == r["prior"], name
    # the skip denoiser maps the starting noise z linearly, y_0 = ŷ + k·z with the same k for every
    # image and class (it is the exact ε of r_0 ~ N(0, I/C)); so the mean of softmax(y_0 / T) over
    # fixed points is increasing in ŷ_1 − ŷ_0 and ranks the images as the prior does
    assert r["mean_qmc_4"]["auroc"] == r["prior"]["auroc"]
    mod = load_benchmark("one_step_readout")
    model.eval()
    with torch.no_grad():
        x = model.normalize(torch.rand(5, 1, 28, 28))
        guide = model.guidance(x)
        prior = guide.logits.softmax(1)
        z = mod.qmc_normal(4, 2)
        y0 = mod.chain_y0(model, model.encode(x, guide), prior, z)
    assert y0.shape == (4, 5, 2)
    k = (y0 - prior) / z[:, None, :]
    assert torch.allclose(k, k.flatten()[0].expand_as(k), rtol=1e-4)
    assert 0.5 < float(k.flatten()[0]) / 0.5**0.5 < 1.5  # close to the exact flow's sqrt(1/C)


def test_qmc_points_are_normal_and_chains_start_where_asked() -> None:
    mod = load_benchmark("one_step_readout")
    z = mod.qmc_normal(1024, 3)
    assert z.shape == (1024, 3)
    assert z.mean(0).abs().max() < 0.02 and (z.std(0) - 1).abs().max() < 0.02  # QMC: far tighter than 1/sqrt(n)
    y0 = torch.tensor([[[0.1, 0.9], [0.6, 0.4]], [[0.7, 0.3], [0.2, 0.8]], [[0.0, 1.0], [0.9, 0.1]]])
    assert torch.allclose(mod.vote_fractions(y0), torch.tensor([[1 / 3, 2 / 3], [2 / 3, 1 / 3]]))


def test_bad_timestep_is_one_line(tmp_path: Path, tiny_checkpoint, capsys) -> None:
    ckpt, _ = tiny_checkpoint
    # the tiny schedule has 100 steps
    assert load_benchmark("one_step_readout").main([str(ckpt), "--timesteps", "100"]) == 1
    assert "--timesteps [100]" in capsys.readouterr().err


def test_path_residual_measures_moves_towards_the_label() -> None:
    mod = load_benchmark("one_step_readout")
    prior = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    labels = torch.tensor([0, 2])
    toward = prior + torch.tensor([[0.2, -0.1, -0.1], [-0.1, -0.1, 0.2]])  # +0.2 on the label, -0.1 elsewhere
    r = mod.path_residual(prior, toward, labels)
    assert r["toward_label"] == pytest.approx(0.3) and r["mean_abs"] == pytest.approx(0.4 / 3, abs=1e-4)
    # the same move for every image, whatever its label, with unequal class counts: exactly 0
    prior = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    labels = torch.tensor([0, 1, 1])
    r = mod.path_residual(prior, prior + torch.tensor([-0.1, 0.1]), labels)
    assert r["sd"] == 0.0 and r["toward_label"] == pytest.approx(0.0, abs=1e-6)
