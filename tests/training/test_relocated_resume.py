"""A run folder that was moved keeps its model-selection state when it is resumed."""

from __future__ import annotations

from pathlib import Path

import torch

from diffmic.training.checkpointing import RelocatableModelCheckpoint


def _saved_state(folder: Path) -> dict:
    cb = RelocatableModelCheckpoint(dirpath=folder, filename="best", monitor="val/select", mode="max", save_top_k=1)
    cb.best_model_score = torch.tensor(0.7)
    cb.best_model_path = str(folder / "best.ckpt")
    cb.kth_best_model_path = str(folder / "best.ckpt")
    cb.kth_value = torch.tensor(0.7)
    cb.best_k_models = {str(folder / "best.ckpt"): torch.tensor(0.7)}
    cb.last_model_path = str(folder / "last.ckpt")
    return cb.state_dict()


def test_state_from_a_moved_folder_is_restored_under_the_new_path(tmp_path):
    old, new = tmp_path / "old" / "checkpoints", tmp_path / "new" / "checkpoints"
    cb = RelocatableModelCheckpoint(dirpath=new, filename="best", monitor="val/select", mode="max", save_top_k=1)
    cb.load_state_dict(_saved_state(old))
    assert cb.best_model_score == torch.tensor(0.7)  # Lightning's own callback drops it here
    assert Path(cb.best_model_path) == new / "best.ckpt"
    assert Path(cb.last_model_path) == new / "last.ckpt"
    assert [Path(k) for k in cb.best_k_models] == [new / "best.ckpt"]
    assert cb.kth_value == torch.tensor(0.7)


def test_state_from_the_same_folder_is_restored_as_lightning_does(tmp_path):
    folder = tmp_path / "checkpoints"
    cb = RelocatableModelCheckpoint(dirpath=folder, filename="best", monitor="val/select", mode="max", save_top_k=1)
    state = _saved_state(folder)
    cb.load_state_dict(state)
    assert cb.best_model_score == torch.tensor(0.7) and cb.best_model_path == state["best_model_path"]


def test_state_key_is_model_checkpoints_so_older_checkpoints_resume(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    kw = {"dirpath": tmp_path, "filename": "best", "monitor": "val/select", "mode": "max", "save_top_k": 1}
    assert RelocatableModelCheckpoint(**kw).state_key == ModelCheckpoint(**kw).state_key
