"""Two-process DDP training on CPU (gloo) on real images: ranks agree, evaluation counts each image once."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, shared_file

from diffmic import load_model
from diffmic.data.medmnist import read_medmnist
from diffmic.evaluation.metrics import classification_metrics

pytestmark = [pytest.mark.ddp, pytest.mark.train, pytest.mark.subprocess]

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    torch.set_num_threads(1)
    import lightning as L
    from diffmic.config import DiffMICConfig
    from diffmic.training.api import train

    class DumpWeights(L.Callback):
        def on_fit_end(self, trainer, module):
            state = {k: v.detach().cpu().clone() for k, v in module.model.state_dict().items()}
            torch.save({"state": state, "world_size": trainer.world_size},
                       f"{sys.argv[1]}/rank{trainer.global_rank}.pt")

    cfg = DiffMICConfig.from_yaml(None, sys.argv[2:])
    train(cfg, run_dir=f"{sys.argv[1]}/run", callbacks=[DumpWeights()])
    """
)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    src = np.load(shared_file("breastmnist.npz"))
    base = tmp_path_factory.mktemp("ddp")
    data = base / "breast_small.npz"
    n = {"train": 128, "val": 33, "test": 40}  # 33: the distributed sampler pads it to 34
    np.savez(data, **{f"{s}_{k}": src[f"{s}_{k}"][:n[s]] for s in n for k in ("images", "labels")})
    script = base / "ddp_script.py"
    script.write_text(SCRIPT)
    overrides = [f"data.path={data}", *TINY_OVERRIDES, "train.dcg_pretrain_epochs=1", "train.epochs=1",
                 "data.batch_size=32", "data.eval_batch_size=8", "train.strategy=ddp", "train.devices=2",
                 "train.accelerator=cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(script), str(base), *overrides], check=False, capture_output=True,
                          text=True, timeout=600, env=env, cwd=base)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return base, data


def test_both_ranks_trained_and_agree_on_weights_and_buffers(ddp_run):
    base, _ = ddp_run
    r0 = torch.load(base / "rank0.pt", weights_only=True)
    r1 = torch.load(base / "rank1.pt", weights_only=True)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        torch.testing.assert_close(r1["state"][k], r0["state"][k], rtol=0, atol=1e-6, msg=k)
    # and the saved checkpoint holds those weights
    saved = torch.load(base / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for k, v in r0["state"].items():
        torch.testing.assert_close(saved[f"model.{k}"], v, msg=k)


def test_validation_metrics_cover_the_split_exactly_once(ddp_run):
    base, data = ddp_run
    with open(base / "run" / "logs" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/num_images")]
    assert rows, "no validation rows logged"
    assert {float(r["val/num_images"]) for r in rows} == {33.0}
    # the DCG validation accuracy logged by the 2 ranks equals a single-process pass over the split
    last = rows[-1]
    model = load_model(base / "run" / "checkpoints" / "last.ckpt").eval()
    val = read_medmnist(data).val
    with torch.no_grad():
        x = model.preprocess(val.images)
        prior = model.guidance(x).logits.softmax(1)
    expected = classification_metrics(prior, torch.from_numpy(val.labels), model.num_classes)
    assert float(last["val/dcg_acc"]) == pytest.approx(expected["acc"], abs=1e-6)
    assert float(last["val/dcg_auroc"]) == pytest.approx(expected["auroc"], abs=1e-5)


def test_main_process_wrote_the_run(ddp_run):
    base, _ = ddp_run
    metrics = json.loads((base / "run" / "metrics.json").read_text())
    test = metrics["test"]
    cm = np.asarray(test["confusion_matrix"])
    assert cm.sum() == test["num_images"] == 40  # every test image once, no sampler padding
    assert test["diffusion"]["acc"] == pytest.approx(np.trace(cm) / cm.sum())
    assert (base / "run" / "model.pt").is_file()
