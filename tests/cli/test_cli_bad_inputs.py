"""Table of bad inputs across every command: exit non-zero, one line naming the problem, no partial output,
no file of the case changed (no command writes over its own inputs).

(tests/cli/test_cli.py holds the first table: data files, config files and keys, checkpoints.)
"""

from __future__ import annotations

import inspect
import shutil

import numpy as np
import pytest
import torch
from conftest import shared_file
from PIL import Image

from diffmic.cli import main
from diffmic.config import DiffMICConfig

TINY = "configs/tiny.yaml"


@pytest.fixture(scope="module")
def env(tiny_checkpoint, tmp_path_factory):
    """A 2-class 1-channel model.pt, its data file and a valid PNG."""
    ckpt, data = tiny_checkpoint
    png = tmp_path_factory.mktemp("bad_inputs") / "ok.png"
    Image.fromarray(np.load(data)["test_images"][0]).save(png)
    return {"ckpt": ckpt, "data": data, "png": png}


def _npz(tmp_path, name="d.npz", n=8, **replace):
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1)).astype(np.uint8)
    arrays.update(replace)
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _run_dir(tmp_path, *, finished=False, last=None):
    d = tmp_path / "run"
    (d / "checkpoints").mkdir(parents=True)
    DiffMICConfig.from_yaml(TINY).save(d / "config.yaml")
    if finished:
        (d / "metrics.json").write_text("{}")
    if last is not None:
        (d / "checkpoints" / "last.ckpt").write_bytes(last)
    return d


# Each case: (tmp_path, env) -> (argv, text expected in the error line, paths that must not exist after).
def c_unknown_command(t, e):
    return ["frobnicate"], "invalid choice", []


def c_unknown_option(t, e):
    return ["config", "--config", TINY, "--colour", "red"], "unrecognized arguments", []


def c_missing_required(t, e):
    return ["predict", e["png"]], "--checkpoint", []


def c_bad_split_choice(t, e):
    return ["evaluate", "--checkpoint", e["ckpt"], "--split", "holdout"], "invalid choice", []


def c_non_integer_samples(t, e):
    return ["predict", "--checkpoint", e["ckpt"], e["png"], "--samples", "many"], "expected an integer >= 1", []


def c_unknown_section(t, e):
    return ["config", "--config", TINY, "--set", "optimiser.lr=1"], "optimiser", []


def c_wrong_type_bool(t, e):
    return ["config", "--config", TINY, "--set", "train.progress=perhaps"], "train.progress", []


def c_negative_epochs(t, e):
    return ["config", "--config", TINY, "--set", "train.epochs=-2"], "train.epochs", []


def c_empty_config(t, e):
    p = t / "empty.yaml"
    p.write_text("")
    return ["train", "--config", p, "--data", e["data"], "--out", t / "runs"], "empty.yaml", [t / "runs"]


def c_config_not_a_mapping(t, e):
    p = t / "list.yaml"
    p.write_text("- 1\n- 2\n")
    return ["config", "--config", p], "list.yaml", []


def c_unknown_format(t, e):
    return ["train", "--config", TINY, "--data", e["data"], "--set", "data.format=dicomdir",
            "--out", t / "runs"], "data.format", [t / "runs"]


def c_empty_npz_file(t, e):
    p = t / "empty.npz"
    p.write_bytes(b"")
    return ["train", "--config", TINY, "--data", p, "--out", t / "runs"], "empty.npz", [t / "runs"]


def c_nan_images(t, e):
    imgs = np.full((8, 28, 28), np.nan, dtype=np.float32)
    return ["train", "--config", TINY, "--data", _npz(t, train_images=imgs), "--out", t / "runs"], "nan", [t / "runs"]


def c_two_channel_images(t, e):
    imgs = np.zeros((8, 28, 28, 2), dtype=np.uint8)
    return (["train", "--config", TINY, "--data", _npz(t, train_images=imgs), "--out", t / "runs"], "channel",
            [t / "runs"])


def c_image_label_count_mismatch(t, e):
    labels = np.zeros((5, 1), dtype=np.uint8)
    return ["train", "--config", TINY, "--data", _npz(t, val_labels=labels), "--out", t / "runs"], "val", [t / "runs"]


