"""What ``diffmic train`` shows: each Lightning line once, no advertising or library deprecations, one line
per epoch off a terminal; ``train.logger=tensorboard`` writes event files; MedMNIST names reach the run."""

from __future__ import annotations

import collections
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_OVERRIDES

from diffmic.cli import main
from diffmic.config import DiffMICConfig
from diffmic.errors import ConfigError
from diffmic.training import loggers

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
SRC = Path(__file__).resolve().parents[2] / "src"


def _synthetic_breastmnist(folder: Path) -> None:
    rng = np.random.default_rng(0)
    n = {"train": 48, "val": 16, "test": 16}
    arrays = {}
    for split, k in n.items():
        labels = (np.arange(k) % 2).astype(np.uint8)
        images = rng.integers(0, 80, (k, 28, 28), dtype=np.uint8)
        images[labels == 1, 8:20, 8:20] += 150  # learnable: a bright square
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    folder.mkdir(parents=True)
    np.savez(folder / "breastmnist.npz", **arrays)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("out")
    _synthetic_breastmnist(base / "medmnist")
    overrides = [*TINY_OVERRIDES, "train.dcg_pretrain_epochs=1", "train.epochs=1", "data.batch_size=16",
                 "eval.samples=2", "train.progress=true",
                 f"train.logger={'tensorboard' if HAS_TENSORBOARD else 'csv'}"]
    cmd = [sys.executable, "-m", "diffmic", "train", "--data", "breastmnist", "--out", str(base / "runs"),
           "--name", "r"]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, MEDMNIST_ROOT=str(base / "medmnist"), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900, env=env, cwd=base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, base / "runs" / "r"


def test_each_line_once_and_nothing_but_the_run(cli_run):
    proc, _ = cli_run
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert any("GPU available" in ln for ln in lines)  # Lightning's own info still shows ...
    twice = [ln for ln, k in collections.Counter(lines).items() if k > 1]
    assert not twice, twice  # ... once
    assert not any(ln.startswith("INFO:") for ln in lines)
    text = proc.stdout + proc.stderr
    for noise in ("litlogger", "LeafSpec", "Tip:", "Warning", "deprecated"):
        assert noise not in text, noise


def test_one_line_per_epoch_when_stdout_is_not_a_terminal(cli_run):
    proc, _ = cli_run
    assert "\r" not in proc.stdout and "it/s" not in proc.stdout + proc.stderr
    epochs = [ln for ln in proc.stdout.splitlines() if ln.startswith("epoch ")]
    assert len(epochs) == 2
    assert epochs[0].startswith("epoch 1/2 (DCG pre-training)") and "val DCG acc" in epochs[0]
    assert epochs[1].startswith("epoch 2/2 (joint)") and "| loss " in epochs[1] and "| val acc " in epochs[1]


def test_medmnist_names_reach_the_run(cli_run):
    _, run = cli_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["class_names"] == ["malignant", "normal, benign"]
    assert Path(metrics["dataset"]).name == "breastmnist.npz"


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard not installed (pip install 'diffmic[tensorboard]')")
def test_tensorboard_event_files_beside_the_csv(cli_run):
    _, run = cli_run
    events = list((run / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert {"val/dcg_acc", "train/dcg_loss", "train/loss"} <= set(acc.Tags()["scalars"])
    assert (run / "logs" / "metrics.csv").is_file()  # the report's training curves and --resume read it


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_progress_bars_only_in_a_terminal():
    from lightning.pytorch.callbacks import TQDMProgressBar

    t = DiffMICConfig().train
    cbs, bar = loggers.progress_callbacks(t, _Stream(tty=True))
    assert bar and len(cbs) == 1 and isinstance(cbs[0], TQDMProgressBar)
    cbs, bar = loggers.progress_callbacks(t, _Stream(tty=False))
    assert not bar and len(cbs) == 1 and isinstance(cbs[0], loggers.EpochLines)
    off = DiffMICConfig.from_yaml(None, ["train.progress=false"]).train
    assert loggers.progress_callbacks(off, _Stream(tty=True)) == ([], False)


def test_logger_and_num_nodes_are_validated():
    with pytest.raises(ConfigError, match="train.logger"):
        DiffMICConfig.from_yaml(None, ["train.logger=wandb"])
    with pytest.raises(ConfigError, match="train.num_nodes"):
        DiffMICConfig.from_yaml(None, ["train.num_nodes=0"])


def test_tensorboard_missing_is_one_line_before_any_file(tmp_path, monkeypatch, capsys, breastmnist):
    monkeypatch.setattr(loggers, "_tensorboard_available", lambda: False)
    out = tmp_path / "runs"
    code = main(["train", "--data", str(breastmnist), "--out", str(out), "--set", "train.logger=tensorboard",
                 *[a for o in TINY_OVERRIDES for a in ("--set", o)]])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "diffmic[tensorboard]" in err
    assert not out.exists()


def test_litlogger_tip_is_dropped_at_its_logger():
    import logging

    loggers.quiet_lightning()
    loggers.quiet_lightning()  # idempotent
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    assert log.filters.count(loggers._FILTER) == 1
    tip = logging.LogRecord(log.name, logging.INFO, __file__, 1, "💡 Tip: try installing [litlogger](x)", None, None)
    run = logging.LogRecord(log.name, logging.INFO, __file__, 1, "GPU available: False, used: False", None, None)
    assert not log.filter(tip) and log.filter(run)
