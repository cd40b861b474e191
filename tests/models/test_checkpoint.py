"""The model file format: format version, files of version 1, Lightning checkpoints, one-line errors.

(Round trips, corrupt and tampered files: tests/models/test_diffmic_model.py.)
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_OVERRIDES

import diffmic
from diffmic.config import DiffMICConfig
from diffmic.errors import CheckpointError
from diffmic.models import build_model
from diffmic.models.checkpoint import CHECKPOINT_VERSION, load_model, model_from_payload, save_model
from diffmic.training.checkpointing import EMA_PREFIX, MODEL_PREFIX, lightning_to_model_payload

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = DiffMICConfig.from_yaml(None, ["data.path=x", *TINY_OVERRIDES])
    m = build_model(cfg, num_classes=3, in_chans=1, image_size=28, class_names=["a", "b", "c"])
    with torch.no_grad():  # BatchNorm statistics that are not the defaults
        m.train()(torch.randn(4, 1, 28, 28), samples=1)
    return m.eval()


def probs(m, seed=0):
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    return m.predict_proba(x, generator=torch.Generator().manual_seed(seed))


def version1_file(model, path):
    """A model file exactly as diffmic 0.1.0 (format version 1, DiffMIC.save) wrote it."""
    torch.save({
        "format": "diffmic-model",
        "version": 1,
        "config": model.config,
        "model_args": {"num_classes": 3, "class_names": ["a", "b", "c"], "in_chans": 1, "image_size": 28},
        "state_dict": model.state_dict(),
        "extra": {"selected_epoch": 4},
    }, path)
    return path


def test_version_1_files_still_load(model, tmp_path):
    loaded = load_model(version1_file(model, tmp_path / "v1.pt"))
    assert loaded.class_names == ["a", "b", "c"] and not loaded.training
    torch.testing.assert_close(probs(loaded), probs(model), rtol=0, atol=0)


def test_save_writes_the_current_version(model, tmp_path):
    path = save_model(model, tmp_path / "m.pt", extra={"selected_epoch": 2})
    payload = torch.load(path, weights_only=True)
    assert payload["version"] == CHECKPOINT_VERSION
    assert payload["model_args"] == model.model_args()
    assert payload["extra"] == {"selected_epoch": 2}


@pytest.mark.parametrize("version,needle", [
    (CHECKPOINT_VERSION + 1, f"format version {CHECKPOINT_VERSION + 1} is newer than this diffmic reads"),
    ("2.0", "unknown checkpoint format version '2.0'"),
    (None, "unknown checkpoint format version None"),
    (0, "unknown checkpoint format version 0"),
])
def test_unknown_or_newer_version_is_one_clear_line(model, tmp_path, version, needle):
    path = version1_file(model, tmp_path / "v.pt")
    payload = torch.load(path, weights_only=True)
    payload["version"] = version
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as exc:
        load_model(path)
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg and needle in msg, msg
    assert ("upgrade diffmic" if version == CHECKPOINT_VERSION + 1 else "save the model again") in msg


def lightning_payload(model, *, ema_eval: bool, ema_state=None):
    """What Lightning writes for a DiffMICModule: hyper-parameters + prefixed state_dict."""
    cfg = dict(model.config, train=dict(model.config["train"], ema_eval=ema_eval))
    sd = {MODEL_PREFIX + k: v for k, v in model.state_dict().items()}
    sd.update({EMA_PREFIX + k: v for k, v in (ema_state or {}).items()})
    return {"epoch": 3, "hyper_parameters": {"config": cfg, "model_args": model.model_args()}, "state_dict": sd}


def test_lightning_checkpoint_through_the_public_loader(model, tmp_path):
    ema = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in model.denoiser.state_dict().items()}
    path = tmp_path / "last.ckpt"
    torch.save(lightning_payload(model, ema_eval=True, ema_state=ema), path)
    loaded = diffmic.load_model(path)
    assert all(torch.equal(loaded.denoiser.state_dict()[k], v) for k, v in ema.items())  # the EMA denoiser
    assert all(torch.equal(loaded.guidance.state_dict()[k], v) for k, v in model.guidance.state_dict().items())
    torch.save(lightning_payload(model, ema_eval=False), path)
    torch.testing.assert_close(probs(diffmic.load_model(path)), probs(model), rtol=0, atol=0)
    # the model layer's own reader names the loader that reads training checkpoints
    with pytest.raises(CheckpointError, match="diffmic.load_model"):
        load_model(path)


def test_ema_eval_without_ema_weights_is_an_error(model):
    with pytest.raises(CheckpointError, match="no EMA weights"):
        lightning_to_model_payload(lightning_payload(model, ema_eval=True), "last.ckpt")


def test_the_prefixes_are_those_of_the_lightning_module(model):
    from diffmic.training.module import DiffMICModule

    module = DiffMICModule(model.config, model.model_args())
    keys = list(module.state_dict())
    assert any(k.startswith(MODEL_PREFIX + "denoiser.") for k in keys)
    assert any(k.startswith(EMA_PREFIX) for k in keys)
    payload = lightning_to_model_payload({"hyper_parameters": {"config": model.config,
                                                                "model_args": model.model_args()},
                                          "state_dict": module.state_dict()})
    model_from_payload(payload)  # strict load: every weight found under the prefixes


def test_public_api_names():
    assert diffmic.save_model is save_model
    assert callable(diffmic.load_model)
