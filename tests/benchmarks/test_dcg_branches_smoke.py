"""benchmarks/dcg_branches.py: branch priors of a saved model, checked against the DCG and scikit-learn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, load_benchmark, shared_file
from sklearn.metrics import roc_auc_score


def _saved_model(tmp_path: Path, *extra: str):
    from diffmic.config import DiffMICConfig
    from diffmic.models import build_model, save_model

    cfg = DiffMICConfig.from_yaml(None, [f"data.path={shared_file('breastmnist.npz')}", *TINY_OVERRIDES, *extra])
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=2, in_chans=1, image_size=28, class_names=["malignant", "benign"])
    ckpt = tmp_path / "model.pt"
    save_model(model, ckpt)
    return model.eval(), ckpt


@pytest.mark.usefixtures("one_thread")
def test_branch_scores_match_the_dcg_and_sklearn(tmp_path: Path) -> None:
    from diffmic.data.registry import build_data
    from diffmic.runs import model_data_config

    model, ckpt = _saved_model(tmp_path)
    out = tmp_path / "b.json"
    mod = load_benchmark("dcg_branches")
    assert mod.main([str(ckpt), "--splits", "val", "--batch-size", "37", "--out", str(out)]) == 0
    (per_split,) = json.loads(out.read_text())["models"].values()
    r = per_split["val"]
    assert set(r) == {"fused", "global", "local"}

    split = build_data(model_data_config(model)).val
    images = torch.from_numpy(split.images).permute(0, 3, 1, 2).float() / 255.0
    labels = split.labels.astype(int)
    with torch.no_grad():  # one batch: batching in the script must not change anything
        guide = model.guidance(model.normalize(images))
    torch.testing.assert_close(guide.logits, 0.5 * (guide.logits_global + guide.logits_local))
    for name, logits in (("fused", guide.logits), ("global", guide.logits_global), ("local", guide.logits_local)):
        p = logits.softmax(1).numpy()
        assert r[name]["acc"] == pytest.approx(float((p.argmax(1) == labels).mean()), abs=1e-4), name
        assert r[name]["auroc"] == pytest.approx(roc_auc_score(labels, p[:, 1]), abs=1e-4), name
    # an untrained model's branches differ, so the three columns are not copies of one another
    assert len({r[k]["auroc"] for k in r}) > 1


@pytest.mark.usefixtures("one_thread")
def test_model_without_local_branch_has_no_local_column(tmp_path: Path) -> None:
    model, _ = _saved_model(tmp_path, "model.local_branch=false")
    images = torch.rand(6, 1, 28, 28)
    logits = load_benchmark("dcg_branches").branch_logits(model, images, batch_size=4)
    assert set(logits) == {"fused", "global"}
    torch.testing.assert_close(logits["fused"], logits["global"])
    assert np.isfinite(logits["fused"].numpy()).all()


def test_bad_path_is_one_line(tmp_path: Path, capsys) -> None:
    assert load_benchmark("dcg_branches").main([str(tmp_path / "missing.pt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dcg_branches: error:")
