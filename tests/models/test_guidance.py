"""DCG guidance network: shapes, ROI geometry, gradients, all-channel crops, top-t pooling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffmic.errors import ConfigError
from diffmic.models.guidance import DCG, GatedAttentionMIL, default_crop_size, top_t_pool

pytestmark = pytest.mark.usefixtures("one_thread")


def make_dcg(num_classes=4, in_chans=3, image_size=28, **kw) -> DCG:
    torch.manual_seed(0)
    kw.setdefault("mil_hidden", 16)
    return DCG(num_classes, in_chans=in_chans, image_size=image_size, backbone="test_resnet", **kw)


def unzero_norms(module: torch.nn.Module) -> None:
    """timm zero-initialises the last BN of each residual block, which blocks gradients to that branch
    at init; give every norm a non-zero scale so 'every parameter gets a gradient' is meaningful."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("image_size,in_chans", [(28, 1), (28, 3), (64, 1), (64, 3), (224, 3)])
def test_output_shapes(image_size, in_chans):
    C, B = 5, 2
    dcg = make_dcg(C, in_chans, image_size).eval()
    with torch.no_grad():
        out = dcg(torch.randn(B, in_chans, image_size, image_size))
    K = dcg.num_crops
    assert out.logits.shape == (B, C)
    assert out.logits_global.shape == (B, C) and out.logits_local.shape == (B, C)
    assert out.saliency.shape[:2] == (B, C)
    assert out.saliency.shape[2] > 1 and out.saliency.shape[3] > 1  # small stem keeps a real map
    assert out.corners.shape == (B, K, 2) and out.corners.dtype == torch.long
    assert out.attention.shape == (B, K)
    torch.testing.assert_close(out.attention.sum(1), torch.ones(B))
    assert out.features.shape == (B, dcg.feature_dim)
    torch.testing.assert_close(out.logits, 0.5 * (out.logits_global + out.logits_local))
    cs = dcg.crop_size
    assert (out.corners >= 0).all() and (out.corners <= image_size - cs).all()
    for t in out:
        assert torch.isfinite(t.float()).all()


def test_original_geometry_224():
    dcg = make_dcg(7, 3, 224).eval()
    assert dcg.crop_size == 32 == default_crop_size(224)
    with torch.no_grad():
        out = dcg(torch.randn(2, 3, 224, 224))
    assert out.saliency.shape[-2:] == (7, 7)
    assert (out.corners % 32 == 0).all()
    assert out.corners.min() >= 0 and out.corners.max() <= 192
    # K distinct cells per image (no re-picking)
    for b in range(2):
        assert len({tuple(c) for c in out.corners[b].tolist()}) == dcg.num_crops


def test_corners_are_greedy_picks_of_normalised_cam():
    from diffmic.models.roi import (
        cells_to_pixels,
        greedy_max_windows,
        normalize_saliency,
        window_size,
    )

    dcg = make_dcg(3, 3, 64, crop_size=16).eval()
    with torch.no_grad():
        out = dcg(torch.randn(2, 3, 64, 64))
    hw = tuple(out.saliency.shape[-2:])
    crop = (dcg.crop_size, dcg.crop_size)
    win = window_size(crop, hw, (64, 64))
    assert win == (2, 2)  # 16 px on an 8x8 map of a 64 px image
    cells = greedy_max_windows(normalize_saliency(out.saliency), win, dcg.num_crops)
    assert torch.equal(out.corners, cells_to_pixels(cells, hw, (64, 64), crop))


def test_global_logits_are_cam_mean_when_top_t_is_one():
    dcg = make_dcg(3, 3, 28).eval()
    with torch.no_grad():
        out = dcg(torch.randn(2, 3, 28, 28))
    torch.testing.assert_close(out.logits_global, out.saliency.mean(dim=(2, 3)))


def test_cam_size_resizes_saliency():
    dcg = make_dcg(3, 3, 28, cam_size=7).eval()
    with torch.no_grad():
        out = dcg(torch.randn(2, 3, 28, 28))
    assert out.saliency.shape[-2:] == (7, 7)
    assert (out.corners <= 28 - dcg.crop_size).all()


def test_crop_size_and_num_crops_options():
    dcg = make_dcg(3, 3, 64, num_crops=3, crop_size=16).eval()
    with torch.no_grad():
        out = dcg(torch.randn(2, 3, 64, 64))
    assert dcg.crop_size == 16
    assert out.corners.shape == (2, 3, 2) and out.attention.shape == (2, 3)