def c_empty_train_split(t, e):
    path = _npz(t, train_images=np.zeros((0, 28, 28), np.uint8), train_labels=np.zeros((0, 1), np.uint8))
    return ["train", "--config", TINY, "--data", path, "--out", t / "runs"], "empty", [t / "runs"]


def c_unknown_backbone(t, e):  # found only when the network is built: no run folder is left behind
    return (["train", "--config", TINY, "--data", e["data"], "--set", "model.backbone=resnet_nope",
             "--out", t / "runs"], "resnet_nope", [t / "runs"])


def c_out_dir_is_a_file(t, e):
    f = t / "taken"
    f.write_text("x")
    return ["train", "--config", TINY, "--data", e["data"], "--out", f], "taken", []


def c_resume_missing(t, e):
    return ["train", "--resume", t / "gone"], "not found", []


def c_resume_with_config(t, e):
    return ["train", "--resume", _run_dir(t), "--config", TINY], "own config", []


def c_resume_finished(t, e):
    return ["train", "--resume", _run_dir(t, finished=True)], "already finished", []


def c_resume_no_checkpoint(t, e):
    return ["train", "--resume", _run_dir(t)], "last.ckpt", []


def c_resume_corrupt_checkpoint(t, e):
    return ["train", "--resume", _run_dir(t, last=b"PK\x03\x04 truncated")], "last.ckpt", []


def c_empty_checkpoint(t, e):
    p = t / "empty.pt"
    p.write_bytes(b"")
    return ["evaluate", "--checkpoint", p, "--out", t / "r.json"], "empty.pt", [t / "r.json"]


def c_checkpoint_weights_mismatch(t, e):
    payload = torch.load(e["ckpt"], weights_only=True)
    key = next(k for k, v in payload["state_dict"].items() if v.ndim == 2)
    payload["state_dict"][key] = torch.zeros(3, 3)
    p = t / "tampered.pt"
    torch.save(payload, p)
    return ["predict", "--checkpoint", p, e["png"]], "do not match", []


def c_checkpoint_other_class_count(t, e):
    return ["evaluate", "--checkpoint", e["ckpt"], "--data", shared_file("retinamnist.npz"),
            "--out", t / "r.json"], "classes", [t / "r.json"]


def c_evaluate_zero_samples(t, e):
    return ["evaluate", "--checkpoint", e["ckpt"], "--samples", "0", "--out", t / "r.json"], "--samples", [t / "r.json"]


def c_evaluate_zero_steps(t, e):
    return ["evaluate", "--checkpoint", e["ckpt"], "--steps", "0"], "--steps", []


def c_evaluate_out_missing_dir(t, e):
    return ["evaluate", "--checkpoint", e["ckpt"], "--out", t / "no" / "r.json"], "does not exist", []


def c_evaluate_missing_data(t, e):
    return ["evaluate", "--checkpoint", e["ckpt"], "--data", t / "nope.npz"], "nope.npz", []


def c_predict_missing_image(t, e):
    return (["predict", "--checkpoint", e["ckpt"], e["png"], t / "absent.png", "--out", t / "p.csv"], "absent.png",
            [t / "p.csv"])


def c_predict_empty_image(t, e):
    p = t / "zero.png"
    p.write_bytes(b"")
    return ["predict", "--checkpoint", e["ckpt"], e["png"], p, "--out", t / "p.csv"], "zero.png", [t / "p.csv"]


def c_predict_truncated_png(t, e):
    p = t / "cut.png"
    p.write_bytes(e["png"].read_bytes()[:40])
    return ["predict", "--checkpoint", e["ckpt"], p, "--out", t / "p.csv"], "cut.png", [t / "p.csv"]


def c_predict_nan_image(t, e):
    p = t / "nan.tiff"
    Image.fromarray(np.full((28, 28), np.nan, dtype=np.float32), mode="F").save(p)
    return ["predict", "--checkpoint", e["ckpt"], e["png"], p, "--out", t / "p.csv"], "nan.tiff", [t / "p.csv"]


def c_predict_text_file_as_image(t, e):
    p = t / "notes.jpg"
    p.write_text("patient notes, not an image")
    return ["predict", "--checkpoint", e["ckpt"], p], "notes.jpg", []


