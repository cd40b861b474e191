"""CardSchedule: closed-form CARD equations checked against independent float64 computations."""

from __future__ import annotations

import math

import pytest
import torch

from diffmic.diffusion.schedule import BETA_SCHEDULES, CardSchedule, make_betas
from diffmic.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def _ref_linear(T: int, b0: float = 1e-4, b1: float = 0.02):
    """Independent float64 reference quantities for the linear schedule (pure python)."""
    betas = [b0 + (b1 - b0) * i / (T - 1) for i in range(T)] if T > 1 else [b0]
    alphas = [1 - b for b in betas]
    abar, acc = [], 1.0
    for a in alphas:
        acc *= a
        abar.append(acc)
    return betas, alphas, abar


@pytest.fixture(scope="module")
def sched() -> CardSchedule:
    return CardSchedule(1000, "linear")


# --------------------------------------------------------------------------- schedule values
def test_buffers_are_float32_and_not_persistent(sched):
    for name in ("betas", "alphas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
                 "gamma0", "gamma1", "gamma2", "posterior_variance"):
        buf = getattr(sched, name)
        assert buf.dtype == torch.float32, name
        assert buf.shape == (1000,), name
    assert len(sched.state_dict()) == 0  # non-persistent: checkpoints do not carry them


def test_linear_schedule_matches_spec_table(sched):
    abar = sched.alphas_cumprod
    assert abar[0].item() == pytest.approx(0.9999, abs=1e-6)
    assert sched.sqrt_alphas_cumprod[0].item() == pytest.approx(0.99995, abs=1e-5)
    assert abar[59].item() == pytest.approx(0.95956, abs=1e-4)
    assert sched.sqrt_alphas_cumprod[59].item() == pytest.approx(0.9796, abs=1e-4)
    assert sched.sqrt_one_minus_alphas_cumprod[59].item() == pytest.approx(0.2011, abs=1e-4)
    assert abar[99].item() == pytest.approx(0.89702, abs=1e-4)
    assert abar[249].item() == pytest.approx(0.52409, abs=1e-4)
    assert sched.sqrt_alphas_cumprod[249].item() == pytest.approx(0.7239, abs=1e-4)
    assert sched.sqrt_one_minus_alphas_cumprod[249].item() == pytest.approx(0.6899, abs=1e-4)
    assert sched.sqrt_alphas_cumprod[499].item() == pytest.approx(0.2803, abs=1e-4)
    assert sched.sqrt_alphas_cumprod[999].item() == pytest.approx(0.0064, abs=1e-4)
    assert sched.sqrt_one_minus_alphas_cumprod[999].item() == pytest.approx(1.0, abs=1e-4)
    assert sched.betas[0].item() == pytest.approx(1e-4, rel=1e-5)
    assert sched.betas[-1].item() == pytest.approx(0.02, rel=1e-5)