def test_forward_composition_matches_manual_pipeline():
    """Local logits = MIL over spatially averaged local features of the chosen crops (all channels)."""
    from diffmic.models.roi import crop_batch

    dcg = make_dcg(3, 3, 64, crop_size=32).eval()  # 32 px crops give a 4x4 local feature map
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = dcg(x)
        crops = crop_batch(x, out.corners, (32, 32)).flatten(0, 1)
        fmap = dcg.local_net(crops)
        assert fmap.shape[-1] > 1
        h = fmap.mean(dim=(2, 3)).view(2, dcg.num_crops, -1)
        logits, alpha = dcg.mil(h)
        g = dcg.global_net(x)
    torch.testing.assert_close(out.logits_local, logits)
    torch.testing.assert_close(out.attention, alpha)
    torch.testing.assert_close(out.features, g.mean(dim=(2, 3)))
    torch.testing.assert_close(out.saliency, dcg.cam(g))


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("in_chans", [1, 3])
def test_gradient_reaches_every_parameter_from_fused_loss(in_chans):
    dcg = make_dcg(4, in_chans, 28).train()
    unzero_norms(dcg)
    x = torch.randn(4, in_chans, 28, 28)
    out = dcg(x)
    F.cross_entropy(out.logits, torch.tensor([0, 1, 2, 3])).backward()
    missing = [n for n, p in dcg.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    # both branches are present among the parameters
    names = [n for n, _ in dcg.named_parameters()]
    assert any(n.startswith("global_net.") for n in names) and any(n.startswith("local_net.") for n in names)
    assert any(n.startswith("mil.") for n in names) and any(n.startswith("cam.") for n in names)


def test_gradient_reaches_image_through_both_branches():
    dcg = make_dcg(3, 3, 28).eval()
    x = torch.randn(2, 3, 28, 28, requires_grad=True)
    dcg(x).logits_local.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # local gradient only inside the crops
    out = dcg(x.detach())
    mask = torch.zeros(2, 1, 28, 28, dtype=torch.bool)
    for b in range(2):
        for r, c in out.corners[b].tolist():
            mask[b, :, r:r + dcg.crop_size, c:c + dcg.crop_size] = True
    assert (x.grad.abs() * ~mask).sum() == 0


# --------------------------------------------------------------------------- all channels
def test_local_branch_uses_all_channels():
    dcg = make_dcg(3, 3, 64).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        ref = dcg(x)
    r, c = ref.corners[0, 0].tolist()
    cs = dcg.crop_size
    x2 = x.clone()
    x2[0, 2, r:r + cs, c:c + cs] += 3.0  # change only channel 2 inside the first chosen crop
    # keep the global branch (hence the CAM and the crop positions) on the original image
    hook = dcg.global_net.register_forward_pre_hook(lambda mod, args: (x,))
    try:
        with torch.no_grad():
            out = dcg(x2)
    finally:
        hook.remove()
    assert torch.equal(out.corners, ref.corners)
    torch.testing.assert_close(out.logits_global, ref.logits_global)
    assert not torch.allclose(out.logits_local[0], ref.logits_local[0], atol=1e-6)
    torch.testing.assert_close(out.logits_local[1], ref.logits_local[1])  # other image untouched


def test_local_branch_ignores_pixels_outside_crops():
    dcg = make_dcg(3, 3, 64).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = dcg(x)
    mask = torch.zeros(64, 64, dtype=torch.bool)
    for r, c in ref.corners[0].tolist():
        mask[r:r + dcg.crop_size, c:c + dcg.crop_size] = True
    x2 = x.clone()
    x2[0, :, ~mask] += 5.0
    hook = dcg.global_net.register_forward_pre_hook(lambda mod, args: (x,))
    try:
        with torch.no_grad():
            out = dcg(x2)
    finally:
        hook.remove()
    torch.testing.assert_close(out.logits_local, ref.logits_local)


# --------------------------------------------------------------------------- pieces
def test_top_t_pool():
    g = torch.Generator().manual_seed(0)
    cam = torch.randn(2, 3, 7, 7, generator=g)
    torch.testing.assert_close(top_t_pool(cam, 1.0), cam.mean(dim=(2, 3)))
    for t in (0.02, 0.1, 0.25, 0.5, 0.99):
        k = math.ceil(49 * t)
        expected = cam.flatten(2).sort(dim=2, descending=True).values[..., :k].mean(2)
        torch.testing.assert_close(top_t_pool(cam, t), expected)
    torch.testing.assert_close(top_t_pool(cam, 1e-6), cam.flatten(2).amax(2))  # at least one position


def test_gated_attention_mil_formula():
    torch.manual_seed(0)
    mil = GatedAttentionMIL(8, 4, 3)
    h = torch.randn(2, 5, 8)
    logits, alpha = mil(h)
    a = (torch.sigmoid(h @ mil.u.weight.T) * torch.tanh(h @ mil.v.weight.T)) @ mil.w.weight.T
    alpha_ref = a.squeeze(-1).softmax(1)
    torch.testing.assert_close(alpha, alpha_ref)
    torch.testing.assert_close(logits, (alpha_ref.unsqueeze(-1) * h).sum(1) @ mil.classifier.weight.T)
    assert mil.u.bias is None and mil.v.bias is None and mil.w.bias is None and mil.classifier.bias is None


def test_default_crop_size():
    assert default_crop_size(224) == 32
    assert default_crop_size(28) == 8
    assert default_crop_size(64) == 9


def test_unknown_backbone_raises_config_error():
    with pytest.raises(ConfigError, match="no_such_backbone"):
        DCG(3, image_size=28, backbone="no_such_backbone")
    with pytest.raises(ConfigError, match="no_such_local"):
        DCG(3, image_size=28, backbone="test_resnet", local_backbone="no_such_local")


def test_without_local_branch_the_prior_is_the_global_branch():
    torch.manual_seed(0)
    full = DCG(3, in_chans=3, image_size=28, backbone="test_resnet", num_crops=4)
    torch.manual_seed(0)
    ablated = DCG(3, in_chans=3, image_size=28, backbone="test_resnet", num_crops=4, local_branch=False)
    assert ablated.local_net is None and ablated.mil is None
    assert sum(p.numel() for p in ablated.parameters()) < sum(p.numel() for p in full.parameters())
    ablated.global_net.load_state_dict(full.global_net.state_dict())
    ablated.cam.load_state_dict(full.cam.state_dict())
    x = torch.randn(2, 3, 28, 28)
    full.eval(), ablated.eval()
    a, f = ablated(x), full(x)
    torch.testing.assert_close(a.logits_global, f.logits_global)
    assert torch.equal(a.logits, a.logits_global) and torch.equal(a.logits_local, a.logits_global)
    assert a.corners.shape == (2, 0, 2) and a.attention.shape == (2, 0)
    a.logits.sum().backward()
    assert all(p.grad is not None for p in ablated.parameters())


# --------------------------------------------------------------------------- branch fusion weight
def test_global_weight_sets_the_fused_logits():
    """model.global_weight: the fused logits are w·g + (1 − w)·l; 0.5 is the original's mean exactly,
    and w changes nothing but the fusion (same weights, same branches, same crops)."""
    x = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = make_dcg(4, 3, 28).eval()(x)
        for w in (0.0, 0.75, 1.0):
            out = make_dcg(4, 3, 28, global_weight=w).eval()(x)
            assert torch.equal(out.logits_global, ref.logits_global) and torch.equal(out.corners, ref.corners)
            torch.testing.assert_close(out.logits, w * ref.logits_global + (1 - w) * ref.logits_local)
    assert torch.equal(ref.logits, 0.5 * (ref.logits_global + ref.logits_local))
    assert not torch.allclose(ref.logits_global, ref.logits_local)  # else the test could not see w


def test_global_weight_reaches_the_model_and_the_checkpoint(tmp_path):
    from diffmic.config import DiffMICConfig
    from diffmic.models import build_model, load_model, save_model

    over = ["model.backbone=test_resnet", "model.denoiser_backbone=test_resnet", "model.feature_dim=32",
            "model.mil_hidden=16", "model.global_weight=0.8"]
    model = build_model(DiffMICConfig.from_yaml(None, over), num_classes=3, in_chans=1, image_size=28)
    assert model.guidance.global_weight == 0.8
    save_model(model, tmp_path / "model.pt")
    assert load_model(tmp_path / "model.pt").guidance.global_weight == 0.8


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_global_weight_out_of_range(bad):
    from diffmic.config import DiffMICConfig

    with pytest.raises(ConfigError, match=r"model.global_weight must be in \[0, 1\]"):
        DiffMICConfig.from_yaml(None, [f"model.global_weight={bad}"])
    with pytest.raises(ValueError, match="global_weight"):
        make_dcg(global_weight=bad)
