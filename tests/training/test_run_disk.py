"""Disk per run: one resumable checkpoint and the selected model once (issue 12).

A short real training run (tiny backbones, a few images) keeps ``last.ckpt`` (full training
state) and, while training, the best validation epoch's weights as a model file; once finished,
the run folder holds ``model.pt`` (those weights) and ``last.ckpt`` only. Selection is unchanged:
``model.pt`` holds exactly the weights of the epoch with the best logged ``val/select``.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_OVERRIDES, breastmnist_subset

from diffmic import load_model
from diffmic.config import DiffMICConfig
from diffmic.models.checkpoint import CHECKPOINT_FORMAT
from diffmic.runs import RunDir
from diffmic.training.api import resume, train
from diffmic.training.checkpointing import AtomicCheckpointIO, lightning_to_model_payload

pytestmark = [pytest.mark.train, pytest.mark.usefixtures("one_thread")]

EPOCHS = ["train.dcg_pretrain_epochs=1", "train.epochs=3", "train.warmup_epochs=1", "train.val_every=1",
          "data.batch_size=32", "eval.samples=2", "train.seed=5"]
# what a finished run folder holds (logs/ may also hold Lightning's hparams.yaml)
FINISHED = {"config.yaml", "model.pt", "metrics.json", "checkpoints/last.ckpt", "logs/metrics.csv"}


class Crash(RuntimeError):
    pass


class Snapshots(L.Callback):
    """Records, at every validation end, the weights a model file of that epoch would hold, and the
    checkpoint files on disk at the end of fit (before ``train`` tidies the run folder).
    ``crash_at_epoch``: raise at the start of that epoch (the previous epoch's checkpoints are written)."""

    def __init__(self, crash_at_epoch: int | None = None) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.files_at_fit_end: dict[str, dict] = {}
        self.crash_at_epoch = crash_at_epoch

    def on_validation_end(self, trainer, module) -> None:
        payload = {"hyper_parameters": dict(module.hparams), "epoch": trainer.current_epoch,
                   "state_dict": {k: v.detach().clone() for k, v in module.state_dict().items()}}
        self.weights[trainer.current_epoch] = lightning_to_model_payload(payload)["state_dict"]

    def on_train_epoch_start(self, trainer, module) -> None:
        if trainer.current_epoch == self.crash_at_epoch:
            raise Crash

    def on_fit_end(self, trainer, module) -> None:
        folder = Path(trainer.default_root_dir) / "checkpoints"
        self.files_at_fit_end = {p.name: torch.load(p, weights_only=True) for p in sorted(folder.iterdir())}


def _files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()} - {"logs/hparams.yaml"}


def _select_epochs(run_dir: Path) -> dict[int, float]:
    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
    return {int(r["epoch"]): float(r["val/select"]) for r in rows if r.get("val/select")}


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory) -> Path:
    return breastmnist_subset(tmp_path_factory.mktemp("data") / "breast_disk.npz", {"train": 64, "val": 24, "test": 24})


