"""Smoke tests of benchmarks/accuracy.py and benchmarks/speed.py on tiny synthetic settings.

They check the plumbing (runs complete, JSON structure, markdown sections), never timings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_BENCHMARK_MODEL, load_benchmark, synthetic_medmnist

pytestmark = pytest.mark.train


TINY_CONFIG = TINY_BENCHMARK_MODEL + """
data: {batch_size: 20, eval_batch_size: 64}
train: {dcg_pretrain_epochs: 1, epochs: 3, warmup_epochs: 1.0, progress: false}
eval: {samples: 1}
"""


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny(tmp_path: Path) -> dict[str, Path]:
    """A synthetic 28x28 MedMNIST-format file (named like an ordinal dataset) and a tiny config."""
    data_dir = tmp_path / "data"
    synthetic_medmnist(data_dir / "retinamnist.npz", {"train": 40, "val": 16, "test": 16}, 3)
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    docs = tmp_path / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    docs.write_text("# Benchmarks\n\nHand-written intro that must survive.\n")
    return {"data": data_dir, "config": config, "docs": docs, "tmp": tmp_path}


def test_accuracy_and_speed_smoke(tiny: dict[str, Path], keep_threads: None) -> None:
    accuracy, speed = load_benchmark("accuracy"), load_benchmark("speed")
    out = tiny["tmp"] / "accuracy.json"
    rc = accuracy.main([
        "--data-dir", str(tiny["data"]), "--config", str(tiny["config"]), "--seeds", "0", "--epochs", "1",
        "--out", str(out), "--docs", str(tiny["docs"]), "--threads", "1",
    ])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "accuracy"
    for key in ("command", "git_commit", "cpu_count", "torch_threads"):
        assert key in result["run"]
    assert result["run"]["command"].startswith("python benchmarks/accuracy.py")
    assert result["run"]["torch_threads"] == 1
    assert set(result["wall_seconds_per_method"]) == {"classifier", "dcg", "diffmic"}
    assert result["settings"]["epochs"] == 1
    assert len(result["runs"]) == 3 and not any("error" in r for r in result["runs"])
    for run in result["runs"]:
        assert set(run["test"]) >= {"acc", "f1", "qwk", "auroc", "ece"}
        assert run["fit_seconds"] >= 0 and run["wall_seconds"] >= 0
    diffmic = next(r for r in result["runs"] if r["method"] == "diffmic")
    assert set(diffmic["test_guidance"]) >= {"acc", "auroc"}
    assert set(diffmic["test_readouts"]) == {"mean_path", "vote", "mean_softmax"}
    summary = result["summary"]["retinamnist"]
    assert {"classifier", "dcg", "diffmic", "diffmic (DCG head)", "diffmic (diffusion − prior)",
            "diffmic [mean_path]", "diffmic [vote] − prior"} <= set(summary)
    assert summary["diffmic"]["acc"]["n"] == 1 and summary["diffmic"]["seeds"] == 1
    paired = summary["diffmic (diffusion − prior)"]["acc"]["mean"]
    assert paired == pytest.approx(diffmic["test"]["acc"] - diffmic["test_guidance"]["acc"])

    text = tiny["docs"].read_text()
    assert "Hand-written intro that must survive." in text
    assert text.count("<!-- accuracy:start -->") == 1 and text.count("<!-- accuracy:end -->") == 1
    section = text.split("<!-- accuracy:start -->")[1].split("<!-- accuracy:end -->")[0]
    assert "| retinamnist | diffmic |" in section and "| retinamnist | classifier |" in section
    assert "published, not re-measured" in section and "0.524" in section  # MedMNIST v2 ResNet-18 (28)
    assert "| retinamnist | diffmic | " in section.split("Readouts of the same DiffMIC runs")[1]

    # The same command again finds every run finished and trains nothing.
    before = out.read_text()
    rc = accuracy.main([
        "--data-dir", str(tiny["data"]), "--config", str(tiny["config"]), "--seeds", "0", "--epochs", "1",
        "--out", str(out), "--no-docs", "--threads", "1", "--rows", "classifier", "dcg", "diffmic",
    ])
    assert rc == 0
    again = json.loads(out.read_text())
    assert [(r["row"], r["fit_seconds"]) for r in again["runs"]] == \
        [(r["row"], r["fit_seconds"]) for r in json.loads(before)["runs"]]
    assert again["run"]["continues"] == [json.loads(before)["run"]["command"]]
    # Another seed into the same file: the file lists every seed and row it holds, and the earlier command
    rc = accuracy.main([
        "--data-dir", str(tiny["data"]), "--config", str(tiny["config"]), "--seeds", "1", "--epochs", "1",
        "--out", str(out), "--no-docs", "--threads", "1", "--rows", "classifier",
    ])
    assert rc == 0
    more = json.loads(out.read_text())
    assert more["settings"]["seeds"] == [0, 1]
    assert set(more["settings"]["rows"]) == {"classifier", "dcg", "diffmic"}
    assert set(more["settings"]["methods"]) == {"classifier", "dcg", "diffmic"}
    assert len(more["run"]["continues"]) == 2 and "--seeds 1" in more["run"]["command"]
    assert sorted((r["row"], r["seed"]) for r in more["runs"]) == \
        [("classifier", 0), ("classifier", 1), ("dcg", 0), ("diffmic", 0)]
    assert more["summary"]["retinamnist"]["classifier"]["seeds"] == 2
    # ... but not a run made with other settings: the file is left as it was
    rc = accuracy.main([
        "--data-dir", str(tiny["data"]), "--config", str(tiny["config"]), "--seeds", "2", "--epochs", "2",
        "--out", str(out), "--no-docs", "--threads", "1", "--rows", "classifier",
    ])
    assert rc == 2 and json.loads(out.read_text()) == more
    out.write_text(json.dumps(again))  # the checks below render the seed-0 file
    # --render trains nothing and writes the table of the finished runs into a named section
    rc = accuracy.main(["--data-dir", str(tiny["data"]), "--config", str(tiny["config"]), "--out", str(out),
                        "--docs", str(tiny["docs"]), "--render", "--section", "screen", "--title", "Screen"])
    assert rc == 0 and json.loads(out.read_text()) == again  # the results file is not touched
    screen = tiny["docs"].read_text().split("<!-- screen:start -->")[1].split("<!-- screen:end -->")[0]
    assert "## Screen" in screen and "| retinamnist | diffmic |" in screen

    out = tiny["tmp"] / "speed.json"
    rc = speed.main([
        "--config", str(tiny["config"]), "--backbone", "test_resnet", "--feature-dim", "16",
        "--sizes", "28", "--steps", "2", "--ref-steps", "2", "--samples", "1", "2",
        "--repeats", "1", "--warmup", "1", "--in-process", "--threads", "1",
        "--out", str(out), "--docs", str(tiny["docs"]),
    ])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "speed" and result["run"]["torch_threads"] == 1
    kinds = {r["kind"] for r in result["results"]}
    assert kinds == {"infer_classifier", "infer_dcg", "infer_diffmic", "infer_shared", "infer_recompute",
                     "train_classifier", "train_dcg", "train_joint"}
    for r in result["results"]:
        assert "error" not in r, r.get("error")
        assert r["ms_per_img"] > 0 and r["ratio_to_classifier"] > 0 and r["peak_rss_mb"] > 0
    assert {(r["steps"], r["samples"]) for r in result["results"] if r["kind"] == "infer_diffmic"} == {(2, 1), (2, 2)}
    assert any("250-step" in t["target"] or "250 steps" in t["target"] for t in result["targets"])

    text = tiny["docs"].read_text()
    assert "Hand-written intro that must survive." in text and "<!-- accuracy:start -->" in text
    section = text.split("<!-- speed:start -->")[1].split("<!-- speed:end -->")[0]
    assert "### 28×28 (batch 64)" in section and "× plain classifier" in section
    assert "### Targets" in section


def test_speed_skips_1000_steps_at_224_without_full() -> None:
    speed = load_benchmark("speed")
    args = speed.parse_args(["--sizes", "28", "224", "--no-train"])
    cases, skipped = speed.plan(args, 10, 1000, "resnet18")
    assert [(c["size"], c["steps"]) for c in skipped] == [(224, 1000)]
    assert "--full" in skipped[0]["reason"]
    assert {c["steps"] for c in cases if c["kind"] == "infer_recompute"} == {10, 50}
    args = speed.parse_args(["--sizes", "224", "--full", "--no-train"])
    cases, skipped = speed.plan(args, 10, 1000, "resnet18")
    assert not skipped and {c["steps"] for c in cases if c["kind"] == "infer_recompute"} == {10, 50, 250}
    assert {c["batch"] for c in cases} == {16}


def test_accuracy_budget_split() -> None:
    accuracy = load_benchmark("accuracy")
    assert accuracy.split_budget(15, 85, 100) == (15, 85)
    assert accuracy.split_budget(15, 85, 3) == (1, 2)
    assert accuracy.split_budget(15, 85, 1) == (0, 1)
    assert accuracy.split_budget(3, 0, 5) == (5, 0)


def test_speed_quick_smoke(tmp_path: Path, keep_threads: None) -> None:
    """--quick on the shipped presets with a tiny backbone: JSON marks the preset cases, docs get a section."""
    speed = load_benchmark("speed")
    out, docs = tmp_path / "quick.json", tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nHand-written intro that must survive.\n")
    rc = speed.main([
        "--quick", "--backbone", "test_resnet", "--feature-dim", "16", "--batch", "2", "--chains", "3",
        "--set", "diffusion.sampling_steps=2", "--repeats", "1", "--in-process", "--threads", "1",
        "--out", str(out), "--docs", str(docs),
    ])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["settings"]["quick"] is True and result["settings"]["sizes"] == [28, 224]
    for r in result["results"]:
        assert "error" not in r, r.get("error")
        assert r["ms_per_img"] > 0 and r["ratio_to_classifier"] > 0
    for size, readout in ((28, "mean_path"), (224, "mean_softmax")):  # the presets' own readouts
        rows = [r for r in result["results"] if r["size"] == size]
        marked = [r for r in rows if r["preset_default"]]
        assert sorted(r["kind"] for r in marked) == ["infer_preset", "train_joint"]
        default = next(r for r in marked if r["kind"] == "infer_preset")
        engine, other = "fused", "eager"  # predict's --engine auto, at every size
        assert default["samples"] == 1 and default["engine"] == engine and default["readout"] == readout
        assert default["ratio_to_one_chain"] == 1.0
        kinds = {(r["kind"], r.get("samples"), r.get("engine")) for r in rows}
        assert {("infer_classifier", None, None), ("infer_preset", 3, engine), ("infer_preset", 1, other),
                ("train_classifier", None, None)} <= kinds
        assert [r["engine"] for r in rows if r.get("other_engine")] == [other]
        shared = [r for r in rows if r.get("extra_overrides") == ["model.share_encoder=true"]]
        assert sorted(r["kind"] for r in shared) == ["infer_preset", "train_joint"]
        assert all(r["share_encoder"] for r in shared) and not default["share_encoder"]
        light = [r for r in rows if r.get("extra_overrides") == ["model.denoiser_backbone=resnet10t"]]
        if size == 28:  # configs/retinamnist.yaml has the light encoder already: no extra case
            assert light == []
        else:
            assert sorted(r["kind"] for r in light) == ["infer_preset", "train_joint"]
            assert all(r["denoiser_backbone"] == "resnet10t" for r in light)
    assert {t["size"] for t in result["targets"]} == {28, 224}
    text = docs.read_text()
    assert "Hand-written intro that must survive." in text
    # a 1-thread run gets its own section beside the 2-thread `speed-quick` one
    assert "<!-- speed-quick:start -->" not in text
    section = text.split("<!-- speed-quick-1thread:start -->")[1].split("<!-- speed-quick-1thread:end -->")[0]
    assert "(`benchmarks/speed.py --quick`, 1 torch thread)" in section
    assert "### 28×28" in section and "### 224×224" in section and "### Targets of issue 12" in section
    assert "**preset as `diffmic predict` runs it" in section


def test_speed_quick_plan() -> None:
    """The default --quick plan: the presets, a ResNet-18 reference, 16 and 100 chains, two marked cases per size."""
    speed = load_benchmark("speed")
    cases = speed.plan_quick(speed.parse_args(["--quick"]))
    for size, backbone in ((28, "resnet18"), (224, "resnet50")):
        rows = [c for c in cases if c["size"] == size]
        assert rows[0]["kind"] == "infer_classifier" and rows[0]["classifier_backbone"] == "resnet18"
        assert [c["kind"] for c in rows if c["preset_default"]] == ["infer_preset", "train_joint"]
        assert {c.get("samples") for c in rows if c["kind"] == "infer_preset"} == {1, 16, 100}
        light_local = [c for c in rows if "model.local_backbone=resnet10t" in c.get("extra_overrides", [])]
        assert [(c["kind"], c["samples"]) for c in light_local] == [("infer_preset", 1)]
        own = [c for c in rows if c["kind"] == "infer_backbone_classifier"]
        assert [c["classifier_backbone"] for c in own] == ([] if backbone == "resnet18" else [backbone])
    assert all(Path(c["config"]).name == ("retinamnist.yaml" if c["size"] == 28 else "isic2018.yaml") for c in cases)


def test_profile_modules_smoke(tmp_path: Path, keep_threads: None) -> None:
    prof = load_benchmark("profile_modules")
    out, md = tmp_path / "prof.json", tmp_path / "prof.md"
    common = ["--sizes", "28", "--backbone", "test_resnet", "--set", "model.feature_dim=16", "--set",
              "diffusion.sampling_steps=2", "--batch", "2", "--repeats", "1", "--threads", "1", "--md", str(md)]
    # the DCG frozen (the RetinaMNIST preset): one backward per step, no DCG step
    rc = prof.main([*common, "--set", "train.joint_train=false", "--samples", "1", "--out", str(out)])
    assert rc == 0
    frozen = json.loads(out.read_text())["cases"][-1]
    assert frozen["case"].endswith("DCG frozen)")
    assert "backward.diffusion" in frozen["parts"] and not {"dcg.step", "backward.dcg"} & set(frozen["parts"])
    rc = prof.main([*common, "--set", "train.joint_train=true", "--samples", "1", "3", "--out", str(out)])
    assert rc == 0
    cases = json.loads(out.read_text())["cases"]
    assert [c["case"].split(",")[0] for c in cases] == [
        "plain test_resnet classifier", "inference", "inference", "plain test_resnet classifier",
        "diffusion-phase training step (DiffMICModule.training_step"]
    assert cases[4]["case"].endswith("DCG trained jointly)")
    infer = cases[1]["parts"]
    assert {"dcg", "dcg.global", "dcg.roi", "dcg.local", "encoder", "mlp", "sampler"} <= set(infer)
    assert infer["mlp"]["calls"] == 2 and 0 < infer["dcg.global"]["share"] < 1
    assert {"dcg.prior_nograd", "encoder", "mlp", "backward.diffusion", "opt.denoiser", "ema", "dcg.step",
            "backward.dcg"} <= set(cases[4]["parts"])
    assert "| dcg.global |" in md.read_text()
