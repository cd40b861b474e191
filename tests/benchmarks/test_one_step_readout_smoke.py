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
                                                    "--chains", "2", "--out", str(out)]) == 0
    (per_split,) = json.loads(out.read_text())["models"].values()
    r = per_split["val"]
    assert set(r) == {"prior", "mean_path", "chains_mean_y0", "one_step_99", "one_step_50", "one_step_0"}
    # zero residual in, the MMSE skip predicts zero noise: y_0 = prior, so ACC and (binary) AUROC match it
    for name in ("mean_path", "one_step_99", "one_step_50", "one_step_0"):
        assert r[name] == r["prior"], name


def test_bad_timestep_is_one_line(tmp_path: Path, tiny_checkpoint, capsys) -> None:
    ckpt, _ = tiny_checkpoint
    # the tiny schedule has 100 steps
    assert load_benchmark("one_step_readout").main([str(ckpt), "--timesteps", "100"]) == 1
    assert "--timesteps [100]" in capsys.readouterr().err