@pytest.fixture(scope="module")
def finished_run(small_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = DiffMICConfig.from_yaml(None, [f"data.path={small_npz}", *TINY_OVERRIDES, *EPOCHS,
                                         f"train.out_dir={out}", "train.run_name=r"])
    snaps = Snapshots()
    result = train(cfg, callbacks=[snaps])
    return cfg, result, snaps


def test_finished_run_holds_one_checkpoint_and_the_model_once(finished_run):
    _, result, snaps = finished_run
    assert _files(result.run_dir) == FINISHED
    assert result.checkpoint == RunDir(result.run_dir).last_checkpoint
    # while training: last.ckpt is the full training state, best.ckpt the selected weights only
    files = snaps.files_at_fit_end
    assert set(files) == {"best.ckpt", "last.ckpt"}
    last, best = files["last.ckpt"], files["best.ckpt"]
    assert "optimizer_states" in last and "callbacks" in last and any(k.startswith("ema.") for k in last["state_dict"])
    assert best["format"] == CHECKPOINT_FORMAT and "optimizer_states" not in best
    model_pt = torch.load(result.model_path, weights_only=True)
    assert best["state_dict"].keys() == model_pt["state_dict"].keys()
    for k, v in best["state_dict"].items():
        assert torch.equal(v, model_pt["state_dict"][k]), k


def test_model_pt_is_the_selected_epoch(finished_run):
    _, result, snaps = finished_run
    select = _select_epochs(result.run_dir)
    best_epoch = max(select, key=lambda e: (select[e], -e))  # the first epoch with the best score
    assert result.metrics["selected_epoch"] == best_epoch
    state = torch.load(result.model_path, weights_only=True)["state_dict"]
    expected = snaps.weights[best_epoch]
    assert state.keys() == expected.keys()
    for k in state:
        assert torch.equal(state[k], expected[k]), k
    # the EMA denoiser (train.ema_eval), not the raw one, as at validation
    last = torch.load(result.checkpoint, weights_only=True)["state_dict"]
    assert any(k.startswith("ema.shadow.") for k in last)


def test_removed_best_ckpt_reads_as_model_pt(finished_run, tmp_path):
    from diffmic.cli import main

    _, result, _ = finished_run
    best = RunDir(result.run_dir).best_checkpoint
    assert not best.exists()
    assert RunDir.resolve_checkpoint(best) == result.model_path
    assert RunDir.resolve_checkpoint(tmp_path / "checkpoints" / "best.ckpt") == tmp_path / "checkpoints" / "best.ckpt"
    a, b = load_model(best), load_model(result.model_path)
    assert a.temperature == b.temperature
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    out = tmp_path / "e.json"
    assert main(["evaluate", "--checkpoint", str(best), "--out", str(out)]) == 0
    assert "diffusion" in json.loads(out.read_text())


def test_crashed_run_resumes_to_the_same_model(finished_run, tmp_path):
    """A run that died at the start of epoch 2 (no model.pt yet) resumes to the uninterrupted result."""
    cfg, reference, _ = finished_run
    run_dir = tmp_path / "crashed"
    with pytest.raises(Crash):
        train(cfg, run_dir=run_dir, callbacks=[Snapshots(crash_at_epoch=2)])
    assert _files(run_dir) == {"config.yaml", "checkpoints/last.ckpt", "checkpoints/best.ckpt", "logs/metrics.csv"}
    assert RunDir(run_dir).is_resumable
    resumed = resume(run_dir)
    assert _files(run_dir) == FINISHED
    assert resumed.metrics["selected_epoch"] == reference.metrics["selected_epoch"]
    a = torch.load(resumed.model_path, weights_only=True)["state_dict"]
    b = torch.load(reference.model_path, weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_resume_of_a_run_with_a_full_lightning_best_ckpt(finished_run, tmp_path):
    """Runs written before this layout (best.ckpt a full Lightning checkpoint) still resume and finish."""
    cfg, _, _ = finished_run
    run_dir = tmp_path / "old"
    with pytest.raises(Crash):
        train(cfg, run_dir=run_dir, callbacks=[Snapshots(crash_at_epoch=3)])
    run = RunDir(run_dir)
    full = torch.load(run.last_checkpoint, weights_only=True)
    shutil.copy(run.last_checkpoint, run.best_checkpoint)  # an old-style best.ckpt, of epoch 2
    key = next(k for k in full["callbacks"] if "val/select" in k)
    unbeatable = torch.tensor(2.0)  # the resumed epoch 3 does not replace it
    full["callbacks"][key].update(best_model_score=unbeatable, best_model_path=str(run.best_checkpoint),
                                  kth_best_model_path=str(run.best_checkpoint), kth_value=unbeatable,
                                  best_k_models={str(run.best_checkpoint): unbeatable})
    torch.save(full, run.last_checkpoint)
    result = resume(run_dir)
    assert result.metrics["selected_epoch"] == full["epoch"] == 2
    assert _files(run_dir) == FINISHED
    state = torch.load(result.model_path, weights_only=True)["state_dict"]
    expected = lightning_to_model_payload(full)["state_dict"]
    for k in expected:
        assert torch.equal(state[k], expected[k]), k


def test_atomic_io_writes_model_files_only_for_the_named_paths(finished_run, tmp_path):
    _, result, _ = finished_run
    full = torch.load(result.checkpoint, weights_only=True)
    io = AtomicCheckpointIO(model_files=(tmp_path / "best.ckpt",))
    io.save_checkpoint(full, tmp_path / "best.ckpt")
    io.save_checkpoint(full, tmp_path / "last.ckpt")
    best = torch.load(tmp_path / "best.ckpt", weights_only=True)
    assert best["format"] == CHECKPOINT_FORMAT and best["extra"]["epoch"] == full["epoch"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True).keys() == full.keys()
    assert (tmp_path / "best.ckpt").stat().st_size < (tmp_path / "last.ckpt").stat().st_size / 2
