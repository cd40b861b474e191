"""Reverse samplers: call counts, timestep order, determinism, generator use and oracle recovery."""

from __future__ import annotations

import pytest
import torch

from diffmic.diffusion.sampling import (
    ddim_timesteps,
    sample,
    sample_ancestral,
    sample_ddim,
    sample_truncated,
)
from diffmic.diffusion.schedule import CardSchedule
from diffmic.errors import ConfigError

B, C = 4, 3


pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder:
    """A denoiser closure that counts calls and records t; returns a smooth function of (y_t, t)."""

    def __init__(self, fn=None):
        self.ts: list[int] = []
        self.batch: list[int] = []
        self.fn = fn

    def __call__(self, y_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == (y_t.shape[0],)
        assert (t == t[0]).all()
        self.ts.append(int(t[0]))
        self.batch.append(y_t.shape[0])
        if self.fn is not None:
            return self.fn(y_t, t)
        return torch.tanh(y_t * 0.7 + t.view(-1, 1).float() / 100.0)

    @property
    def calls(self) -> int:
        return len(self.ts)


def make_oracle(schedule: CardSchedule, y0: torch.Tensor, prior: torch.Tensor):
    """ε implied by y_t and a fixed y0: eps = (y_t − √ᾱ y0 − (1−√ᾱ) ŷ)/√(1−ᾱ)."""

    def fn(y_t, t):
        a = schedule.sqrt_alphas_cumprod[t].view(-1, 1)
        s = schedule.sqrt_one_minus_alphas_cumprod[t].view(-1, 1)
        return (y_t - a * y0 - (1 - a) * prior) / s

    return fn


@pytest.fixture(scope="module")
def s50() -> CardSchedule:
    return CardSchedule(50)


@pytest.fixture(scope="module")
def s1000() -> CardSchedule:
    return CardSchedule(1000)


@pytest.fixture
def prior() -> torch.Tensor:
    return torch.randn(B, C, generator=torch.Generator().manual_seed(0)).softmax(1)


@pytest.fixture
def y0() -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor([0, 2, 1, 2]), C).float()


# --------------------------------------------------------------------------- call counts & order
@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_truncated_calls_and_order(s50, prior, n):
    rec = Recorder()
    out = sample_truncated(s50, rec, prior, n, generator=torch.Generator().manual_seed(0))
    assert rec.calls == n
    assert rec.ts == list(range(n - 1, -1, -1))
    assert out.shape == (B, C) and torch.isfinite(out).all()


def test_ancestral_calls_all_timesteps(s50, prior):
    rec = Recorder()
    sample_ancestral(s50, rec, prior, generator=torch.Generator().manual_seed(0))
    assert rec.calls == 50
    assert rec.ts == list(range(49, -1, -1))


@pytest.mark.parametrize("T,n", [(50, 1), (50, 2), (50, 5), (50, 49), (50, 50), (1000, 10), (1000, 60), (1000, 1000)])
def test_ddim_calls_and_order(T, n, prior, request):
    s = request.getfixturevalue("s50" if T == 50 else "s1000")
    rec = Recorder()
    sample_ddim(s, rec, prior, n, generator=torch.Generator().manual_seed(0))
    assert rec.calls == n
    assert rec.ts[0] == T - 1
    if n > 1:
        assert rec.ts[-1] == 0
    assert all(a > b for a, b in zip(rec.ts, rec.ts[1:])), rec.ts
    assert all(0 <= t < T for t in rec.ts)
    assert rec.ts == ddim_timesteps(T, n)


@pytest.mark.parametrize("name,expected", [("ddim", 5), ("truncated", 5), ("ancestral", 50)])
def test_sample_dispatch_call_count(s50, prior, name, expected):
    rec = Recorder()
    out = sample(s50, rec, prior, sampler=name, num_steps=5, generator=torch.Generator().manual_seed(0))
    assert rec.calls == expected
    assert out.shape == (B, C)


def test_sample_unknown_sampler(s50, prior):
    with pytest.raises(ConfigError) as ei:
        sample(s50, Recorder(), prior, sampler="dpm")
    for name in ("ddim", "ancestral", "truncated"):
        assert name in str(ei.value)


@pytest.mark.parametrize("n", [0, 51])
def test_bad_step_counts(s50, prior, n):
    with pytest.raises(ConfigError):
        sample_truncated(s50, Recorder(), prior, n)
    with pytest.raises(ConfigError):
        sample_ddim(s50, Recorder(), prior, n)


