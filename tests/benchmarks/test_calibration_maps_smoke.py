"""benchmarks/calibration_maps.py: the maps' algebra, and an untrained skip denoiser (y_0 = prior)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES, load_benchmark, shared_file


def test_maps_fit_a_known_temperature() -> None:
    mod = load_benchmark("calibration_maps")
    gen = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(4000, 3, generator=gen, dtype=torch.float64)
    labels = torch.multinomial((logits / 2.0).softmax(1), 1, generator=gen).squeeze(1)  # true T = 2
    log_prior = logits.log_softmax(1)
    (log_t,) = mod.fit_map("prior", log_prior, log_prior.exp(), labels, floor=1e-3)
    assert log_t.exp().item() == pytest.approx(2.0, rel=0.1)
    # y_0 = the prior: log_path is the prior's map, prior_residual has nothing to add
    for name in ("log_path", "prior_residual"):
        t = mod.fit_map(name, log_prior, log_prior.exp(), labels, floor=1e-12)
        assert t[0].exp().item() == pytest.approx(log_t.exp().item(), rel=1e-3), name
    with pytest.raises(ValueError, match="unknown map"):
        mod.map_logits("nope", log_t.view(1), log_prior, log_prior.exp(), floor=1e-3)


def test_out_of_fold_nll_is_not_below_in_sample() -> None:
    mod = load_benchmark("calibration_maps")
    gen = torch.Generator().manual_seed(1)
    log_prior = torch.randn(300, 2, generator=gen, dtype=torch.float64).log_softmax(1)
    y0 = log_prior.exp() + 0.3 * torch.randn(300, 2, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 2, (300,), generator=gen)
    for name in mod.MAPS:
        t = mod.fit_map(name, log_prior, y0, labels, floor=1e-3)
        nll = torch.nn.functional.cross_entropy(mod.map_logits(name, t, log_prior, y0, floor=1e-3), labels).item()
        assert mod.out_of_fold_nll(name, log_prior, y0, labels, folds=5, floor=1e-3) >= nll - 1e-9, name


@pytest.mark.usefixtures("one_thread")
def test_untrained_skip_denoiser_maps_equal_the_prior(tmp_path: Path) -> None:
    from diffmic.config import DiffMICConfig
    from diffmic.models import build_model, save_model

    cfg = DiffMICConfig.from_yaml(None, [f"data.path={shared_file('breastmnist.npz')}", *TINY_OVERRIDES,
                                         "model.denoiser_skip=true"])
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=2, in_chans=1, image_size=28, class_names=["malignant", "benign"])
    ckpt = tmp_path / "model.pt"
    save_model(model, ckpt)
    out = tmp_path / "r.json"
    mod = load_benchmark("calibration_maps")
    assert mod.main([str(ckpt), "--folds", "3", "--out", str(out)]) == 0
    (maps,) = json.loads(out.read_text())["models"].values()
    assert set(maps) == set(mod.MAPS)
    # y_0 = ŷ (to float32 rounding): the log-space map and the residual map are the prior's own
    # temperature scaling. The untrained prior carries no signal, so its fitted T sits at the bound and
    # the scores differ by ~1e-8: AUROC is compared only where the logits are the same tensor.
    for name in ("log_path", "prior_residual"):
        for key in ("val_nll", "test_nll", "test_ece", "test_acc"):
            assert maps[name][key] == pytest.approx(maps["prior"][key], abs=2e-4), (name, key)
    assert maps["log_path"]["test_auroc"] == maps["prior"]["test_auroc"]
    assert maps["log_path"]["temperatures"] == pytest.approx(maps["prior"]["temperatures"], rel=1e-4)
    assert maps["path"]["test_acc"] == maps["prior"]["test_acc"]  # argmax y_0 = argmax ŷ


def test_bad_arguments_exit_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mod = load_benchmark("calibration_maps")
    with pytest.raises(SystemExit):
        mod.main([str(tmp_path / "m.pt"), "--folds", "1"])
    assert "--folds must be >= 2" in capsys.readouterr().err
    assert mod.main([str(tmp_path / "missing.pt")]) == 1
    assert "calibration_maps: error:" in capsys.readouterr().err
