"""EpochLines: the one line per epoch that a non-terminal run prints."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch

from diffmic.training.loggers import EpochLines


def line(*, pretraining: bool, joint_train: bool) -> str:
    trainer = SimpleNamespace(is_global_zero=True, current_epoch=5, max_epochs=25, callback_metrics={
        "train/loss": torch.tensor(0.125), "train/dcg_loss": torch.tensor(1.5), "val/acc": torch.tensor(0.5),
        "val/dcg_acc": torch.tensor(0.25)})
    module = SimpleNamespace(pretraining=pretraining,
                             cfg=SimpleNamespace(train=SimpleNamespace(joint_train=joint_train, select_metric="acc")))
    out = io.StringIO()
    EpochLines(out).on_train_epoch_end(trainer, module)
    return out.getvalue()


@pytest.mark.parametrize(("pretraining", "joint_train", "phase", "dcg_loss"), [
    (False, True, "joint", True),
    (False, False, "diffusion, DCG frozen", False),  # a frozen DCG has no loss of its own this epoch
    (True, False, "DCG pre-training", True),
])
def test_phase_and_losses(pretraining, joint_train, phase, dcg_loss):
    text = line(pretraining=pretraining, joint_train=joint_train)
    assert text.startswith(f"epoch 6/25 ({phase}) | loss 0.1250")
    assert ("DCG loss 1.5000" in text) is dcg_loss
    assert "| val acc 0.5000 | val DCG acc 0.2500 |" in text and text.endswith(" s\n")
