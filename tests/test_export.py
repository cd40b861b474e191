"""ONNX export: onnxruntime vs PyTorch on real images, the ``export`` command, one-line errors.

Two exports in total (the dynamo exporter takes ~10-30 s each on two busy cores): a 3-channel
RetinaMNIST model through the Python API with a dynamic batch axis, and a 1-channel BreastMNIST
model through the CLI with a fixed batch size, a shared encoder and the denoiser skip.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_OVERRIDES, shared_file

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from diffmic import load_model, save_model
from diffmic.cli import main
from diffmic.config import DiffMICConfig
from diffmic.errors import ConfigError, ExportError
from diffmic.export import DiffMICInference, _verify, export_onnx
from diffmic.models import DiffMIC, build_model

pytestmark = pytest.mark.export

SAMPLES, STEPS = 3, 4
TOL = 1e-4


def _to01(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W[, C]) -> float (N, C, H, W) in [0, 1], as DiffMIC.preprocess does."""
    x = torch.from_numpy(images).float() / 255.0
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


def _trained(data: Path, num_classes: int, in_chans: int, names: list[str], extra: list[str] = ()) -> DiffMIC:
    """A tiny model with a few DCG steps and data-driven BatchNorm statistics: non-trivial outputs."""
    torch.manual_seed(0)
    cfg = DiffMICConfig.from_yaml(None, [f"data.path={data}", *TINY_OVERRIDES, *extra])
    model = build_model(cfg, num_classes=num_classes, in_chans=in_chans, image_size=28, class_names=names)
    arrays = np.load(data)
    x = model.normalize(_to01(arrays["train_images"][:24]))
    y = torch.from_numpy(arrays["train_labels"][:24].ravel().astype(np.int64))
    opt = torch.optim.Adam(model.guidance.parameters(), lr=3e-3)
    model.train()
    for _ in range(3):
        loss = F.cross_entropy(model.guidance(x).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for chunk in x.split(12):  # train-mode passes: every BatchNorm gets data statistics
            model(chunk, samples=2)
    return model.eval()


def _session(path: Path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _noise(batch: int, num_classes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((SAMPLES, batch, num_classes)).astype(np.float32)


def _max_diffs(sess, model: DiffMIC, images01: torch.Tensor, noise: np.ndarray) -> dict[str, float]:
    onnx_out = sess.run(["probs", "prior", "y0"], {"images": images01.numpy(), "noise": noise})
    with torch.no_grad():
        torch_out = DiffMICInference(model, STEPS)(images01, torch.from_numpy(noise))
    return {name: float(np.abs(o - t.numpy()).max())
            for name, o, t in zip(("probs", "prior", "y0"), onnx_out, torch_out, strict=True)}


@pytest.fixture(scope="module")
def retina(tmp_path_factory):
    data = shared_file("retinamnist.npz")
    model = _trained(data, 5, 3, ["0", "1", "2", "3", "4"])
    path = tmp_path_factory.mktemp("onnx") / "retina.onnx"
    assert export_onnx(model, path, samples=SAMPLES, num_steps=STEPS) == path  # dynamic batch
    assert not model.training  # left in the mode it was given in
    return model, path, _to01(np.load(data)["test_images"][:8])


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def breast_cli(tmp_path_factory):
    """``diffmic export`` end to end on a checkpoint (fixed batch 4, shared encoder, denoiser skip)."""
    data = shared_file("breastmnist.npz")
    model = _trained(data, 2, 1, ["malignant", "benign"], ["model.share_encoder=true", "model.denoiser_skip=true"])
    folder = tmp_path_factory.mktemp("cli")
    ckpt = folder / "model.pt"
    save_model(model, ckpt)
    out = folder / "breast.onnx"
    stdout, stderr = io.StringIO(), io.StringIO()  # capsys is function-scoped: capture by hand
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out),
                     "--samples", str(SAMPLES), "--steps", str(STEPS), "--batch-size", "4"])
    return code, stdout.getvalue(), stderr.getvalue(), ckpt, out, data


