"""``diffmic predict`` decodes each file once and predicts the images in batches: parity with the API
on the same images, and with the one-image-per-call loop it replaced (deterministic outputs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, shared_file
from PIL import Image

from diffmic.cli import main
from diffmic.config import DiffMICConfig
from diffmic.images import load_image
from diffmic.models import build_model, save_model
from diffmic.prediction import predict_files, predictions_csv

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Ten images of BreastMNIST's test split, in other sizes and modes (converted on reading)."""
    images = np.load(shared_file("breastmnist.npz"))["test_images"][:10]
    root = tmp_path_factory.mktemp("imgs")
    for i, im in enumerate(images):
        img = Image.fromarray(im)
        if i % 3 == 1:
            img = img.resize((40, 40)).convert("RGB")
        elif i % 3 == 2:
            img = img.convert("RGBA")
        img.save(root / f"img{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """model.pt of two untrained tiny models: the default readout and the deterministic mean path."""
    out = {}
    for readout in ("mean_softmax", "mean_path"):
        cfg = DiffMICConfig.from_yaml(None, ["data.path=x.npz", *TINY_OVERRIDES, f"eval.readout={readout}"])
        torch.manual_seed(0)
        model = build_model(cfg, num_classes=2, in_chans=1, image_size=28, class_names=["malignant", "benign"])
        path = tmp_path_factory.mktemp(readout) / "model.pt"
        save_model(model, path)
        out[readout] = path
    return out


def _csv(tmp_path, ckpt, folder, *extra) -> str:
    out = tmp_path / "p.csv"
    assert main(["predict", "--checkpoint", str(ckpt), str(folder), "--out", str(out), *extra]) == 0
    return out.read_bytes().decode()  # the CSV as written (\r\n rows)


def test_cli_equals_the_api_on_the_decoded_images(tmp_path, folder, checkpoints):
    """Same engine on both sides (``predict``'s default, ``auto``): equal to the last printed digit."""
    from diffmic import load_model
    from diffmic.prediction import for_inference

    model = for_inference(load_model(checkpoints["mean_softmax"]))
    paths = sorted(folder.iterdir())
    images = np.stack([load_image(p, model.image_spec) for p in paths])
    details = model.predict_details(images, samples=3, generator=torch.Generator().manual_seed(4), batch_size=4)
    expected = predictions_csv([str(p) for p in paths], [details], model.class_names)
    assert _csv(tmp_path, checkpoints["mean_softmax"], folder, "--samples", "3", "--seed", "4",
                "--batch-size", "4") == expected
    got = predict_files(model, paths, samples=3, seed=4, batch_size=4)
    for k in details:
        assert torch.equal(got[k], details[k]), k


@pytest.mark.parametrize("batch_size", [3, 256])
def test_batched_equals_one_image_per_call(folder, checkpoints, batch_size):
    """Deterministic outputs (DCG prior, mean-path probabilities) do not depend on the batching."""
    from diffmic import load_model

    model = load_model(checkpoints["mean_path"])
    paths = sorted(folder.iterdir())
    got = predict_files(model, paths, batch_size=batch_size)
    gen = torch.Generator().manual_seed(0)
    loop = [model.predict_details(load_image(p, model.image_spec), generator=gen) for p in paths]  # the old path
    for k in ("probs", "prior", "entropy"):
        torch.testing.assert_close(got[k], torch.cat([d[k] for d in loop]), rtol=0, atol=1e-5, msg=k)


def test_each_file_is_decoded_once(folder, checkpoints, monkeypatch):
    from diffmic import images, load_model

    calls = []
    decode = images.decode_image
    monkeypatch.setattr(images, "decode_image", lambda p: calls.append(p) or decode(p))
    model = load_model(checkpoints["mean_path"])
    predict_files(model, sorted(folder.iterdir()))
    assert sorted(calls) == sorted(folder.iterdir())
