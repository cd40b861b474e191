"""``evaluate --medmnist-csv``: medmnist's result file, checked with the real ``medmnist.Evaluator``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHARED_DATA, shared_file

from diffmic.cli import main
from diffmic.config import DataConfig
from diffmic.data.registry import build_data
from diffmic.evaluation.medmnist_format import (
    _auc,
    format_scores,
    medmnist_metrics,
    result_filename,
    run_label,
    write_medmnist_result,
)
from diffmic.evaluation.metrics import classification_metrics


def _read_back(path):
    """What ``Evaluator.parse_and_evaluate`` does with a result file."""
    pd = pytest.importorskip("pandas")
    return pd.read_csv(path, index_col=0, header=None).sort_index().values


def _random_probs(n, c, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(c), size=n).astype(np.float32)
    p[::7] = p[0]  # ties
    return p


def test_auc_equals_sklearn_with_ties():
    sklearn_metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn (test extra) not installed")
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300).astype(bool)
    score = np.round(rng.random(300), 2)  # many ties
    assert _auc(labels, score) == pytest.approx(sklearn_metrics.roc_auc_score(labels, score), abs=1e-12)


def test_scores_format_round_trips_like_pandas(tmp_path):
    y = _random_probs(20, 5).astype(np.float64)
    path = tmp_path / "x.csv"
    path.write_text(format_scores(y))
    np.testing.assert_array_equal(_read_back(path), y)
    assert path.read_text().splitlines()[3].startswith("3,")


@pytest.mark.parametrize("name", ["retinamnist", "breastmnist"])
def test_writer_matches_medmnist_evaluator(name, tmp_path):
    medmnist = pytest.importorskip("medmnist", reason="medmnist not installed: no official Evaluator to compare")
    data = build_data(DataConfig(path=str(shared_file(f"{name}.npz"))))
    labels = data.test.labels
    probs = _random_probs(len(labels), data.num_classes)
    probs[np.arange(len(labels))[: len(labels) // 2], :] *= 0  # half of them right: a non-trivial ACC
    probs[np.arange(len(labels) // 2), labels[: len(labels) // 2]] = 1
    result = write_medmnist_result(tmp_path, probs, data, "test", run="r1")
    evaluator = medmnist.Evaluator(name, "test", root=str(SHARED_DATA))
    theirs = evaluator.evaluate(_read_back(result.path))
    assert result.evaluator == pytest.approx((theirs.ACC, theirs.AUC), abs=1e-12)
    assert (result.acc, result.auc) == pytest.approx((theirs.ACC, theirs.AUC), abs=1e-12)
    assert result.path.name == evaluator.get_standard_evaluation_filename(theirs, "r1")
    # and they are diffmic's own accuracy and macro one-vs-rest AUROC
    import torch

    ours = classification_metrics(torch.from_numpy(probs), torch.from_numpy(labels), data.num_classes)
    assert ours["acc"] == pytest.approx(theirs.ACC, abs=1e-6)
    assert ours["auroc"] == pytest.approx(theirs.AUC, abs=1e-6)


def test_binary_metrics_use_the_last_column():
    y = np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8]])
    acc, auc = medmnist_metrics(y, np.array([0, 1, 1, 1]), "binary-class")
    assert acc == 0.75 and auc == 1.0
    assert result_filename("retinamnist", 64, "val", 0.5, 0.75, "x") == "retinamnist_64_val_[AUC]0.750_[ACC]0.500@x.csv"


def test_run_label_is_the_run_folder(tmp_path):
    run = tmp_path / "breast.mnist@run_1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("{}")
    assert run_label(run / "model.pt") == "breast-mnist-run-1"
    assert run_label(run / "checkpoints" / "best.ckpt") == "breast-mnist-run-1"
    assert run_label(tmp_path / "model.pt") == "model"


def test_cli_evaluate_medmnist_csv_agrees_with_the_real_evaluator(tiny_checkpoint, tmp_path, capsys):
    medmnist = pytest.importorskip("medmnist", reason="medmnist not installed: no official Evaluator to compare")
    ckpt, data = tiny_checkpoint
    out_dir = tmp_path / "results"
    report_path = tmp_path / "r.json"
    code = main(["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(report_path),
                 "--medmnist-csv", str(out_dir)])
    out, err = capsys.readouterr()
    assert code == 0, err
    (path,) = out_dir.iterdir()
    assert path.name.startswith("breastmnist_test_[AUC]") and path.name.endswith("@model.csv")
    y_score = _read_back(path)
    assert y_score.shape == (156, 2)
    theirs = medmnist.Evaluator("breastmnist", "test", root=str(data.parent)).evaluate(y_score)
    report = json.loads(report_path.read_text())
    assert report["diffusion"]["acc"] == pytest.approx(theirs.ACC, abs=1e-6)
    assert report["diffusion"]["auroc"] == pytest.approx(theirs.AUC, abs=1e-6)
    assert f"medmnist.Evaluator ACC {theirs.ACC:.4f} AUC {theirs.AUC:.4f}" in out
    assert path.name == medmnist.Evaluator("breastmnist", "test", root=str(data.parent)) \
        .get_standard_evaluation_filename(theirs, "model")


def test_cli_medmnist_csv_refuses_other_data_before_predicting(tiny_checkpoint, tmp_path, capsys):
    ckpt, data = tiny_checkpoint
    src = np.load(data)
    other = tmp_path / "my_scans.npz"
    np.savez(other, **{k: src[k][:10] for k in src.files})
    code = main(["evaluate", "--checkpoint", str(ckpt), "--data", str(other), "--medmnist-csv", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "needs a MedMNIST dataset" in err
    assert not (tmp_path / "o").exists()


def test_binary_auroc_is_the_positive_class_score_under_float32_near_ties():
    """Near-constant outputs (an untrained model): the mean of the two one-vs-rest AUCs drifts, p[:, 1] does not."""
    import torch

    rng = np.random.default_rng(3)
    logits = torch.from_numpy(rng.normal(0, 1e-6, (400, 2)).astype(np.float32))
    probs = logits.softmax(1)
    labels = torch.from_numpy(rng.integers(0, 2, 400))
    expected = _auc(labels.numpy() == 1, probs[:, 1].double().numpy())
    assert classification_metrics(probs, labels, 2)["auroc"] == pytest.approx(expected, abs=1e-6)  # float32