def c_predict_out_is_folder(t, e):
    return ["predict", "--checkpoint", e["ckpt"], e["png"], "--out", t], "folder", []


def c_predict_negative_samples(t, e):
    return ["predict", "--checkpoint", e["ckpt"], e["png"], "--samples", "-3"], "--samples", []


def c_explain_out_is_file(t, e):
    f = t / "figure.png"
    f.write_bytes(b"x")
    return ["explain", "--checkpoint", e["ckpt"], e["png"], "--out", f], "not a folder", []


def c_explain_missing_image(t, e):
    return ["explain", "--checkpoint", e["ckpt"], t / "absent.png", "--out", t / "fig"], "absent.png", []


def c_explain_corrupt_checkpoint(t, e):
    p = t / "bad.ckpt"
    p.write_bytes(b"\x00" * 64)
    return ["explain", "--checkpoint", p, e["png"], "--out", t / "fig"], "bad.ckpt", []


def c_report_missing_run(t, e):
    return ["report", t / "no_run"], "not found", []


def c_report_unfinished_run(t, e):
    return ["report", _run_dir(t), "--out", t / "r.html"], "model.pt", [t / "r.html"]


def c_report_zero_samples(t, e):
    return ["report", _run_dir(t), "--samples", "0"], "--samples", []


def c_export_unknown_format(t, e):
    return ["export", "--checkpoint", e["ckpt"], "--format", "tflite", "--out", t / "m.onnx"], "tflite", [t / "m.onnx"]


def c_export_out_missing_dir(t, e):
    return ["export", "--checkpoint", e["ckpt"], "--out", t / "no" / "m.onnx"], "does not exist", []


def c_export_corrupt_checkpoint(t, e):
    p = t / "bad.pt"
    p.write_bytes(b"garbage")
    return ["export", "--checkpoint", p, "--out", t / "m.onnx"], "bad.pt", [t / "m.onnx"]


