"""``diffmic train`` under ``torchrun`` as two CPU "nodes" of one process each (train.num_nodes=2).

Lightning takes ranks and world size from torchrun's environment and refuses a Trainer whose
``devices * num_nodes`` differs from it, so this run needs ``train.num_nodes`` to reach the Trainer.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_OVERRIDES, shared_file

SRC = Path(__file__).resolve().parents[2] / "src"
N = {"train": 128, "val": 33, "test": 40}
BATCH = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    src = np.load(shared_file("breastmnist.npz"))
    base = tmp_path_factory.mktemp("torchrun")
    np.savez(base / "breast_small.npz", **{f"{s}_{k}": src[f"{s}_{k}"][:N[s]] for s in N for k in ("images", "labels")})
    overrides = [*TINY_OVERRIDES, "train.dcg_pretrain_epochs=1", "train.epochs=1", f"data.batch_size={BATCH}",
                 "data.eval_batch_size=8", "eval.samples=2", "train.strategy=ddp", "train.accelerator=cpu",
                 "train.devices=1", "train.num_nodes=2", "train.progress=true"]
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    procs = []
    for node in (1, 0):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "diffmic", "train", "--data", "breast_small.npz", "--out", "runs", "--name", "two-nodes"]
        for o in overrides:
            cmd += ["--set", o]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      cwd=base))
    outputs = {}
    try:
        for node, p in zip((1, 0), procs, strict=True):
            outputs[node] = p.communicate(timeout=600)
            assert p.returncode == 0, f"node {node}: {outputs[node][1][-3000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return base / "runs" / "two-nodes", outputs


def test_one_world_of_two_processes(two_nodes):
    _, out = two_nodes
    assert "Starting with 2 processes" in out[0][1]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out[1][1]
    assert "run folder:" in out[0][0] and "run folder:" not in out[1][0]  # rank 0 reports, once


def test_effective_batch_is_per_process_batch_times_world_size(two_nodes):
    run, _ = two_nodes
    with open(run / "logs" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    last_step_of_epoch0 = max(int(r["step"]) for r in rows if r["epoch"] == "0")
    # 128 images / (32 per process * 2 processes) = 2 steps per epoch (one process: 4)
    assert last_step_of_epoch0 + 1 == N["train"] // (BATCH * 2)
    val = [r for r in rows if r.get("val/num_images")]
    assert val and {float(r["val/num_images"]) for r in val} == {float(N["val"])}  # each image once


def test_the_run_is_complete(two_nodes):
    run, _ = two_nodes
    metrics = json.loads((run / "metrics.json").read_text())
    test = metrics["test"]
    cm = test["confusion_matrix"]  # every test image evaluated exactly once, and ACC read off that matrix
    assert test["num_images"] == sum(map(sum, cm)) == N["test"]
    assert abs(test["diffusion"]["acc"] - sum(cm[i][i] for i in range(len(cm))) / N["test"]) < 1e-6
    assert (run / "model.pt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