def test_linear_schedule_matches_python_reference(sched):
    betas, _, abar = _ref_linear(1000)
    torch.testing.assert_close(sched.betas.double(), torch.tensor(betas, dtype=torch.float64), atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(sched.alphas_cumprod.double(), torch.tensor(abar, dtype=torch.float64),
                               atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(sched.alphas_cumprod_prev[1:], sched.alphas_cumprod[:-1])
    assert sched.alphas_cumprod_prev[0].item() == 1.0


def test_make_betas_float64_and_shape():
    b = make_betas("linear", 10)
    assert b.dtype == torch.float64 and b.shape == (10,)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)


@pytest.mark.parametrize("T", [10, 100, 1000])
def test_cosine_schedule_valid(T):
    b = make_betas("cosine", T)
    assert b.shape == (T,)
    assert torch.isfinite(b).all()
    assert (b > 0).all() and (b <= 0.999).all()
    s = CardSchedule(T, "cosine")
    abar = s.alphas_cumprod
    assert (abar[1:] < abar[:-1]).all()  # strictly decreasing
    assert (abar > 0).all() and (abar < 1).all()
    for name in ("gamma0", "gamma1", "gamma2", "posterior_variance"):
        assert torch.isfinite(getattr(s, name)).all(), name


def test_unknown_schedule_raises_config_error_naming_options():
    with pytest.raises(ConfigError) as ei:
        make_betas("quadratic", 10)
    msg = str(ei.value)
    assert "quadratic" in msg
    for name in BETA_SCHEDULES:
        assert name in msg
    with pytest.raises(ConfigError, match="linear"):
        CardSchedule(10, "sigmoid")


def test_bad_num_timesteps_raises():
    with pytest.raises(ConfigError):
        make_betas("linear", 0)


# --------------------------------------------------------------------------- posterior
@pytest.mark.parametrize("T,kind", [(1000, "linear"), (50, "linear"), (100, "cosine")])
def test_gamma_sum_is_one(T, kind):
    # Float64 identity with the spec's formulas, from independently computed schedule values.
    betas = make_betas(kind, T)
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    g0 = betas * abar_prev.sqrt() / (1 - abar)
    g1 = (1 - abar_prev) * alphas.sqrt() / (1 - abar)
    g2 = 1 + (abar.sqrt() - 1) * (alphas.sqrt() + abar_prev.sqrt()) / (1 - abar)
    torch.testing.assert_close(g0 + g1 + g2, torch.ones_like(g0), atol=1e-10, rtol=0)
    # The stored float32 buffers: same identity, and equal to the float64 values.
    s = CardSchedule(T, kind)
    total = s.gamma0.double() + s.gamma1.double() + s.gamma2.double()
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.gamma0.double(), g0, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s.gamma1.double(), g1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s.gamma2.double(), g2, atol=1e-5, rtol=1e-5)


def test_posterior_equals_shifted_ddpm_posterior_on_residual(sched):
    """Bayes in float64: r_{t-1}|r_0 ~ N(√ᾱ_{t-1} r0, 1-ᾱ_{t-1}); r_t|r_{t-1} ~ N(√α_t r_{t-1}, β_t)."""
    betas, alphas, abar = _ref_linear(1000)
    g = torch.Generator().manual_seed(0)
    B, C = 6, 5
    t = torch.tensor([1, 2, 59, 249, 500, 999])
    y0 = torch.nn.functional.one_hot(torch.randint(0, C, (B,), generator=g), C).float()
    prior = torch.randn(B, C, generator=g).softmax(1)
    y_t = torch.randn(B, C, generator=g)
    mean, var = sched.posterior(y0, y_t, prior, t)
    assert mean.shape == (B, C)
    assert var.shape[0] == B and var.numel() == B
    for i, ti in enumerate(t.tolist()):
        a_prev = abar[ti - 1]
        prec = 1 / (1 - a_prev) + alphas[ti] / betas[ti]
        v = 1 / prec
        r0 = y0[i].double() - prior[i].double()
        rt = y_t[i].double() - prior[i].double()
        m = v * (math.sqrt(a_prev) * r0 / (1 - a_prev) + math.sqrt(alphas[ti]) * rt / betas[ti])
        expected_mean = prior[i].double() + m
        torch.testing.assert_close(mean[i].double(), expected_mean, atol=2e-5, rtol=1e-4)
        assert var[i].item() == pytest.approx(v, rel=1e-4, abs=1e-9)


def test_posterior_variance_closed_form(sched):
    betas, _, abar = _ref_linear(1000)
    for t in (1, 10, 500, 999):
        expected = betas[t] * (1 - abar[t - 1]) / (1 - abar[t])
        assert sched.posterior_variance[t].item() == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- q_sample / predict_y0
