"""Label denoiser ε_θ(x, y_t, ŷ, t): shapes, formula of ConditionalLinear, encode/denoise split, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffmic.models.backbones import create_backbone
from diffmic.models.denoiser import ConditionalLinear, LabelDenoiser

pytestmark = pytest.mark.usefixtures("one_thread")


def make_denoiser(C=4, in_chans=3, feature_dim=32, T=50, small=True) -> LabelDenoiser:
    torch.manual_seed(0)
    enc, dim = create_backbone("test_resnet", in_chans=in_chans, small_input=small, pooled=True)
    return LabelDenoiser(C, feature_dim=feature_dim, num_timesteps=T, encoder=enc, encoder_dim=dim)


def inputs(B, C, in_chans, size, T=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, in_chans, size, size, generator=g)
    y_t = torch.randn(B, C, generator=g)
    prior = torch.randn(B, C, generator=g).softmax(1)
    t = torch.randint(0, T, (B,), generator=g)
    return x, y_t, prior, t


def test_conditional_linear_formula_and_init():
    torch.manual_seed(0)
    cl = ConditionalLinear(6, 5, 20)
    w = cl.embed.weight
    assert w.shape == (20, 5)
    assert (w >= 0).all() and (w <= 1).all() and w.std() > 0.1  # U(0, 1)
    u = torch.randn(3, 6)
    t = torch.tensor([0, 7, 19])
    torch.testing.assert_close(cl(u, t), w[t] * (u @ cl.linear.weight.T + cl.linear.bias))


@pytest.mark.parametrize("size,in_chans,small", [(28, 1, True), (28, 3, True), (64, 1, True), (64, 3, True),
                                                 (224, 3, False)])
def test_output_shapes(size, in_chans, small):
    C, B = 5, 3
    net = make_denoiser(C, in_chans, small=small).eval()
    x, y_t, prior, t = inputs(B, C, in_chans, size)
    with torch.no_grad():
        feats = net.encode(x)
        eps = net(x, y_t, prior, t)
    assert feats.shape == (B, 32)
    assert eps.shape == (B, C)
    assert torch.isfinite(eps).all()


def test_forward_equals_denoise_of_encode():
    net = make_denoiser().eval()
    x, y_t, prior, t = inputs(3, 4, 3, 28)
    with torch.no_grad():
        torch.testing.assert_close(net(x, y_t, prior, t), net.denoise(net.encode(x), y_t, prior, t))


def test_denoise_formula():
    """ε̂ = W4 h3 + b4 with h1 = softplus(BN1(γ1(t)⊙(W1[y_t; ŷ]+b1))), h = e ⊙ h1, ..."""
    net = make_denoiser().eval()
    with torch.no_grad():
        for bn in (net.norm1, net.norm2, net.norm3):  # non-trivial eval statistics
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    x, y_t, prior, t = inputs(3, 4, 3, 28)
    with torch.no_grad():
        e = net.encode(x)
        h = F.softplus(net.norm1(net.lin1.embed(t) * net.lin1.linear(torch.cat([y_t, prior], 1))))
        h = e * h
        h = F.softplus(net.norm2(net.lin2.embed(t) * net.lin2.linear(h)))
        h = F.softplus(net.norm3(net.lin3.embed(t) * net.lin3.linear(h)))
        torch.testing.assert_close(net.denoise(e, y_t, prior, t), net.out(h))


def test_output_depends_on_every_input():
    net = make_denoiser().eval()
    x, y_t, prior, t = inputs(3, 4, 3, 28)
    with torch.no_grad():
        ref = net(x, y_t, prior, t)
        assert not torch.allclose(net(x + 1.0, y_t, prior, t), ref)
        assert not torch.allclose(net(x, y_t + 1.0, prior, t), ref)
        assert not torch.allclose(net(x, y_t, prior.flip(1), t), ref)
        assert not torch.allclose(net(x, y_t, prior, (t + 1) % 50), ref)


def test_gradient_reaches_every_parameter():
    net = make_denoiser().train()
    with torch.no_grad():  # timm zero-inits the last BN of each block: make every branch live
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
    x, y_t, prior, t = inputs(4, 4, 3, 28)
    eps = torch.randn(4, 4)
    F.mse_loss(net(x, y_t, prior, t), eps).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    assert any(n.startswith("encoder.") for n, _ in net.named_parameters())
    # only the embedding rows of the used timesteps receive a gradient
    used = torch.zeros(50, dtype=torch.bool)
    used[t] = True
    g = net.lin1.embed.weight.grad
    assert (g[~used] == 0).all() and (g[used].abs().sum(1) > 0).all()


def test_without_encoder_uses_given_features():
    torch.manual_seed(0)
    net = LabelDenoiser(3, feature_dim=16, num_timesteps=10, encoder=None, encoder_dim=24).eval()
    f = torch.randn(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(net.encode(f), net.norm0(net.proj(f)))
        out = net(f, torch.randn(2, 3), torch.rand(2, 3), torch.tensor([0, 9]))
    assert out.shape == (2, 3)


def test_timestep_embedding_rows():
    net = make_denoiser(T=37)
    for lin in (net.lin1, net.lin2, net.lin3):
        assert lin.embed.num_embeddings == 37
    assert net.lin1.linear.in_features == 2 * 4
    assert net.out.out_features == 4