# ------------------------------------------------------------------------------------- parity
def test_wrapper_is_the_model(retina):
    """The exported module gives DiffMIC's own probabilities for the same starting noise."""
    model, _, images = retina
    b, c = images.shape[0], model.num_classes
    noise = torch.randn(SAMPLES * b, c, generator=torch.Generator().manual_seed(7)).view(SAMPLES, b, c)
    with torch.no_grad():
        probs, prior, y0 = DiffMICInference(model, STEPS)(images, noise)
        own = model(model.normalize(images), samples=SAMPLES, sampler="ddim", num_steps=STEPS,
                    generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(probs, own.probs, rtol=0, atol=1e-6)
    torch.testing.assert_close(prior, own.prior, rtol=0, atol=1e-6)
    torch.testing.assert_close(y0, own.y0, rtol=0, atol=1e-6)
    # The public API from uint8 pixels, at the checkpoint's default steps (num_steps=None).
    uint8 = np.load(shared_file("retinamnist.npz"))["test_images"][:8]
    api = model.predict_proba(uint8, samples=SAMPLES, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        default_steps = DiffMICInference(model)(images, noise)[0]
    torch.testing.assert_close(api, default_steps, rtol=0, atol=1e-6)


def test_onnx_matches_torch_on_retinamnist(retina):
    model, path, images = retina
    diffs = _max_diffs(_session(path), model, images, _noise(len(images), 5))
    assert diffs["probs"] < TOL, diffs
    assert diffs["prior"] < TOL and diffs["y0"] < 1e-3, diffs
    # The images exercise the data-dependent parts: different ROI crops, different outputs.
    with torch.no_grad():
        guide = model.guidance(model.normalize(images))
        probs = DiffMICInference(model, STEPS)(images, torch.from_numpy(_noise(len(images), 5)))[0]
    assert len({tuple(map(tuple, c.tolist())) for c in guide.corners}) > 1
    assert float(probs.std(dim=0).max()) > 1e-3 and float((probs.max(1).values - 0.2).max()) > 0.05


@pytest.mark.parametrize("batch", [1, 5])
def test_dynamic_batch(retina, batch):
    """The file was exported with a batch of 2; other batch sizes run and agree."""
    model, path, images = retina
    diffs = _max_diffs(_session(path), model, images[:batch], _noise(batch, 5, seed=batch))
    assert diffs["probs"] < TOL, diffs


def test_metadata_and_signature(retina):
    model, path, _ = retina
    m = onnx.load(str(path))
    meta = {p.key: p.value for p in m.metadata_props}
    assert json.loads(meta["diffmic.class_names"]) == model.class_names
    assert meta["diffmic.samples"] == str(SAMPLES) and meta["diffmic.num_steps"] == str(STEPS)
    assert meta["diffmic.sampler"] == "ddim" and meta["diffmic.batch_size"] == "dynamic"
    assert json.loads(meta["diffmic.image_spec"]) == model.image_spec.to_dict()

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    assert {v.name: dims(v) for v in m.graph.input} == {"images": ["batch", 3, 28, 28], "noise": [SAMPLES, "batch", 5]}
    assert [v.name for v in m.graph.output] == ["probs", "prior", "y0"]
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temp file left


def test_verify_catches_a_different_graph(retina):
    """The post-export check fails when onnxruntime and PyTorch disagree."""
    model, path, images = retina
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.guidance.cam.weight.mul_(3.0)
    checks = [(images[:2], torch.from_numpy(_noise(2, 5)))]
    with pytest.raises(ExportError, match="disagree"):
        _verify(path, DiffMICInference(other, STEPS), checks, TOL)


# ---------------------------------------------------------------------------------------- CLI
def test_cli_export_writes_one_file_and_one_line(breast_cli):
    code, out, err, _, path, _ = breast_cli
    assert code == 0, err
    assert path.is_file() and path.stat().st_size > 10_000
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"exported {path}") and "DDIM 4 steps" in lines[0], out
    assert err.strip() == ""
    assert sorted(p.name for p in path.parent.iterdir()) == ["breast.onnx", "model.pt"]


def test_cli_export_matches_checkpoint_on_breastmnist(breast_cli):
    code, _, err, ckpt, path, data = breast_cli
    assert code == 0, err
    model = load_model(ckpt)
    images = _to01(np.load(data)["test_images"][:4])
    sess = _session(path)
    diffs = _max_diffs(sess, model, images, _noise(4, 2))
    assert diffs["probs"] < TOL and diffs["prior"] < TOL, diffs
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["diffmic.batch_size"] == "4" and meta["diffmic.in_chans"] == "1"
    with pytest.raises(Exception):  # noqa: B017 - the batch axis is fixed at 4
        sess.run(None, {"images": images[:3].numpy(), "noise": _noise(3, 2)})


def _one_error_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("diffmic: error:"), err
    return lines[0]


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing_checkpoint", "checkpoint not found"),
        ("missing_folder", "does not exist"),
        ("unwritable_folder", "not writable"),
        ("out_is_folder", "folder"),
        ("format", "unsupported export format"),
        ("samples", "argument --samples: must be >= 1"),
        ("steps", "num_steps must be in [1, 100]"),
    ],
)
def test_cli_export_errors(breast_cli, tmp_path, capsys, monkeypatch, case, needle):
    ckpt = breast_cli[3]
    out = tmp_path / "model.onnx"
    args = {"--checkpoint": ckpt, "--out": out, "--format": "onnx", "--samples": 1}
    if case == "missing_checkpoint":
        args["--checkpoint"] = tmp_path / "nope.pt"
    elif case == "missing_folder":
        args["--out"] = tmp_path / "no" / "model.onnx"
    elif case == "unwritable_folder":  # root ignores permission bits: make os.access say no
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    elif case == "out_is_folder":
        args["--out"] = tmp_path
    elif case == "format":
        args["--format"] = "tflite"
    elif case == "samples":
        args["--samples"] = 0
    elif case == "steps":
        args["--steps"] = 1000
    before = sorted(tmp_path.iterdir())
    code, out_text, err = _run(["export", *[str(a) for kv in args.items() for a in kv]], capsys)
    assert needle in _one_error_line(code, err)
    assert out_text == ""
    assert sorted(tmp_path.iterdir()) == before  # nothing written, no temp file