def test_q_sample_with_zero_prior_is_ddpm(sched):
    g = torch.Generator().manual_seed(1)
    B, C = 8, 4
    y0 = torch.randn(B, C, generator=g)
    eps = torch.randn(B, C, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    _, _, abar = _ref_linear(1000)
    a = torch.tensor([abar[i] for i in t.tolist()], dtype=torch.float64).view(B, 1)
    expected = a.sqrt() * y0.double() + (1 - a).sqrt() * eps.double()
    got = sched.q_sample(y0, torch.zeros_like(y0), t, eps)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_q_sample_residual_identity(sched):
    g = torch.Generator().manual_seed(2)
    B, C = 16, 7
    y0 = torch.nn.functional.one_hot(torch.randint(0, C, (B,), generator=g), C).float()
    m = torch.randn(B, C, generator=g).softmax(1)
    eps = torch.randn(B, C, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    _, _, abar = _ref_linear(1000)
    a = torch.tensor([abar[i] for i in t.tolist()], dtype=torch.float64).view(B, 1)
    r = sched.q_sample(y0, m, t, eps).double() - m.double()
    expected = a.sqrt() * (y0.double() - m.double()) + (1 - a).sqrt() * eps.double()
    torch.testing.assert_close(r, expected, atol=1e-5, rtol=1e-5)
    # also the spec form √ᾱ y0 + (1-√ᾱ) m + √(1-ᾱ) ε
    y = a.sqrt() * y0.double() + (1 - a.sqrt()) * m.double() + (1 - a).sqrt() * eps.double()
    torch.testing.assert_close(sched.q_sample(y0, m, t, eps).double(), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t_idx", [0, 59, 249, 999])
def test_q_sample_residual_empirical_law(sched, t_idx):
    g = torch.Generator().manual_seed(3 + t_idx)
    N, C = 200_000, 3
    y0 = torch.tensor([[0.0, 1.0, 0.0]]).expand(N, C)
    m = torch.tensor([[0.2, 0.5, 0.3]]).expand(N, C)
    eps = torch.randn(N, C, generator=g)
    t = torch.full((N,), t_idx)
    r = sched.q_sample(y0, m, t, eps) - m
    a = sched.alphas_cumprod[t_idx].item()
    r0 = (y0[0] - m[0])
    se = math.sqrt((1 - a) / N)
    torch.testing.assert_close(r.mean(0), math.sqrt(a) * r0, atol=6 * se + 1e-6, rtol=0)
    torch.testing.assert_close(r.var(0), torch.full((C,), 1 - a), atol=0.02 * (1 - a) + 1e-7, rtol=0)


def test_predict_y0_inverts_q_sample(sched):
    g = torch.Generator().manual_seed(4)
    B, C = 32, 5
    y0 = torch.randn(B, C, generator=g)
    m = torch.randn(B, C, generator=g).softmax(1)
    eps = torch.randn(B, C, generator=g)
    t = torch.cat([torch.tensor([0, 999]), torch.randint(0, 1000, (B - 2,), generator=g)])
    y_t = sched.q_sample(y0, m, t, eps)
    # at t=999 √ᾱ≈0.0064 amplifies float32 rounding ~150x
    torch.testing.assert_close(sched.predict_y0(y_t, m, t, eps), y0, atol=2e-4, rtol=1e-4)
    # with t small the inversion is tight
    ts = torch.randint(0, 300, (B,), generator=g)
    torch.testing.assert_close(sched.predict_y0(sched.q_sample(y0, m, ts, eps), m, ts, eps), y0,
                               atol=1e-5, rtol=1e-5)


def test_step_at_zero_returns_y0_estimate_without_noise(sched):
    g = torch.Generator().manual_seed(5)
    y_t = torch.randn(4, 3, generator=g)
    m = torch.randn(4, 3, generator=g).softmax(1)
    eps = torch.randn(4, 3, generator=g)
    out = sched.step(eps, 0, y_t, m, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(out, sched.predict_y0(y_t, m, torch.zeros(4, dtype=torch.long), eps))


def test_step_uses_posterior_mean_and_variance(sched):
    g = torch.Generator().manual_seed(6)
    y_t = torch.randn(4, 3, generator=g)
    m = torch.randn(4, 3, generator=g).softmax(1)
    eps = torch.randn(4, 3, generator=g)
    t = 100
    out = sched.step(eps, t, y_t, m, generator=torch.Generator().manual_seed(11))
    z = torch.randn((4, 3), generator=torch.Generator().manual_seed(11))
    tt = torch.full((4,), t)
    mean, var = sched.posterior(sched.predict_y0(y_t, m, tt, eps), y_t, m, tt)
    torch.testing.assert_close(out, mean + var.sqrt() * z)


def test_schedule_moves_with_to_double():
    s = CardSchedule(20).double()
    assert s.gamma0.dtype == torch.float64
