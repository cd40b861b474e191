"""End to end: ``diffmic train`` on a generated image-folder dataset, then evaluate and predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_OVERRIDES
from PIL import Image

from diffmic.cli import main

pytestmark = pytest.mark.train


def _make_folder_dataset(root, per_class=16, size=32):
    rng = np.random.default_rng(0)
    for c, name in enumerate(["benign", "malignant", "normal"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
            img[4 + 8 * c: 12 + 8 * c, 4:20] = 255  # class-dependent bright band
            mode = "L" if i % 4 == 0 else "RGB"  # mixed modes are converted
            Image.fromarray(img).convert(mode).save(root / name / f"{name}_{i}.png")


def test_train_evaluate_predict_on_folder(tmp_path, capsys):
    data = tmp_path / "images"
    _make_folder_dataset(data)
    out = tmp_path / "runs"
    sets = [f"--set={o}" for o in TINY_OVERRIDES]
    code = main([
        "train", "--data", str(data), "--out", str(out), "--name", "folder",
        "--set", "data.format=folder", "--set", "data.image_size=28", "--set", "data.batch_size=16",
        "--set", "data.val_fraction=0.25", "--set", "data.test_fraction=0.25",
        "--set", f"data.cache_dir={tmp_path / 'cache'}",
        "--set", "train.dcg_pretrain_epochs=1", "--set", "train.epochs=1", "--set", "eval.samples=2", *sets,
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    run = out / "folder"
    split = json.loads((run / "split.json").read_text())
    ids = [i for s in ("train", "val", "test") for i in split_ids(split, s)]
    assert len(ids) == len(set(ids)) == 48  # every image in exactly one split
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["class_names"] == ["benign", "malignant", "normal"]
    assert "DiffMIC" in captured.out and "test" in captured.out

    code = main(["evaluate", "--checkpoint", str(run / "model.pt"), "--out", str(tmp_path / "eval.json")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["num_images"] == metrics["test"]["num_images"]
    # evaluate takes the run's split.json (not a fresh split): move 3 test images to train and see
    split["train"] = split["train"] + split["test"][:3]
    split["test"] = split["test"][3:]
    (run / "split.json").write_text(json.dumps(split))
    code = main(["evaluate", "--checkpoint", str(run / "checkpoints" / "best.ckpt"),
                 "--out", str(tmp_path / "e2.json")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads((tmp_path / "e2.json").read_text())["num_images"] == metrics["test"]["num_images"] - 3

    image = next((data / "normal").glob("*.png"))
    code = main(["predict", "--checkpoint", str(run / "model.pt"), str(image)])
    out_text = capsys.readouterr().out
    assert code == 0
    header = out_text.splitlines()[0]
    assert header.startswith("path,prediction,p_benign,p_malignant,p_normal,")
    assert {"entropy", "vote_normal", "low_normal", "high_normal"} <= set(header.split(","))


def split_ids(split: dict, name: str) -> list[str]:
    value = split[name] if name in split else split["splits"][name]
    return list(value)