def test_cli_export_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", "--help"])
    assert exc.value.code == 0
    assert "diffmic export --checkpoint" in capsys.readouterr().out


# -------------------------------------------------------------------- failures leave no file
class _FakeProgram:
    """Stands in for torch's ONNXProgram: its save writes half a file, then fails."""

    class _Model:
        def __init__(self):
            self.metadata_props: dict[str, str] = {}
            self.doc_string = ""

    def __init__(self):
        self.model = self._Model()

    def save(self, destination, **kwargs):
        Path(destination).write_bytes(b"partial")
        raise OSError(28, "No space left on device")


@pytest.fixture
def small_model():
    cfg = DiffMICConfig.from_yaml(None, ["data.path=x", *TINY_OVERRIDES])
    return build_model(cfg, num_classes=2, in_chans=1, image_size=28)


def test_unsupported_op_is_one_line_export_error(small_model, tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"an older export")

    def boom(*args, **kwargs):
        raise RuntimeError("Unsupported operator aten::foo\nlong details")

    monkeypatch.setattr(torch.onnx, "export", boom)
    with pytest.raises(ExportError) as exc:
        export_onnx(small_model, path, check=False)
    assert "aten::foo" in str(exc.value) and "\n" not in str(exc.value)
    assert path.read_bytes() == b"an older export"  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    assert small_model.training  # mode restored


def test_failed_write_leaves_no_partial_file(small_model, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: _FakeProgram())
    with pytest.raises(ExportError, match="No space left"):
        export_onnx(small_model, tmp_path / "m.onnx", check=False)
    assert list(tmp_path.iterdir()) == []


def test_missing_packages_name_the_extra(small_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript -> ImportError
    with pytest.raises(ExportError, match=r"onnxscript.*pip install 'diffmic\[export\]'"):
        export_onnx(small_model, tmp_path / "m.onnx")
    ckpt = tmp_path / "model.pt"
    save_model(small_model, ckpt)
    code, _, err = _run(["export", "--checkpoint", ckpt, "--out", tmp_path / "m.onnx"], capsys)
    assert "pip install 'diffmic[export]'" in _one_error_line(code, err)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


@pytest.mark.parametrize(
    "kwargs", [{"samples": 0}, {"num_steps": 0}, {"num_steps": 101}, {"batch_size": 0}, {"samples": 1.5}]
)
def test_bad_arguments(small_model, tmp_path, kwargs):
    with pytest.raises(ConfigError):
        export_onnx(small_model, tmp_path / "m.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_prior_temperature_is_in_the_exported_graph(small_model, tmp_path):
    """A model with model.prior_temperature = 2: the wrapper starts the chains from the tempered prior as
    DiffMIC does, returns the DCG's own prior, and the ONNX file agrees with PyTorch (export_onnx checks)."""
    model = copy.deepcopy(small_model).eval()
    model.prior_temperature = 2.0
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(SAMPLES * 3, 2, generator=torch.Generator().manual_seed(7)).view(SAMPLES, 3, 2)
    with torch.no_grad():
        probs, prior, y0 = DiffMICInference(model, STEPS)(images, noise)
        own = model(model.normalize(images), samples=SAMPLES, sampler="ddim", num_steps=STEPS,
                    generator=torch.Generator().manual_seed(7))
        flat = DiffMICInference(small_model.eval(), STEPS)(images, noise)
    torch.testing.assert_close(probs, own.probs, rtol=0, atol=1e-6)
    torch.testing.assert_close(prior, own.prior, rtol=0, atol=1e-6)
    torch.testing.assert_close(prior, flat[1], rtol=0, atol=1e-6)  # the reported prior is not tempered
    assert not torch.allclose(y0, flat[2], atol=1e-4)  # the chains are
    path = export_onnx(model, tmp_path / "tau.onnx", samples=SAMPLES, num_steps=STEPS)
    diffs = _max_diffs(_session(path), model, images, _noise(3, 2))
    assert diffs["probs"] < TOL and diffs["prior"] < TOL, diffs