# --------------------------------------------------------------------------- determinism & RNG
def test_ddim_eta0_deterministic_given_seed(s50, prior):
    a = sample_ddim(s50, Recorder(), prior, 5, generator=torch.Generator().manual_seed(7))
    b = sample_ddim(s50, Recorder(), prior, 5, generator=torch.Generator().manual_seed(7))
    c = sample_ddim(s50, Recorder(), prior, 5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_ddim_eta0_is_function_of_start_noise(s50, prior):
    noise = torch.randn(B, C, generator=torch.Generator().manual_seed(3))
    a = sample_ddim(s50, Recorder(), prior, 5, noise=noise, generator=torch.Generator().manual_seed(1))
    b = sample_ddim(s50, Recorder(), prior, 5, noise=noise, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    # noise drawn from a generator equals passing the same noise explicitly
    g_noise = torch.randn((B, C), generator=torch.Generator().manual_seed(3))
    c = sample_ddim(s50, Recorder(), prior, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(c, sample_ddim(s50, Recorder(), prior, 5, noise=g_noise))


def test_ddim_eta_positive_is_stochastic(s50, prior):
    noise = torch.randn(B, C, generator=torch.Generator().manual_seed(3))
    a = sample_ddim(s50, Recorder(), prior, 5, eta=1.0, noise=noise, generator=torch.Generator().manual_seed(1))
    b = sample_ddim(s50, Recorder(), prior, 5, eta=1.0, noise=noise, generator=torch.Generator().manual_seed(2))
    c = sample_ddim(s50, Recorder(), prior, 5, eta=1.0, noise=noise, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, b)
    assert torch.equal(a, c)


@pytest.mark.parametrize("name", ["ddim", "truncated", "ancestral"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_generator_respected_global_rng_untouched(s50, prior, name, eta):
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    a = sample(s50, Recorder(), prior, sampler=name, num_steps=5, eta=eta, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(999)  # changing the global RNG must not change the result
    b = sample(s50, Recorder(), prior, sampler=name, num_steps=5, eta=eta, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_truncated_stochastic_across_seeds(s50, prior):
    a = sample_truncated(s50, Recorder(), prior, 10, generator=torch.Generator().manual_seed(0))
    b = sample_truncated(s50, Recorder(), prior, 10, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, b)


def test_truncated_starts_at_prior_plus_noise(s50, prior):
    seen = []

    def fn(y_t, t):
        seen.append(y_t.clone())
        return torch.zeros_like(y_t)

    sample_truncated(s50, fn, prior, 3, generator=torch.Generator().manual_seed(5))
    z = torch.randn((B, C), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(seen[0], prior + z)


# --------------------------------------------------------------------------- oracle recovery
@pytest.mark.parametrize("T,n", [(50, 1), (50, 2), (50, 3), (50, 10), (50, 50), (1000, 1), (1000, 7), (1000, 250)])
@pytest.mark.parametrize("seed", [0, 1])
def test_ddim_oracle_recovers_y0(T, n, seed, prior, y0, request):
    s = request.getfixturevalue("s50" if T == 50 else "s1000")
    oracle = make_oracle(s, y0, prior)
    out = sample_ddim(s, oracle, prior, n, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(out, y0, atol=1e-4, rtol=0)


def test_ddim_oracle_recovers_y0_with_eta(s50, prior, y0):
    out = sample_ddim(s50, make_oracle(s50, y0, prior), prior, 8, eta=1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, y0, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sched_name", ["s50", "s1000"])
def test_ancestral_oracle_ends_at_y0(sched_name, prior, y0, request):
    s = request.getfixturevalue(sched_name)
    out = sample_ancestral(s, make_oracle(s, y0, prior), prior, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, y0, atol=1e-4, rtol=0)


def test_truncated_oracle_ends_at_y0(s1000, prior, y0):
    out = sample_truncated(s1000, make_oracle(s1000, y0, prior), prior, 60, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, y0, atol=1e-4, rtol=0)


def test_ancestral_oracle_intermediate_states_follow_forward_marginal(s1000, y0):
    """With the oracle ε, each y_{t-1} ~ posterior, so y_t has the forward law marginally.

    T=1000 so that the N(ŷ, I) start is (almost) the true marginal (√ᾱ_999 ≈ 0.006).
    """
    N = 2000
    yy0 = y0[:1].expand(N, C)
    pr = torch.tensor([[0.2, 0.5, 0.3]]).expand(N, C)
    states = {}

    oracle = make_oracle(s1000, yy0, pr)

    def fn(y_t, t):
        if int(t[0]) == 10:
            states[10] = y_t.clone()
        return oracle(y_t, t)

    sample_ancestral(s1000, fn, pr, generator=torch.Generator().manual_seed(0))
    t = 10
    a = s1000.sqrt_alphas_cumprod[t]
    expected_mean = a * yy0[0] + (1 - a) * pr[0]
    std = s1000.sqrt_one_minus_alphas_cumprod[t]
    torch.testing.assert_close(states[t].mean(0), expected_mean, atol=6 * std.item() / N**0.5, rtol=0)
    torch.testing.assert_close(states[t].std(0), std.expand(C), atol=0.05 * std.item(), rtol=0)


def _record_inputs(fn):
    seen = []

    def wrapped(y_t, t):
        seen.append((int(t[0]), y_t.clone()))
        return fn(y_t, t)

    return wrapped, seen


@pytest.mark.parametrize("n", [1, 4])
def test_ddim_first_state_is_prior_plus_scaled_noise(s50, prior, y0, n):
    noise = torch.randn(B, C, generator=torch.Generator().manual_seed(2))
    fn, seen = _record_inputs(make_oracle(s50, y0, prior))
    sample_ddim(s50, fn, prior, n, noise=noise)
    t0, y_first = seen[0]
    assert t0 == 49
    torch.testing.assert_close(y_first, prior + s50.sqrt_one_minus_alphas_cumprod[49] * noise)


def test_ddim_eta0_oracle_states_lie_on_forward_process(s1000, prior, y0):
    """With the true ε and eta=0, every DDIM state is exactly q_sample(y0, ŷ, t, ε*), where ε* is the
    noise implied by the start state (the start is ŷ + √(1-ᾱ) z, so ε* ≈ z up to √ᾱ_{T-1} r0)."""
    noise = torch.randn(B, C, generator=torch.Generator().manual_seed(4))
    oracle = make_oracle(s1000, y0, prior)
    fn, seen = _record_inputs(oracle)
    sample_ddim(s1000, fn, prior, 6, noise=noise)
    assert len(seen) == 6
    eps_star = oracle(seen[0][1], torch.full((B,), seen[0][0]))
    for t, y_t in seen:
        expected = s1000.q_sample(y0, prior, torch.full((B,), t), eps_star)
        torch.testing.assert_close(y_t, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta_oracle_states_keep_forward_marginals(s1000, eta):
    """For any eta, DDIM with the true ε keeps the marginal law N(√ᾱ y0 + (1-√ᾱ) ŷ, (1-ᾱ) I)."""
    N = 3000
    yy0 = torch.tensor([[0.0, 1.0, 0.0]]).expand(N, C)
    pr = torch.tensor([[0.2, 0.5, 0.3]]).expand(N, C)
    fn, seen = _record_inputs(make_oracle(s1000, yy0, pr))
    sample_ddim(s1000, fn, pr, 5, eta=eta, generator=torch.Generator().manual_seed(0))
    for t, y_t in seen[1:-1]:
        a = s1000.alphas_cumprod[t]
        mean = a.sqrt() * yy0[0] + (1 - a.sqrt()) * pr[0]
        std = (1 - a).sqrt()
        torch.testing.assert_close(y_t.mean(0), mean, atol=6 * std.item() / N**0.5, rtol=0)
        torch.testing.assert_close(y_t.std(0), std.expand(C), atol=0.06 * std.item(), rtol=0)


def test_ddim_timesteps_values():
    assert ddim_timesteps(1000, 1) == [999]
    assert ddim_timesteps(50, 50) == list(range(49, -1, -1))
    ts = ddim_timesteps(1000, 10)
    assert len(ts) == 10 and ts[0] == 999 and ts[-1] == 0
    with pytest.raises(ConfigError):
        ddim_timesteps(10, 11)


def test_random_chain_noise_is_what_ddim_draws(s50, prior):
    from diffmic.diffusion.sampling import chain_start_noise

    noise = chain_start_noise(3, B, C, generator=torch.Generator().manual_seed(5))
    rec = Recorder()
    a = sample_ddim(s50, rec, prior.repeat(3, 1), 5, generator=torch.Generator().manual_seed(5))
    b = sample_ddim(s50, rec, prior.repeat(3, 1), 5, noise=noise)
    assert torch.equal(a, b)


@pytest.mark.parametrize("n", [16, 64])
def test_qmc_chain_noise_is_stratified_and_shared_by_the_images(n):
    from diffmic.diffusion.sampling import chain_start_noise

    noise = chain_start_noise(n, B, C, kind="qmc", generator=torch.Generator().manual_seed(1))
    assert noise.shape == (n * B, C)
    z = noise.view(n, B, C)
    assert torch.equal(z, z[:, :1].expand_as(z))  # chain s starts at the same point for every image
    # each coordinate of 2^k scrambled Sobol points has exactly one point in each of n equal-probability bins
    bins = (torch.special.ndtr(z[:, 0].double()) * n).floor().long()
    for c in range(C):
        assert torch.equal(bins[:, c].sort().values, torch.arange(n))
    again = chain_start_noise(n, B, C, kind="qmc", generator=torch.Generator().manual_seed(1))
    other = chain_start_noise(n, B, C, kind="qmc", generator=torch.Generator().manual_seed(2))
    assert torch.equal(noise, again) and not torch.equal(noise, other)


def test_qmc_chain_noise_has_far_less_error_than_iid():
    from diffmic.diffusion.sampling import chain_start_noise

    n, errs = 64, {"random": [], "qmc": []}
    for seed in range(20):
        for kind, err in errs.items():
            z = chain_start_noise(n, 1, 2, kind=kind, generator=torch.Generator().manual_seed(seed))
            err.append(float((z[:, 0] > 0.3).float().mean() - (1 - torch.special.ndtr(torch.tensor(0.3)))))
    rms = {k: (torch.tensor(v) ** 2).mean().sqrt() for k, v in errs.items()}
    assert rms["qmc"] < 0.3 * rms["random"], rms  # iid: about 0.06 at n = 64; stratified: at most 1/64 per bin


def test_unknown_chain_noise(prior):
    from diffmic.diffusion.sampling import chain_start_noise

    with pytest.raises(ConfigError, match="chain noise"):
        chain_start_noise(2, B, C, kind="sobol")
