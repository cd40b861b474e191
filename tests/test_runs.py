"""RunDir: the run-folder layout, in one place."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_OVERRIDES

from diffmic.config import DiffMICConfig
from diffmic.errors import CheckpointError
from diffmic.models import build_model, save_model
from diffmic.runs import RunDir, find_resumable, model_data_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    cfg = DiffMICConfig.from_yaml(None, ["data.path=data/x.npz", *TINY_OVERRIDES, "data.class_names=[a, b]"])
    return build_model(cfg, num_classes=2, in_chans=1, image_size=28, class_names=["a", "b"])


def test_layout(tmp_path):
    run = RunDir(tmp_path)
    assert run.config_file == tmp_path / "config.yaml"
    assert run.split_file == tmp_path / "split.json"
    assert run.model_file == tmp_path / "model.pt"
    assert run.metrics_file == tmp_path / "metrics.json"
    assert run.last_checkpoint == tmp_path / "checkpoints" / "last.ckpt"
    assert run.best_checkpoint == tmp_path / "checkpoints" / "best.ckpt"
    assert run.log_file == tmp_path / "logs" / "metrics.csv"
    assert RunDir(str(tmp_path)) == run


def test_finished_and_resumable(tmp_path):
    run = RunDir(tmp_path)
    assert not run.is_finished and not run.is_resumable
    run.checkpoint_dir.mkdir()
    run.last_checkpoint.write_bytes(b"x")
    assert run.is_resumable
    run.metrics_file.write_text("{}")
    assert run.is_finished and not run.is_resumable


def test_find_resumable_picks_the_newest_unfinished_run_of_the_dataset(tmp_path):
    for name, finished in (("x-1", False), ("x-2", False), ("x-3", True), ("y-1", False)):
        run = RunDir(tmp_path / name)
        run.checkpoint_dir.mkdir(parents=True)
        run.last_checkpoint.write_bytes(b"x")
        if finished:
            run.metrics_file.write_text("{}")
    newest = RunDir(tmp_path / "x-1").last_checkpoint
    newest.touch()
    assert find_resumable(tmp_path, run_name=None, prefix="x-") == RunDir(tmp_path / "x-1")
    assert find_resumable(tmp_path, run_name="x-3", prefix="x-") is None
    assert find_resumable(tmp_path / "none", run_name=None, prefix="x-") is None


def test_of_checkpoint(tmp_path):
    (tmp_path / "config.yaml").write_text("{}")
    assert RunDir.of_checkpoint(tmp_path / "model.pt") == RunDir(tmp_path)
    assert RunDir.of_checkpoint(tmp_path / "checkpoints" / "best.ckpt") == RunDir(tmp_path)
    assert RunDir.of_checkpoint(tmp_path / "a" / "b" / "model.pt") is None


def test_load_config_reuses_the_runs_split(tmp_path, model):
    run = RunDir(tmp_path)
    with pytest.raises(CheckpointError, match="no config.yaml"):
        run.load_config()
    DiffMICConfig.from_dict(model.config).save(run.config_file)
    assert run.load_config().data.split_file is None
    run.split_file.write_text("{}")
    assert run.load_config().data.split_file == str(run.split_file)


def test_load_model_reads_the_file_once(tmp_path, model, monkeypatch):
    run = RunDir(tmp_path)
    with pytest.raises(CheckpointError, match="not a finished diffmic run folder"):
        run.load_model()
    save_model(model, run.model_file, extra={"selected_epoch": 7})
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    loaded, extra = run.load_model()
    assert len(calls) == 1
    assert extra == {"selected_epoch": 7} and loaded.class_names == ["a", "b"]


def test_metrics_tolerates_missing_and_broken_files(tmp_path):
    run = RunDir(tmp_path)
    assert run.metrics() == {}
    run.metrics_file.write_text("{not json")
    assert run.metrics() == {}
    run.metrics_file.write_text(json.dumps({"selected_epoch": 3}))
    assert run.metrics() == {"selected_epoch": 3}


def test_read_log(tmp_path):
    run = RunDir(tmp_path)
    run.log_file.parent.mkdir()
    run.log_file.write_text("epoch,step,train/loss,val/select\n0,3,0.5,-1\n1,6,0.25,0.7\n")
    assert run.read_log() == {"train/loss": [(0.0, 0.5), (1.0, 0.25)], "val/select": [(1.0, 0.7)]}


def test_model_data_config(tmp_path, model):
    own = model_data_config(model, split_file=tmp_path / "split.json")
    assert (own.path, own.image_size, own.channels) == ("data/x.npz", 28, 1)
    assert own.class_names == ["a", "b"] and own.split_file == str(tmp_path / "split.json")
    other = model_data_config(model, path="other.npz", format="medmnist", split_file=tmp_path / "split.json")
    assert other.path == "other.npz" and other.class_names is None and other.split_file is None
    assert DiffMICConfig.from_dict(model.config).data.path == "data/x.npz"  # the model's config unchanged