def _copy(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def c_predict_out_overwrites_image(t, e):
    img = _copy(e["png"], t / "a.png")
    return ["predict", "--checkpoint", e["ckpt"], img, "--out", img], "is an input", []


def c_predict_out_overwrites_image_of_folder(t, e):
    _copy(e["png"], t / "imgs" / "a.png")
    return ["predict", "--checkpoint", e["ckpt"], t / "imgs", "--out", t / "imgs" / "a.png"], "is an input", []


def c_predict_out_overwrites_checkpoint(t, e):
    ckpt = _copy(e["ckpt"], t / "m.pt")
    return ["predict", "--checkpoint", ckpt, e["png"], "--out", ckpt], "is an input", []


def c_explain_figure_overwrites_input(t, e):
    a, fig = _copy(e["png"], t / "a.png"), _copy(e["png"], t / "figs" / "a_explain.png")
    return ["explain", "--checkpoint", e["ckpt"], a, fig, "--out", t / "figs"], "is an input", []


def c_explain_two_images_one_figure(t, e):
    a, b = _copy(e["png"], t / "d1" / "x.png"), _copy(e["png"], t / "d2" / "x.png")
    return ["explain", "--checkpoint", e["ckpt"], a, b, "--out", t / "figs"], "x_explain.png", [t / "figs"]


def c_evaluate_out_overwrites_checkpoint(t, e):
    ckpt = _copy(e["ckpt"], t / "m.pt")
    return ["evaluate", "--checkpoint", ckpt, "--out", ckpt], "is an input", []


def c_evaluate_out_overwrites_data(t, e):
    data = _copy(e["data"], t / "d.npz")
    return ["evaluate", "--checkpoint", e["ckpt"], "--data", data, "--out", data], "is an input", []


def c_export_out_overwrites_checkpoint(t, e):
    ckpt = _copy(e["ckpt"], t / "m.pt")
    return ["export", "--checkpoint", ckpt, "--out", ckpt], "is an input", []


def c_report_out_overwrites_model(t, e):
    run = _run_dir(t, finished=True)
    _copy(e["ckpt"], run / "model.pt")
    return ["report", run, "--out", run / "model.pt"], "is an input", []


def c_report_out_overwrites_config(t, e):
    run = _run_dir(t, finished=True)
    _copy(e["ckpt"], run / "model.pt")
    return ["report", run, "--out", run / "config.yaml"], "is an input", []


def c_predict_empty_folder(t, e):
    (t / "empty").mkdir()
    return ["predict", "--checkpoint", e["ckpt"], t / "empty", "--out", t / "p.csv"], "no image files", [t / "p.csv"]


def c_predict_folder_without_images(t, e):
    (t / "docs").mkdir()
    (t / "docs" / "notes.txt").write_text("not an image")
    return ["predict", "--checkpoint", e["ckpt"], t / "docs"], "no image files", []


def c_predict_folder_of_subfolders_needs_recursive(t, e):
    _copy(e["png"], t / "top" / "sub" / "a.png")
    return ["predict", "--checkpoint", e["ckpt"], t / "top", "--out", t / "p.csv"], "--recursive", [t / "p.csv"]


def c_explain_empty_folder(t, e):
    (t / "empty").mkdir()
    return ["explain", "--checkpoint", e["ckpt"], t / "empty", "--out", t / "figs"], "no image files", [t / "figs"]


def c_app_threshold_and_coverage(t, e):
    return ["app", "--checkpoint", e["ckpt"], "--threshold", "0.8", "--coverage", "0.9"], "either --threshold", []


def c_app_calibration_without_coverage(t, e):
    return ["app", "--checkpoint", e["ckpt"], "--calibration", t / "test.json"], "needs --coverage", []


def c_app_zero_upload_limit(t, e):
    return ["app", "--checkpoint", e["ckpt"], "--max-upload-mb", "0"], "--max-upload-mb must be > 0", []


CASES = [v for k, v in sorted(globals().items()) if k.startswith("c_")]


def test_table_is_large_and_covers_every_command():
    assert len(CASES) >= 30
    from diffmic import cli

    src = "\n".join(inspect.getsource(c) for c in CASES)
    missing = [c for c in cli.COMMANDS if f'["{c}"' not in src]
    assert not missing, f"no bad-input case for: {missing}"


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[2:] for c in CASES])
def test_bad_input(case, env, tmp_path, capsys):
    argv, expected, absent = case(tmp_path, env)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code != 0, out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("diffmic: error:"), err
    assert "Traceback" not in err
    assert expected.lower() in lines[0].lower(), lines[0]
    for p in absent:
        assert not p.exists(), f"{p} left behind"
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".partial"))]
    assert not leftovers, leftovers
    changed = [p.name for p, data in before.items() if not p.is_file() or p.read_bytes() != data]
    assert not changed, f"{changed} changed"


def test_disk_full_while_writing_predictions(env, tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of writing the CSV: one line, no CSV and no temporary file left."""
    import diffmic._io as io_mod

    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(io_mod, "open", lambda p, mode="r": FullDisk(real_open(p, mode)), raising=False)
    out = tmp_path / "preds.csv"
    code = main(["predict", "--checkpoint", str(env["ckpt"]), str(env["png"]), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "No space left on device" in err, err
    assert list(tmp_path.iterdir()) == []


def test_predict_folder_sorted_with_count_and_skipped_files(env, tmp_path, capsys):
    """``diffmic predict DIR``: its images in sorted order, the count and the unused entries on stderr."""
    folder = tmp_path / "scans"
    for name in ("b.png", "a.png", "c.PNG"):
        _copy(env["png"], folder / name)
    (folder / "notes.txt").write_text("x")
    _copy(env["png"], folder / "more" / "d.png")
    out = tmp_path / "p.csv"
    code = main(["predict", "--checkpoint", str(env["ckpt"]), str(folder), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"{folder}: 3 image(s)" in captured.err
    assert "notes.txt" in captured.err and "more/" in captured.err and "--recursive" in captured.err
    rows = out.read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == [str(folder / n) for n in ("a.png", "b.png", "c.PNG")]
    assert "3 predictions written" in captured.out

    code = main(["predict", "--checkpoint", str(env["ckpt"]), str(folder), "--recursive"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    paths = [r.split(",")[0] for r in captured.out.splitlines()[1:]]  # CSV on stdout, notes on stderr
    assert paths == [str(folder / n) for n in ("a.png", "b.png", "c.PNG", "more/d.png")]
    assert f"{folder}: 4 image(s)" in captured.err and "notes.txt" in captured.err
