"""benchmarks/accuracy.py: the memorisation diagnostic (--train-split) and the calibration table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_BENCHMARK_MODEL, load_benchmark, synthetic_medmnist

pytestmark = pytest.mark.train

TINY_CONFIG = TINY_BENCHMARK_MODEL + """
data: {batch_size: 20, eval_batch_size: 64}
train: {dcg_pretrain_epochs: 1, epochs: 1, warmup_epochs: 1.0, progress: false}
eval: {samples: 2, readout: mean_path, fit_temperature: true}
"""


def test_train_split_and_calibration_rows(tmp_path: Path, one_thread: None) -> None:
    synthetic_medmnist(tmp_path / "data" / "breastmnist.npz", {"train": 30, "val": 16, "test": 16}, 2)
    (tmp_path / "tiny.yaml").write_text(TINY_CONFIG)
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n")
    out = tmp_path / "acc.json"
    accuracy = load_benchmark("accuracy")
    rc = accuracy.main(["--data-dir", str(tmp_path / "data"), "--config", str(tmp_path / "tiny.yaml"),
                        "--seeds", "0", "--epochs", "2", "--rows", "diffmic", "--train-split", "--threads", "1",
                        "--out", str(out), "--docs", str(docs)])
    assert rc == 0
    run = json.loads(out.read_text())["runs"][0]
    assert "error" not in run, run.get("error")
    assert set(run["train_readouts"]) == {"mean_path", "vote", "mean_softmax"}
    cal = run["calibration_test"]
    for who in ("diffusion", "guidance"):
        assert set(cal[who]) == {"temperature", "ece", "nll", "aurc", "ece_raw"}
        assert 0.0 <= cal[who]["ece"] <= 1.0 and 0.0 <= cal[who]["aurc"] <= 1.0
    assert cal["diffusion"]["temperature"] == pytest.approx(run["temperature"])  # mean_path: its val-fitted T

    summary = json.loads(out.read_text())["summary"]["breastmnist"]
    diff = summary["diffmic <cal diffusion − prior>"]["aurc"]["mean"]
    assert diff == pytest.approx(cal["diffusion"]["aurc"] - cal["guidance"]["aurc"])
    section = docs.read_text()
    assert "Memorisation diagnostic" in section
    table = section.split("Calibration on test after temperature scaling")[1]
    assert "| breastmnist | diffmic | " in table
