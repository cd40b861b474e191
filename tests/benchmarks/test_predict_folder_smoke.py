"""Smoke test of benchmarks/predict_folder.py: a tiny random model, 20 PNG files (plumbing, never timings)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from conftest import TINY_BENCHMARK_MODEL, load_benchmark


def test_predict_folder_smoke(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 6), ("test", 8)):  # fewer test images than files: cycled
        labels = np.arange(n) % 3
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = labels[:, None].astype(np.uint8)
    data = tmp_path / "retinamnist.npz"
    np.savez(data, **arrays)
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_BENCHMARK_MODEL)
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nIntro that must survive.\n")
    out = tmp_path / "result.json"
    threads = torch.get_num_threads()
    try:
        rc = load_benchmark("predict_folder").main(["--config", str(config), "--data", str(data), "--images", "20",
                                                    "--repeats", "1", "--batch-size", "8", "--per-image",
                                                    "--no-process", "--threads", "1", "--workdir", str(tmp_path / "w"),
                                                    "--out", str(out), "--docs", str(docs)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "predict_folder" and result["run"]["torch_threads"] == 1
    assert result["run"]["command"].startswith("python benchmarks/predict_folder.py")
    r = result["result"]
    assert r["images"] == 20 and r["model"]["random_init"] and r["model"]["image_size"] == 28
    assert len(list((tmp_path / "w" / "images").glob("*.png"))) == 20
    for case in ("cli", "pipeline", "pipeline_without_model_load", "model_only", "per_image"):
        assert r["cases"][case]["images_per_s"] > 0, case
    assert set(r["phases"]) == {"load_model", "decode", "predict", "csv"}
    assert 0 < r["decode_share_of_pipeline"] < 1
    assert r["max_abs_diff_cli_vs_model_only_probs"] < 1e-5  # the command predicts what the model does
    text = docs.read_text()
    assert "Intro that must survive." in text and text.count("<!-- predict-folder:start -->") == 1
    assert "model only (decoded images in memory)" in text
