"""Crash safety: a training process killed with SIGKILL mid-epoch is resumed and finishes as if never killed."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES, breastmnist_subset

from diffmic.training.checkpointing import (
    AtomicCheckpointIO,
    atomic_torch_save,
    remove_partial_files,
)

EPOCHS = ["train.dcg_pretrain_epochs=1", "train.epochs=3", "train.warmup_epochs=1", "train.val_every=1"]

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    import lightning as L
    from diffmic.config import DiffMICConfig
    from diffmic.training.api import train

    class KillAt(L.Callback):
        def __init__(self, epoch, batch):
            self.epoch, self.batch = epoch, batch
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.current_epoch == self.epoch and batch_idx == self.batch:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: a real crash

    run_dir, kill_epoch, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    cfg = DiffMICConfig.from_yaml(None, overrides)
    callbacks = [KillAt(kill_epoch, 1)] if kill_epoch >= 0 else []
    train(cfg, run_dir=run_dir, callbacks=callbacks)
    """
)


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory) -> Path:
    """A small MedMNIST-format file cut from BreastMNIST (odd validation size on purpose)."""
    return breastmnist_subset(tmp_path_factory.mktemp("data") / "breast_small.npz",
                              {"train": 96, "val": 33, "test": 40})


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("DIFFMIC_SHARED_DATA", None)
    return env


