"""DiffMIC composed model: encoder-once inference, predict_proba inputs, checkpoints."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from diffmic import load_model, save_model
from diffmic.config import DiffMICConfig
from diffmic.errors import CheckpointError, DataError
from diffmic.models import DiffMIC, build_model, probs_from_y0

OVERRIDES = [
    "data.path=x",
    "model.backbone=test_resnet",
    "model.denoiser_backbone=test_resnet",
    "model.feature_dim=32",
    "diffusion.timesteps=50",
    "diffusion.sampling_steps=5",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(num_classes=4, in_chans=3, image_size=28, extra=()) -> DiffMIC:
    torch.manual_seed(0)
    cfg = DiffMICConfig.from_yaml(None, OVERRIDES + list(extra))
    model = build_model(cfg, num_classes=num_classes, in_chans=in_chans, image_size=image_size)
    # one train-mode pass so BN running statistics are not the defaults
    model.train()
    with torch.no_grad():
        x = torch.randn(4, in_chans, image_size, image_size)
        g = model.guidance(x)
        model.denoiser.denoise(model.encode(x, g), torch.randn(4, num_classes), g.logits.softmax(1),
                               torch.arange(4))
    return model.eval()


@pytest.fixture(scope="module")
def model3() -> DiffMIC:
    return make_model(4, 3, 28)


@pytest.fixture(scope="module")
def model1() -> DiffMIC:
    return make_model(3, 1, 28)


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Tight closeness: an untrained model is only weakly input-dependent, so loose tolerances hide bugs."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rand_images(n, c, size, seed=0):
    return torch.rand(n, c, size, size, generator=gen(seed))


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("image_size,in_chans", [(28, 1), (28, 3), (64, 1), (64, 3), (224, 3)])
def test_forward_shapes(image_size, in_chans):
    m = make_model(4, in_chans, image_size)
    x = m.normalize(rand_images(2, in_chans, image_size))
    with torch.no_grad():
        out = m(x, samples=3, generator=gen())
    assert out.probs.shape == (2, 4)
    assert out.y0.shape == (3, 2, 4)
    assert out.prior.shape == (2, 4)
    torch.testing.assert_close(out.probs.sum(1), torch.ones(2))
    torch.testing.assert_close(out.prior, out.guidance.logits.softmax(1))
    torch.testing.assert_close(out.probs, probs_from_y0(out.y0, m.temperature))


def test_build_model_reads_config(model3):
    assert model3.schedule.num_timesteps == 50
    assert model3.sampling_steps == 5
    assert model3.denoiser.proj.out_features == 32
    assert model3.num_classes == 4 and model3.in_chans == 3 and model3.image_size == 28
    assert model3.config["model"]["backbone"] == "test_resnet"


def test_probs_from_y0():
    y0 = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (S=2, B=1, C=2)
    torch.testing.assert_close(probs_from_y0(y0, 1.0), torch.tensor([[0.5, 0.5]]))
    p = probs_from_y0(torch.tensor([[[1.0, 0.0, 0, 0, 0, 0, 0]]]), 1.0)
    assert p.max().item() == pytest.approx(np.e / (np.e + 6), abs=1e-6)  # ≈0.31: the spec's flat softmax, C=7
    torch.testing.assert_close(probs_from_y0(torch.tensor([[[0.2, 0.0]]]), 0.1), torch.tensor([[2.0, 0.0]]).softmax(1))


# --------------------------------------------------------------------------- encoder runs once
@pytest.mark.parametrize("sampler,steps,samples", [("ddim", 3, 1), ("ddim", 5, 4), ("truncated", 4, 2),
                                                   ("ancestral", None, 3), ("ddim", 1, 1)])
def test_encoder_runs_once_and_mlp_runs_steps_times(model3, sampler, steps, samples):
    enc_calls, mlp_batches, dcg_calls = [], [], []
    hooks = [
        model3.denoiser.encoder.register_forward_hook(lambda m, i, o: enc_calls.append(i[0].shape[0])),
        model3.denoiser.lin1.register_forward_hook(lambda m, i, o: mlp_batches.append(i[0].shape[0])),
        model3.guidance.register_forward_hook(lambda m, i, o: dcg_calls.append(1)),
    ]
    B = 3
    try:
        with torch.no_grad():
            out = model3(model3.normalize(rand_images(B, 3, 28)), samples=samples, sampler=sampler,
                         num_steps=steps, generator=gen())
    finally:
        for h in hooks:
            h.remove()
    expected_steps = model3.schedule.num_timesteps if sampler == "ancestral" else steps
    assert enc_calls == [B]
    assert len(dcg_calls) == 1
    assert mlp_batches == [samples * B] * expected_steps
    assert out.y0.shape == (samples, B, 4)


def test_chain_rows_pair_features_with_their_own_prior(model3, monkeypatch):
    """Row s*B + i of the S*B batch must carry image i's features and image i's prior."""
    seen = []
    orig = model3.denoiser.denoise

    def spy(feats, y_t, prior, t):
        seen.append((feats.clone(), prior.clone()))
        return orig(feats, y_t, prior, t)

    monkeypatch.setattr(model3.denoiser, "denoise", spy)
    B, S = 3, 4
    x = model3.normalize(rand_images(B, 3, 28))
    with torch.no_grad():
        out = model3(x, samples=S, num_steps=2, generator=gen())
        feats = model3.encode(x, out.guidance)
    assert len(seen) == 2
    for f, p in seen:
        assert f.shape[0] == p.shape[0] == S * B
        for s_ in range(S):
            torch.testing.assert_close(f[s_ * B:(s_ + 1) * B], feats)
            torch.testing.assert_close(p[s_ * B:(s_ + 1) * B], out.prior)


def test_default_sampling_steps_from_config(model3):
    calls = []
    h = model3.denoiser.lin1.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        model3.predict_proba(rand_images(2, 3, 28), generator=gen())
    finally:
        h.remove()
    assert len(calls) == 5


def test_samples_are_independent_chains(model3):
    with torch.no_grad():
        out = model3(model3.normalize(rand_images(2, 3, 28)), samples=3, generator=gen())
    assert not torch.allclose(out.y0[0], out.y0[1])


def test_forward_deterministic_under_seed_and_global_rng_untouched(model3):
    x = model3.normalize(rand_images(2, 3, 28))
    state = torch.random.get_rng_state()
    with torch.no_grad():
        a = model3(x, samples=2, generator=gen(5)).y0
        b = model3(x, samples=2, generator=gen(5)).y0
        c = model3(x, samples=2, generator=gen(6)).y0
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_share_encoder_uses_dcg_features():
    m = make_model(4, 3, 28, extra=["model.share_encoder=true"])
    assert m.denoiser.encoder is None
    assert m.denoiser.proj.in_features == m.guidance.feature_dim
    seen = []
    orig = m.denoiser.denoise
    m.denoiser.denoise = lambda feats, *a: (seen.append(feats.clone()), orig(feats, *a))[1]
    with torch.no_grad():
        out = m(m.normalize(rand_images(2, 3, 28)), generator=gen())
        expected = m.denoiser.norm0(m.denoiser.proj(out.guidance.features))
    assert out.probs.shape == (2, 4)
    assert len(seen) == m.sampling_steps
    torch.testing.assert_close(seen[0], expected)


# --------------------------------------------------------------------------- predict_proba inputs
def test_predict_proba_rows_sum_to_one_and_restores_mode(model3):
    model3.train()
    try:
        p = model3.predict_proba(rand_images(5, 3, 28), generator=gen())
        assert model3.training  # mode restored
    finally:
        model3.eval()
    assert p.shape == (5, 4)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(1), torch.ones(5))


def test_predict_proba_numpy_uint8_nhwc_equals_tensor(model3):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(3, 28, 28, 3), dtype=np.uint8)
    t = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
    # exactly what reaches the network
    torch.testing.assert_close(model3.preprocess(arr), (t - 0.5) / 0.5, atol=0, rtol=0)
    torch.testing.assert_close(model3.preprocess(torch.from_numpy(arr).permute(0, 3, 1, 2)), (t - 0.5) / 0.5,
                               atol=0, rtol=0)
    p_np = model3.predict_proba(arr, generator=gen())
    p_t = model3.predict_proba(t, generator=gen())
    assert p_np.shape == (3, 4)
    same(p_np, p_t)
    # uint8 tensors are scaled too
    same(model3.predict_proba(torch.from_numpy(arr).permute(0, 3, 1, 2), generator=gen()), p_t)


def test_predict_proba_depends_on_the_image(model3):
    """Sanity check for the equality tests above: a different image gives different probabilities."""
    a = rand_images(2, 3, 28, seed=0)
    with pytest.raises(AssertionError):
        same(model3.predict_proba(a, generator=gen()), model3.predict_proba(a.flip(-1), generator=gen()))


def test_preprocess_float_array_and_single_images(model3):
    rng = np.random.default_rng(5)
    hwc = rng.random((28, 28, 3), dtype=np.float32)
    expected = (torch.from_numpy(hwc).permute(2, 0, 1)[None] - 0.5) / 0.5
    torch.testing.assert_close(model3.preprocess(hwc), expected, atol=0, rtol=0)  # single (H, W, C)
    torch.testing.assert_close(model3.preprocess(torch.from_numpy(hwc).permute(2, 0, 1)), expected,
                               atol=0, rtol=0)  # single (C, H, W) tensor


def test_preprocess_grayscale_stack(model3):
    rng = np.random.default_rng(6)
    stack = rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)  # (N, H, W) grayscale
    x = model3.preprocess(stack)
    assert x.shape == (4, 3, 28, 28)
    g = torch.from_numpy(stack).float().div(255)
    for c in range(3):
        torch.testing.assert_close(x[:, c], (g - 0.5) / 0.5, atol=0, rtol=0)
    x1 = model3.preprocess(stack[0])  # (H, W)
    torch.testing.assert_close(x1, x[:1], atol=0, rtol=0)
    x2 = model3.preprocess(stack[..., None])  # (N, H, W, 1)
    torch.testing.assert_close(x2, x, atol=0, rtol=0)


def test_predict_proba_pil_single_and_list(model3):
    rng = np.random.default_rng(1)
    arrs = [rng.integers(0, 256, size=(28, 28, 3), dtype=np.uint8) for _ in range(3)]
    ims = [Image.fromarray(a) for a in arrs]
    torch.testing.assert_close(model3.preprocess(ims), model3.preprocess(np.stack(arrs)), atol=0, rtol=0)
    p_list = model3.predict_proba(ims, generator=gen())
    p_np = model3.predict_proba(np.stack(arrs), generator=gen())
    assert p_list.shape == (3, 4)
    same(p_list, p_np)
    p_single = model3.predict_proba(ims[0], generator=gen())
    assert p_single.shape == (1, 4)
    same(p_single, model3.predict_proba(arrs[0], generator=gen()))
    # RGBA PIL images drop alpha
    rgba = Image.fromarray(np.concatenate([arrs[0], np.full((28, 28, 1), 7, np.uint8)], -1), mode="RGBA")
    torch.testing.assert_close(model3.preprocess(rgba), model3.preprocess(arrs[0]), atol=0, rtol=0)


def test_predict_proba_grayscale_on_rgb_model(model3):
    rng = np.random.default_rng(2)
    gray = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    pil = Image.fromarray(gray, mode="L")
    torch.testing.assert_close(model3.preprocess(pil), model3.preprocess(rgb), atol=0, rtol=0)
    p_gray = model3.predict_proba(pil, generator=gen())
    same(p_gray, model3.predict_proba(rgb, generator=gen()))
    # (N, 1, H, W) tensor
    t = torch.from_numpy(gray).float().div(255).view(1, 1, 28, 28)
    same(model3.predict_proba(t, generator=gen()), p_gray)


def test_predict_proba_rgb_on_grayscale_model(model1):
    x = rand_images(2, 3, 28)
    p = model1.predict_proba(x, generator=gen())
    assert p.shape == (2, 3)
    lum = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    torch.testing.assert_close(model1.preprocess(x), (lum - 0.5) / 0.5)
    p = model1.predict_proba(Image.fromarray(np.zeros((28, 28, 3), np.uint8)), generator=gen())
    assert p.shape == (1, 3)


def test_predict_proba_resizes(model3):
    p = model3.predict_proba(rand_images(2, 3, 40), generator=gen())
    assert p.shape == (2, 4)
    torch.testing.assert_close(p.sum(1), torch.ones(2))
    pil = Image.fromarray(np.zeros((50, 33, 3), np.uint8))
    assert model3.predict_proba(pil, generator=gen()).shape == (1, 4)
    seen = []
    h = model3.guidance.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    try:
        model3.predict_proba(rand_images(1, 3, 17), generator=gen())
    finally:
        h.remove()
    assert seen == [torch.Size([1, 3, 28, 28])]


def test_predict_proba_normalises_with_config_mean_std(model3):
    seen = []
    h = model3.guidance.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        model3.predict_proba(torch.full((1, 3, 28, 28), 0.75), generator=gen())
    finally:
        h.remove()
    torch.testing.assert_close(seen[0], torch.full((1, 3, 28, 28), (0.75 - 0.5) / 0.5))


def test_predict_proba_batching_consistent_shape(model3):
    p = model3.predict_proba(rand_images(5, 3, 28), generator=gen(), batch_size=2)
    assert p.shape == (5, 4)
    assert model3.predict(rand_images(5, 3, 28), generator=gen()).shape == (5,)


@pytest.mark.parametrize("bad", [
    torch.full((1, 3, 28, 28), float("nan")),
    np.full((1, 28, 28, 3), np.nan, dtype=np.float32),
    torch.full((1, 3, 28, 28), float("inf")),
])
def test_predict_proba_rejects_non_finite(model3, bad):
    with pytest.raises(DataError):
        model3.predict_proba(bad)


@pytest.mark.parametrize("bad", [torch.rand(1, 1, 3, 28, 28), torch.rand(28), np.zeros((2, 1, 28, 28, 3)),
                                 np.zeros(28), "not an image", []])
def test_predict_proba_rejects_wrong_rank_or_type(model3, bad):
    with pytest.raises(DataError):
        model3.predict_proba(bad)


# --------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def saved(model3, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_model(model3, path)
    return path


def test_checkpoint_round_trip_identical_predictions(model3, saved):
    loaded = load_model(saved)
    assert not loaded.training
    x = rand_images(3, 3, 28, seed=7)
    torch.testing.assert_close(loaded.predict_proba(x, generator=gen(3)), model3.predict_proba(x, generator=gen(3)),
                               atol=0, rtol=0)
    sd_a, sd_b = model3.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert loaded.class_names == model3.class_names
    assert loaded.sampling_steps == model3.sampling_steps and loaded.temperature == model3.temperature


def test_checkpoint_loads_with_weights_only(saved):
    payload = torch.load(saved, weights_only=True)
    assert payload["format"] == "diffmic-model"
    assert payload["model_args"]["num_classes"] == 4
    assert "state_dict" in payload and isinstance(payload["config"], dict)
    assert not any(k.startswith("schedule.") for k in payload["state_dict"])  # non-persistent buffers


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pt")


def test_random_bytes_checkpoint(tmp_path):
    p = tmp_path / "junk.pt"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError):
        load_model(p)


def test_empty_checkpoint(tmp_path):
    p = tmp_path / "empty.pt"
    p.write_bytes(b"")
    with pytest.raises(CheckpointError):
        load_model(p)


@pytest.mark.parametrize("content", [
    b"hello world this is not a checkpoint",
    b"path,label\na.png,0\n",
    b'{"format": "diffmic-model"}',
    b"\x89PNG\r\n\x1a\n" + bytes(100),
    bytes(1000),
])
def test_garbage_checkpoint(tmp_path, content):
    p = tmp_path / "garbage.pt"
    p.write_bytes(content)
    with pytest.raises(CheckpointError):
        load_model(p)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_many_random_short_byte_strings(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "junk.bin"
    for _ in range(40):  # the unpickler fails with many exception types on garbage
        p.write_bytes(rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8).tobytes())
        with pytest.raises(CheckpointError):
            load_model(p)


@pytest.mark.parametrize("drop", ["config", "model_args", "state_dict"])
def test_incomplete_payload(saved, tmp_path, drop):
    payload = torch.load(saved, weights_only=True)
    del payload[drop]
    p = tmp_path / "incomplete.pt"
    torch.save(payload, p)
    with pytest.raises(CheckpointError):
        load_model(p)


def test_incomplete_model_args(saved, tmp_path):
    payload = torch.load(saved, weights_only=True)
    del payload["model_args"]["image_size"]
    p = tmp_path / "incomplete_args.pt"
    torch.save(payload, p)
    with pytest.raises(CheckpointError):
        load_model(p)


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.1])
def test_truncated_checkpoint(saved, tmp_path, fraction):
    data = saved.read_bytes()
    p = tmp_path / "trunc.pt"
    p.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError):
        load_model(p)


def test_checkpoint_not_a_dict_or_no_marker(tmp_path):
    p = tmp_path / "list.pt"
    torch.save([1, 2, 3], p)
    with pytest.raises(CheckpointError):
        load_model(p)
    p = tmp_path / "nomarker.pt"
    torch.save({"state_dict": {}}, p)
    with pytest.raises(CheckpointError):
        load_model(p)


def test_tampered_num_classes_raises(saved, tmp_path):
    payload = torch.load(saved, weights_only=True)
    bad = copy.deepcopy(payload)
    bad["model_args"]["num_classes"] = 5
    bad["model_args"]["class_names"] = [str(i) for i in range(5)]
    p = tmp_path / "tampered.pt"
    torch.save(bad, p)
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(p)


def test_tampered_config_raises(saved, tmp_path):
    payload = torch.load(saved, weights_only=True)
    bad = copy.deepcopy(payload)
    bad["config"]["model"]["feature_dim"] = 16
    p = tmp_path / "tampered_cfg.pt"
    torch.save(bad, p)
    with pytest.raises(CheckpointError):
        load_model(p)


def test_missing_state_key_raises(saved, tmp_path):
    payload = torch.load(saved, weights_only=True)
    sd = dict(payload["state_dict"])
    sd.pop(next(iter(sd)))
    payload["state_dict"] = sd
    p = tmp_path / "missing_key.pt"
    torch.save(payload, p)
    with pytest.raises(CheckpointError):
        load_model(p)


def test_save_round_trips_extra(model3, tmp_path):
    p = tmp_path / "m.pt"
    save_model(model3, p, extra={"epoch": 3})
    assert torch.load(p, weights_only=True)["extra"] == {"epoch": 3}
    assert list(tmp_path.iterdir()) == [p]


def test_failed_save_keeps_the_previous_checkpoint(model3, tmp_path, monkeypatch):
    p = tmp_path / "m.pt"
    save_model(model3, p, extra={"epoch": 3})
    before = p.read_bytes()

    def disk_full(obj, f, *args, **kwargs):  # half a checkpoint reaches the disk, then the write fails
        f.write(before[: len(before) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_model(model3, p, extra={"epoch": 4})
    assert p.read_bytes() == before  # the previous checkpoint, complete
    assert list(tmp_path.iterdir()) == [p]  # and no temporary file left behind
