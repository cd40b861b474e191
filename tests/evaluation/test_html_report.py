"""``diffmic report``: one self-contained HTML page for a (very short) real training run."""

from __future__ import annotations

import base64
import io
import os
import re

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES
from PIL import Image

from diffmic import load_model, save_model
from diffmic.cli import main
from diffmic.config import DiffMICConfig
from diffmic.data.base import DataBundle, ImageArray
from diffmic.data.registry import build_data
from diffmic.errors import ConfigError
from diffmic.evaluation.html_report import write_report
from diffmic.evaluation.metrics import METRIC_NAMES
from diffmic.evaluation.report import evaluate
from diffmic.training.api import train

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.train]

SECTIONS = [
    "Metrics: DCG alone vs diffusion",
    "Per-class metrics (test, diffusion)",
    "Confusion matrix (test)",
    "Calibration and temperature scaling",
    "Selective prediction: accuracy vs coverage",
    "Training curves",
    "Most and least confident test images",
    "Model card",
    "Intended use",
    "Limitations",
    "Resolved configuration",
]


def subsample(a: ImageArray, n: int) -> ImageArray:
    idx = np.sort(np.random.default_rng(0).choice(len(a), min(n, len(a)), replace=False))
    return ImageArray(a.images[idx], a.labels[idx])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1 + 1 epoch run on a BreastMNIST subsample (64 train images), reported with the CLI."""
    from conftest import shared_file

    path = shared_file("breastmnist.npz")
    cfg = DiffMICConfig.from_yaml(None, [f"data.path={path}", *TINY_OVERRIDES, "train.dcg_pretrain_epochs=1",
                                         "train.epochs=1", "data.batch_size=64", "train.seed=0"])
    full = build_data(cfg.data)
    small = DataBundle(subsample(full.train, 64), subsample(full.val, 32), subsample(full.test, 32),
                       full.class_names, full.source, full.extra)
    run_dir = tmp_path_factory.mktemp("runs") / "breast"
    train(cfg, run_dir=run_dir, data=small)
    code = main(["report", str(run_dir)])  # rebuilds the data from the stored config: the full splits
    assert code == 0
    return run_dir, cfg, full, small


@pytest.fixture(scope="module")
def page(run) -> str:
    run_dir = run[0]
    return (run_dir / "report.html").read_text(encoding="utf-8")


def test_report_has_every_section(page):
    assert page.startswith("<!DOCTYPE html>")
    for heading in SECTIONS:
        assert f">{heading}</h" in page, heading
    assert "not for clinical use" in page.lower()
    assert "research" in page.lower()


def test_report_is_self_contained(run, page):
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 5
    for b64 in images:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            assert im.format == "PNG" and im.size[0] > 100
    assert "http://" not in page and "https://" not in page
    for attr in re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', page):
        assert attr.startswith("data:image/png;base64,"), attr[:60]
    lowered = page.lower()
    for external in ("<script", "<link", "@import", "url(", "<iframe"):
        assert external not in lowered, external
    assert not list(run[0].glob("*.partial"))  # the temporary file was renamed


def test_report_metrics_match_an_independent_evaluation(run, page):
    run_dir, cfg, full, _ = run
    model = load_model(run_dir / "model.pt")
    kw = {"batch_size": cfg.data.eval_batch_size, "samples": cfg.eval.samples, "seed": 0}
    reports = {"val": evaluate(model, full.val, split="val", **kw),
               "test": evaluate(model, full.test, split="test", calibrate_on=full.val, **kw)}
    rows = {(m[0], m[1]): dict(re.findall(r'<td data-metric="(\w+)">([^<]*)</td>', m[2]))
            for m in re.findall(r'<tr data-split="(\w+)" data-head="(\w+)">(.*?)</tr>', page)}
    assert set(rows) == {(s, h) for s in ("val", "test") for h in ("guidance", "diffusion")}
    for (split, head), cells in rows.items():
        expected = getattr(reports[split], head)
        assert set(cells) == set(METRIC_NAMES)
        for key in METRIC_NAMES:
            assert float(cells[key]) == pytest.approx(expected[key], abs=6e-5), (split, head, key)
    assert f"test ({len(full.test)})" in page and f"val ({len(full.val)})" in page

    u = reports["test"].uncertainty
    calibration = re.search(r'<table id="calibration">(.*?)</table>', page).group(1)
    assert f"<td>{u['ece']:.4f}</td><td>{u['ece_calibrated']:.4f}</td>" in calibration
    assert f"<td>{u['val_ece']:.4f}</td><td>{u['val_ece_calibrated']:.4f}</td>" in calibration
    assert f"T = <b>{u['fitted_temperature']:.4g}</b>" in page
    assert f"<b>{u['aurc']:.4f}</b>" in page
    coverage = re.search(r'<table id="coverage">(.*?)</table>', page).group(1)
    for p in u["coverage_accuracy"]:
        assert f"<td>{p['coverage']:.0%}</td><td>{p['images']}</td><td>{p['accuracy']:.4f}</td>" in coverage
    per_class = re.search(r'<table id="per-class">(.*?)</table>', page).group(1)
    for r in reports["test"].per_class:
        assert f"<td>{r['recall']:.4f}</td><td>{r['f1']:.4f}</td><td>{r['support']}</td>" in per_class


def test_report_model_card(run, page):
    run_dir, _, full, _ = run
    payload = torch.load(run_dir / "model.pt", weights_only=True)
    card = page[page.index("Model card"):]
    assert f"train {len(full.train)}, val {len(full.val)}, test {len(full.test)}" in card
    assert f"<dt>Selected epoch</dt><dd>{payload['extra']['selected_epoch']} " in card
    commit = payload["extra"].get("git_commit")
    assert f"<dt>Git commit</dt><dd>{commit or 'not recorded'}</dd>" in card
    assert "breastmnist.npz" in card
    yaml_block = re.search(r"<pre>(.*?)</pre>", card, re.DOTALL).group(1)
    assert "backbone: test_resnet" in yaml_block and "epochs: 1" in yaml_block


def test_write_report_api_escapes_text_and_tolerates_missing_logs(run, tmp_path, monkeypatch):
    run_dir, _, _, small = run
    model = load_model(run_dir / "model.pt")
    model.class_names = ["<script>alert(1)</script>", "a & b"]
    model.config["data"]["class_names"] = list(model.class_names)
    other = tmp_path / "copy"
    other.mkdir()
    save_model(model, other / "model.pt", extra={"selected_epoch": 1})  # no logs/, no metrics.json
    out = write_report(other, tmp_path, data=small, samples=1, examples=2)
    assert out == tmp_path / "report.html" and out.is_file()
    page = out.read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "a &amp; b" in page
    assert "No training log in this run folder" in page
    assert f"test ({len(small.test)})" in page
    assert page.count("data:image/png;base64,") >= 5

    def disk_full(fd):  # the page is in the temporary file, then flushing it to disk fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(ConfigError, match="cannot write"):
        write_report(other, tmp_path, data=small, samples=1, examples=2)
    assert out.read_text(encoding="utf-8") == page  # the previous report, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "report.html"]
