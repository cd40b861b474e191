"""CLI: happy paths on a small untrained model, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffmic.cli import main
from diffmic.config import DiffMICConfig


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert "diffmic" in capsys.readouterr().out
    from diffmic.cli import COMMANDS

    assert set(COMMANDS) == {"train", "evaluate", "predict", "explain", "report", "export", "config", "app"}
    for cmd in COMMANDS:
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = capsys.readouterr().out
        assert ("example:" in out or "examples:" in out) and f"diffmic {cmd}" in out.split("example")[-1], cmd


@pytest.mark.subprocess
def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "diffmic", "--version"], check=False, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("diffmic ")


def test_config_prints_resolved_yaml(capsys):
    code, out, _ = run(["config", "--config", "configs/tiny.yaml", "--set", "train.epochs=7"], capsys)
    assert code == 0
    assert DiffMICConfig.from_dict(__import__("yaml").safe_load(out)).train.epochs == 7


def test_evaluate_writes_json(tiny_checkpoint, tmp_path, capsys):
    ckpt, data = tiny_checkpoint
    out_file = tmp_path / "report.json"
    code, _out, err = run(["evaluate", "--checkpoint", ckpt, "--data", data, "--out", out_file], capsys)
    assert code == 0, err
    report = json.loads(out_file.read_text())
    assert report["num_images"] == 156 and report["split"] == "test"
    assert set(report["guidance"]) >= {"acc", "f1", "qwk", "auroc", "ece"}
    assert len(report["confusion_matrix"]) == 2


def test_predict_writes_csv(tiny_checkpoint, tmp_path, capsys):
    ckpt, data = tiny_checkpoint
    images = np.load(data)["test_images"][:3]
    paths = []
    for i, im in enumerate(images):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(im).resize((40, 40)).convert("RGB").save(p)  # other size and mode: converted
        paths.append(p)
    out_file = tmp_path / "preds.csv"
    code, _, err = run(["predict", "--checkpoint", ckpt, *paths, "--samples", "3", "--out", out_file], capsys)
    assert code == 0, err
    lines = out_file.read_text().splitlines()
    assert lines[0].startswith("path,prediction,p_malignant,p_benign,")
    header = lines[0].split(",")
    assert set(header) >= {"entropy", "vote_malignant", "vote_benign", "low_malignant", "low_benign",
                           "high_malignant", "high_benign"}
    assert len(lines) == 4
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    probs = np.array([[float(r["p_malignant"]), float(r["p_benign"])] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    votes = np.array([[float(r["vote_malignant"]), float(r["vote_benign"])] for r in rows])
    np.testing.assert_allclose(votes.sum(1), 1.0, atol=1e-5)
    assert all(0 <= float(r["entropy"]) <= np.log(2) + 1e-5 for r in rows)
    assert all(float(r[f"low_{c}"]) <= float(r[f"high_{c}"]) for r in rows for c in ("malignant", "benign"))


def _bad_npz(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


def _ok_arrays(n=8):
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1)).astype(np.uint8)
    return arrays


def _case_garbage_npz(tmp_path):
    p = tmp_path / "garbage.npz"
    p.write_bytes(b"this is not a zip file")
    return ["train", "--config", "configs/tiny.yaml", "--data", p], "garbage.npz"


def _case_wrong_keys(tmp_path):
    return ["train", "--config", "configs/tiny.yaml", "--data", _bad_npz(tmp_path, x=np.zeros(3))], "missing key"


def _case_label_range(tmp_path):
    arrays = _ok_arrays()
    arrays["train_labels"] = arrays["train_labels"].astype(np.int64)
    arrays["train_labels"][3] = -1
    return ["train", "--config", "configs/tiny.yaml", "--data", _bad_npz(tmp_path, **arrays)], "out of range"


def _case_label_range_names(tmp_path):
    arrays = _ok_arrays()
    arrays["val_labels"][2] = 5
    return ["train", "--config", "configs/tiny.yaml", "--data", _bad_npz(tmp_path, **arrays),
            "--set", "data.class_names=[a,b]"], "row 2"


def _case_wrong_rank(tmp_path):
    arrays = _ok_arrays()
    arrays["test_images"] = np.zeros((8, 28), dtype=np.uint8)
    return ["train", "--config", "configs/tiny.yaml", "--data", _bad_npz(tmp_path, **arrays)], "shape"


def _case_missing_data(tmp_path):
    return ["train", "--config", "configs/tiny.yaml", "--data", tmp_path / "nope.npz"], "not found"


def _case_unknown_key(tmp_path):
    return ["train", "--config", "configs/tiny.yaml", "--set", "train.epochz=3"], "epochz"


def _case_wrong_type(tmp_path):
    return ["train", "--config", "configs/tiny.yaml", "--set", "train.epochs=many"], "train.epochs"


def _case_unknown_backbone(tmp_path):
    from conftest import shared_file

    return ["train", "--config", "configs/tiny.yaml", "--data", shared_file("breastmnist.npz"),
            "--set", "model.backbone=resnet_does_not_exist", "--out", tmp_path], "unknown backbone"


def _case_unknown_schedule(tmp_path):
    return ["train", "--config", "configs/tiny.yaml", "--set", "diffusion.schedule=quadratic"], "schedule"


def _case_unknown_sampler(tmp_path):
    return ["train", "--config", "configs/tiny.yaml", "--set", "diffusion.sampler=euler"], "sampler"


def _case_missing_config(tmp_path):
    return ["train", "--config", tmp_path / "none.yaml"], "config file not found"


def _case_bad_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: [unclosed\n")
    return ["train", "--config", p], "bad.yaml"


def _case_bad_override(tmp_path):
    return ["config", "--set", "train.epochs"], "section.key=value"


def _case_corrupt_checkpoint(tmp_path):
    p = tmp_path / "model.pt"
    p.write_bytes(b"\x80\x04garbage" * 10)
    return ["evaluate", "--checkpoint", p], "model.pt"


def _case_missing_checkpoint(tmp_path):
    return ["predict", "--checkpoint", tmp_path / "missing.pt", tmp_path / "a.png"], "checkpoint not found"


def _case_not_a_diffmic_checkpoint(tmp_path):
    import torch

    p = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, p)
    return ["evaluate", "--checkpoint", p], "not a diffmic checkpoint"


CASES = [
    _case_garbage_npz, _case_wrong_keys, _case_label_range, _case_label_range_names, _case_wrong_rank,
    _case_missing_data, _case_unknown_key, _case_wrong_type, _case_unknown_backbone, _case_unknown_schedule,
    _case_unknown_sampler, _case_missing_config, _case_bad_yaml, _case_bad_override,
    _case_corrupt_checkpoint, _case_missing_checkpoint, _case_not_a_diffmic_checkpoint,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[6:] for c in CASES])
def test_bad_input_gives_one_clear_line(case, tmp_path, capsys):
    argv, expected = case(tmp_path)
    code, _, err = run(argv, capsys)
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("diffmic: error:"), err
    assert "Traceback" not in err
    assert expected.lower() in lines[0].lower(), lines[0]


def test_predict_unreadable_image(tiny_checkpoint, tmp_path, capsys):
    ckpt, _ = tiny_checkpoint
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    code, _, err = run(["predict", "--checkpoint", ckpt, bad], capsys)
    assert code == 1 and "broken.png" in err and len(err.strip().splitlines()) == 1


def test_evaluate_more_classes_than_checkpoint(tiny_checkpoint, capsys):
    from conftest import shared_file

    ckpt, _ = tiny_checkpoint
    code, _, err = run(["evaluate", "--checkpoint", ckpt, "--data", shared_file("retinamnist.npz")], capsys)
    assert code == 1 and "classes" in err


def test_unwritable_output(tiny_checkpoint, tmp_path, capsys):
    ckpt, data = tiny_checkpoint
    code, _, err = run(["evaluate", "--checkpoint", ckpt, "--data", data, "--out", tmp_path / "no" / "r.json"], capsys)
    assert code == 1 and "does not exist" in err


def test_failed_train_leaves_no_run_folder(tmp_path, capsys):
    out = tmp_path / "runs"
    code, _, _ = run(["train", "--config", "configs/tiny.yaml", "--data", tmp_path / "missing.npz", "--out", out],
                     capsys)
    assert code == 1
    assert not out.exists()
