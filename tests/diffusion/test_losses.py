"""Training losses: eps MSE, Gaussian-kernel MMD (V-statistic, bandwidth C²), antithetic t, combined loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmic.diffusion.losses import antithetic_timesteps, diffmic_loss, eps_mse, gaussian_mmd


def mmd_numpy(a: np.ndarray, b: np.ndarray, bandwidth: float) -> float:
    """Biased V-statistic, diagonals included, k(u, v) = exp(-‖u - v‖² / bandwidth)."""

    def k(x, y):
        total = 0.0
        for xi in x:
            for yj in y:
                total += np.exp(-np.sum((xi - yj) ** 2) / bandwidth)
        return total / (len(x) * len(y))

    return k(a, a) + k(b, b) - 2 * k(a, b)


# --------------------------------------------------------------------------- antithetic timesteps
@pytest.mark.parametrize("n", [1, 2, 5, 8, 33, 64])
@pytest.mark.parametrize("T", [10, 1000])
def test_antithetic_timesteps(n, T):
    t = antithetic_timesteps(n, T, generator=torch.Generator().manual_seed(n))
    assert t.shape == (n,)
    assert t.dtype == torch.long
    assert ((t >= 0) & (t < T)).all()
    h = n // 2 + 1
    for i in range(n - h):
        assert t[i].item() + t[i + h].item() == T - 1


def test_antithetic_timesteps_reproducible_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a = antithetic_timesteps(16, 1000, generator=torch.Generator().manual_seed(3))
    b = antithetic_timesteps(16, 1000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b)


def test_antithetic_timesteps_cover_range():
    t = antithetic_timesteps(4000, 10, generator=torch.Generator().manual_seed(0))
    assert set(t.tolist()) == set(range(10))


# --------------------------------------------------------------------------- MMD
def test_mmd_zero_for_identical_sets():
    a = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
    assert gaussian_mmd(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert gaussian_mmd(a, a.clone(), bandwidth=0.5).item() == pytest.approx(0.0, abs=1e-6)


def test_mmd_positive_for_shifted_sets_and_grows_with_shift():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(64, 5, generator=g)
    small = gaussian_mmd(a, a + 0.5).item()
    large = gaussian_mmd(a, a + 2.0).item()
    assert small > 1e-3
    assert large > small


def test_mmd_symmetric():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(10, 7, generator=g), torch.randn(13, 7, generator=g) + 0.3
    assert gaussian_mmd(a, b).item() == pytest.approx(gaussian_mmd(b, a).item(), abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("C", [2, 5, 7])
def test_mmd_matches_numpy_v_statistic_with_bandwidth_c_squared(seed, C):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(9, C))
    b = rng.normal(size=(11, C)) * 1.5 + 0.4
    expected = mmd_numpy(a, b, float(C**2))
    got = gaussian_mmd(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).item()
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-9)
    # explicit bandwidth
    got2 = gaussian_mmd(torch.tensor(a), torch.tensor(b), bandwidth=3.0).item()
    assert got2 == pytest.approx(mmd_numpy(a, b, 3.0), rel=1e-6, abs=1e-9)
    # a wrong bandwidth (e.g. C instead of C²) gives a different value
    assert abs(mmd_numpy(a, b, float(C)) - expected) > 1e-6


def test_mmd_differentiable():
    a = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    b = (a + 1.0).requires_grad_(True)
    gaussian_mmd(a, b).backward()
    assert b.grad is not None and torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0


# --------------------------------------------------------------------------- combined loss
def test_eps_mse():
    e = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    h = torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    assert eps_mse(e, h).item() == pytest.approx((1 + 0 + 4 + 1) / 4)


@pytest.mark.parametrize("w", [0.5, 0.0, 2.0])
def test_diffmic_loss_combines_terms(w):
    g = torch.Generator().manual_seed(4)
    eps = torch.randn(12, 5, generator=g)
    e, eg, el = (torch.randn(12, 5, generator=g) for _ in range(3))
    out = diffmic_loss(eps, e, eg, el, mmd_weight=w)
    mse = ((eps - e) ** 2).mean()
    mg = mmd_numpy(eps.double().numpy(), eg.double().numpy(), 25.0)
    ml = mmd_numpy(eps.double().numpy(), el.double().numpy(), 25.0)
    assert out["mse"].item() == pytest.approx(mse.item(), rel=1e-5)
    assert out["mmd_global"].item() == pytest.approx(mg, rel=1e-4, abs=1e-6)
    assert out["mmd_local"].item() == pytest.approx(ml, rel=1e-4, abs=1e-6)
    assert out["loss"].item() == pytest.approx(mse.item() + w * (mg + ml), rel=1e-4, abs=1e-6)


def test_diffmic_loss_default_weight_is_half():
    g = torch.Generator().manual_seed(5)
    eps, e, eg, el = (torch.randn(8, 3, generator=g) for _ in range(4))
    out = diffmic_loss(eps, e, eg, el)
    expected = out["mse"] + 0.5 * (out["mmd_global"] + out["mmd_local"])
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    # streams are not interchangeable with the MSE stream
    swapped = diffmic_loss(eps, eg, e, el)
    assert swapped["mse"].item() != pytest.approx(out["mse"].item())


def test_diffmic_loss_gradients_reach_all_streams():
    g = torch.Generator().manual_seed(6)
    eps = torch.randn(8, 3, generator=g)
    e, eg, el = (torch.randn(8, 3, generator=g).requires_grad_(True) for _ in range(3))
    diffmic_loss(eps, e, eg, el)["loss"].backward()
    for x in (e, eg, el):
        assert x.grad is not None and x.grad.abs().sum() > 0