def _train(script: Path, run_dir: Path, kill_epoch: int, data: Path) -> subprocess.CompletedProcess:
    overrides = [f"data.path={data}", *TINY_OVERRIDES, *EPOCHS, "data.batch_size=32", "train.seed=3"]
    return subprocess.run([sys.executable, str(script), str(run_dir), str(kill_epoch), *overrides],
                          check=False, capture_output=True, text=True, timeout=600, env=_env())


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "logs" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(small_npz, tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    script = base / "train_script.py"
    script.write_text(SCRIPT)
    reference = base / "reference"
    done = _train(script, reference, -1, small_npz)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = base / "killed"
    crash = _train(script, killed, 2, small_npz)  # SIGKILL at batch 1 of epoch 2 (of 0..3)
    assert crash.returncode == -signal.SIGKILL, crash.stderr[-3000:]
    state = {
        "files_after_kill": sorted(p.name for p in (killed / "checkpoints").iterdir()),
        "epoch_after_kill": torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["epoch"],
        "metrics_after_kill": (killed / "metrics.json").exists(),
    }
    shutil.copytree(killed, base / "elsewhere" / "moved")  # the same crashed run, in another folder
    resumed = subprocess.run([sys.executable, "-m", "diffmic", "train", "--resume", str(killed)],
                             check=False, capture_output=True, text=True, timeout=600, env=_env())
    return reference, killed, state, resumed


def _selection_callback(payload: dict) -> dict:
    (state,) = [v for k, v in payload["callbacks"].items() if "val/select" in k]
    return state


@pytest.mark.train
@pytest.mark.subprocess
def test_moved_run_folder_resumes_with_its_selection_state(runs):
    """A crashed run moved to another folder keeps its best validation score so far when resumed.

    The moved copy's stored best score is raised to 2.0 (no metric reaches it), so the resumed
    epochs must not replace the selected checkpoint: the run ends on the epoch selected before the
    crash. Lightning's own ModelCheckpoint drops the score when the folder changed and would select
    a resumed epoch.
    """
    _, killed, _, _ = runs
    moved = killed.parent / "elsewhere" / "moved"
    last = moved / "checkpoints" / "last.ckpt"
    payload = torch.load(last, weights_only=False)
    state = _selection_callback(payload)
    assert Path(state["dirpath"]) == killed / "checkpoints"  # recorded where the run was
    state["best_model_score"] = torch.tensor(2.0)
    state["kth_value"] = torch.tensor(2.0)
    state["best_k_models"] = {k: torch.tensor(2.0) for k in state["best_k_models"]}
    torch.save(payload, last)
    before = torch.load(moved / "checkpoints" / "best.ckpt", weights_only=True)["extra"]["epoch"]
    assert before < 2  # selected before the crash in epoch 2

    resumed = subprocess.run([sys.executable, "-m", "diffmic", "train", "--resume", str(moved)],
                             check=False, capture_output=True, text=True, timeout=600, env=_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((moved / "metrics.json").read_text())
    assert metrics["selected_epoch"] == before
    final = _selection_callback(torch.load(moved / "checkpoints" / "last.ckpt", weights_only=False))
    assert float(final["best_model_score"]) == 2.0
    assert Path(final["dirpath"]) == moved / "checkpoints"


@pytest.mark.train
@pytest.mark.subprocess
def test_killed_run_left_complete_checkpoints_only(runs):
    _, _, state, _ = runs
    assert state["epoch_after_kill"] == 1  # epochs 0 and 1 completed before the kill in epoch 2
    assert not state["metrics_after_kill"]
    assert all(name.endswith(".ckpt") for name in state["files_after_kill"]), state["files_after_kill"]


@pytest.mark.train
@pytest.mark.subprocess
def test_resumed_run_finishes_with_continuous_steps(runs):
    reference, killed, _, resumed = runs
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (killed / "metrics.json").is_file() and (killed / "model.pt").is_file()
    ref = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    res = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    assert res["epoch"] == ref["epoch"] == 3
    assert res["global_step"] == ref["global_step"] > 0
    # one resumable checkpoint is kept (the selected model is model.pt); no temporary files are left
    for run in (reference, killed):
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    for p in (killed / "checkpoints").iterdir():
        assert p.suffix == ".ckpt", p
        torch.load(p, weights_only=True)
    # the training curves are continuous: each epoch logged once, the same steps as the uninterrupted run
    ref_rows, res_rows = _rows(reference), _rows(killed)
    key = [(r["epoch"], r["step"]) for r in ref_rows]
    assert [(r["epoch"], r["step"]) for r in res_rows] == key
    assert sorted({int(r["epoch"]) for r in res_rows}) == [0, 1, 2, 3]


@pytest.mark.train
@pytest.mark.subprocess
def test_resumed_run_equals_uninterrupted_run(runs):
    """Optimiser, EMA and RNG states are restored: the resumed run reproduces the uninterrupted one."""
    reference, killed, _, _ = runs
    ref = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    res = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert ref.keys() == res.keys()
    for k in ref:
        torch.testing.assert_close(res[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    a = json.loads((reference / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert a["selected_epoch"] == b["selected_epoch"]
    assert a["test"]["diffusion"]["acc"] == pytest.approx(b["test"]["diffusion"]["acc"])


def test_resume_errors_are_one_line(tmp_path, capsys):
    from diffmic.cli import main

    for target, needle in [
        (tmp_path / "missing", "not found"),
        (tmp_path, "no config.yaml"),
    ]:
        assert main(["train", "--resume", str(target)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err


def test_atomic_save_keeps_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"epoch": 1}, target)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        AtomicCheckpointIO().save_checkpoint({"epoch": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_remove_partial_files(tmp_path):
    (tmp_path / ".last.ckpt.123.partial").write_bytes(b"x")
    (tmp_path / "best.ckpt").write_bytes(b"y")
    assert [p.name for p in remove_partial_files(tmp_path)] == [".last.ckpt.123.partial"]
    assert [p.name for p in tmp_path.iterdir()] == ["best.ckpt"]


def test_find_resumable_run(tmp_path):
    import time

    from diffmic.config import DiffMICConfig, replace
    from diffmic.training.api import find_resumable_run

    def make(name, *, finished=False, ckpt=True):
        d = tmp_path / name
        (d / "checkpoints").mkdir(parents=True)
        if ckpt:
            (d / "checkpoints" / "last.ckpt").write_bytes(b"x")
        if finished:
            (d / "metrics.json").write_text("{}")
        time.sleep(0.01)  # distinct modification times
        return d

    cfg = DiffMICConfig.from_yaml(None, [f"train.out_dir={tmp_path}", "data.path=/data/retina.npz"])
    assert find_resumable_run(cfg) is None
    make("retina-20261126-010000")
    newest = make("retina-20261126-020000")
    make("retina-20261126-030000", finished=True)  # finished: not resumable
    make("retina-20261126-040000", ckpt=False)  # died before its first epoch ended
    make("breast-20261126-050000")  # another dataset
    assert find_resumable_run(cfg) == newest
    named = DiffMICConfig.from_yaml(None, [f"train.out_dir={tmp_path}", "train.run_name=retina-20261126-010000"])
    assert find_resumable_run(named) == tmp_path / "retina-20261126-010000"
    assert find_resumable_run(replace(named, train={"run_name": "retina-20261126-030000"})) is None
