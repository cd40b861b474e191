"""CLI ``report`` one-line errors and ``evaluate --calibrate``, on a small untrained model."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_OVERRIDES

from diffmic import load_model, save_model
from diffmic.cli import main
from diffmic.config import DiffMICConfig
from diffmic.errors import CheckpointError, ConfigError, DataError
from diffmic.evaluation.calibration import fit_temperature
from diffmic.evaluation.html_report import write_report
from diffmic.evaluation.report import predict_split
from diffmic.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def write_model(run_dir, data_path):
    cfg = DiffMICConfig.from_yaml(None, [f"data.path={data_path}", *TINY_OVERRIDES])
    model = build_model(cfg, num_classes=2, in_chans=1, image_size=28, class_names=["malignant", "benign"])
    run_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, run_dir / "model.pt")
    return run_dir / "model.pt"


def one_line_error(code, err, *fragments):
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("diffmic: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_report_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and "RUN_DIR" in out and "--samples" in out


def test_report_missing_run_folder(tmp_path, capsys):
    missing = tmp_path / "nope"
    code, _, err = run(["report", missing], capsys)
    one_line_error(code, err, "run folder not found", str(missing))
    with pytest.raises(ConfigError, match="run folder not found"):
        write_report(missing)


def test_report_folder_without_model(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("data: {}\n")
    code, _, err = run(["report", tmp_path], capsys)
    one_line_error(code, err, str(tmp_path / "model.pt"), "not found")
    with pytest.raises(CheckpointError, match="model.pt not found"):
        write_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


def test_report_corrupt_model(tmp_path, capsys):
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    code, _, err = run(["report", tmp_path], capsys)
    one_line_error(code, err, "model.pt", "corrupt or unreadable checkpoint")


def test_report_unreadable_data(tmp_path, capsys):
    missing = tmp_path / "gone.npz"
    write_model(tmp_path / "run", missing)
    code, _, err = run(["report", tmp_path / "run"], capsys)
    one_line_error(code, err, str(missing))
    with pytest.raises(DataError, match="gone.npz"):
        write_report(tmp_path / "run")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    write_model(tmp_path / "run2", garbage)
    code, _, err = run(["report", tmp_path / "run2"], capsys)
    one_line_error(code, err, str(garbage))
    assert not list(tmp_path.glob("run*/report.html*"))


def test_report_bad_options(tmp_path, capsys):
    write_model(tmp_path / "run", tmp_path / "x.npz")
    code, _, err = run(["report", tmp_path / "run", "--samples", "0"], capsys)
    assert code == 2 and err.count("\n") == 1  # a usage error, from the argparse type
    assert err.startswith("diffmic: error: diffmic report: argument --samples: must be >= 1, got 0"), err
    code, _, err = run(["report", tmp_path / "run", "--out", tmp_path / "no" / "such" / "r.html"], capsys)
    one_line_error(code, err, "output folder does not exist")


def test_evaluate_calibrate_adds_uncertainty(tmp_path, capsys):
    from conftest import shared_file

    data = shared_file("breastmnist.npz")
    ckpt = write_model(tmp_path / "run", data)
    out_file = tmp_path / "test.json"
    figures = tmp_path / "figures"
    code, out, err = run(["evaluate", "--checkpoint", ckpt, "--calibrate", "--out", out_file,
                          "--plots", figures], capsys)
    assert code == 0, err
    assert "temperature scaling" in out
    from PIL import Image

    assert sorted(p.name for p in figures.iterdir()) == ["confusion.png", "coverage.png", "reliability.png"]
    for png in figures.iterdir():
        assert png.stat().st_size > 5_000
        with Image.open(png) as im:
            assert len(set(im.convert("L").getdata())) > 2  # not a blank canvas
    report = json.loads(out_file.read_text())
    u = report["uncertainty"]
    assert u["calibrated_on"] == "val" and u["calibration_images"] == 78
    assert {"fitted_temperature", "ece", "ece_calibrated", "aurc", "coverage_accuracy"} <= set(u)
    assert u["ece"] == pytest.approx(report["diffusion"]["ece"], abs=1e-6)
    # T is the one fitted on the val split's predictions (same samples, seed and batching)
    model = load_model(ckpt)
    from diffmic.data.registry import build_data

    cfg = DiffMICConfig.from_dict(model.config)
    val = build_data(cfg.data).val
    probs, _, labels = predict_split(model, val, batch_size=cfg.data.eval_batch_size,
                                     samples=cfg.eval.samples, seed=0)
    assert u["fitted_temperature"] == pytest.approx(fit_temperature(probs, labels), rel=1e-9)
    # without --calibrate the JSON has no uncertainty section
    code, out, err = run(["evaluate", "--checkpoint", ckpt, "--split", "val"], capsys)
    assert code == 0, err
    assert "uncertainty" not in json.loads(out)
