"""Readouts: the deterministic mean path, the majority vote and the mean softmax."""

from __future__ import annotations

import pytest
import torch
from test_sampling import make_oracle as oracle  # the same point oracle as the sampler tests

from diffmic.diffusion.readout import mean_softmax_probs, path_probs, readout_probs, vote_probs
from diffmic.diffusion.sampling import sample_ddim, sample_mean_path
from diffmic.diffusion.schedule import CardSchedule
from diffmic.models.denoiser import LabelDenoiser, mmse_skip_init

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setting():
    g = torch.Generator().manual_seed(0)
    s = CardSchedule(1000)
    prior = torch.randn(64, 5, generator=g).softmax(1)
    y0 = torch.nn.functional.one_hot(torch.randint(0, 5, (64,), generator=g), 5).float()
    return s, prior, y0


def test_mean_path_of_untrained_skip_denoiser_is_the_prior_exactly(setting):
    s, prior, _ = setting
    torch.manual_seed(0)
    den = LabelDenoiser(5, feature_dim=32, num_timesteps=1000, encoder=None, encoder_dim=8,
                        skip_init=mmse_skip_init(s.alphas_cumprod, 5)).eval()
    feats = den.encode(torch.randn(64, 8))
    with torch.no_grad():
        path = sample_mean_path(s, lambda y_t, t: den.denoise(feats, y_t, prior, t), prior, 10)
        noisy = sample_ddim(s, lambda y_t, t: den.denoise(feats, y_t, prior, t), prior, 10,
                            generator=torch.Generator().manual_seed(1))
    assert torch.equal(path, prior)  # r = 0 is the fixed point: exactly, not approximately
    assert (noisy - prior).abs().max() > 0.1  # a stochastic chain is not (the readout noise)


@pytest.mark.parametrize("steps", [1, 10, 50])
def test_mean_path_with_oracle_eps_returns_y0(setting, steps):
    s, prior, y0 = setting
    out = sample_mean_path(s, oracle(s, y0, prior), prior, steps)
    torch.testing.assert_close(out, y0, atol=1e-4, rtol=0)


def test_mean_path_draws_no_random_numbers(setting):
    s, prior, y0 = setting
    state = torch.get_rng_state()
    a = sample_mean_path(s, oracle(s, y0, prior), prior, 10)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, sample_mean_path(s, oracle(s, y0, prior), prior, 10))


def test_vote_is_the_majority_of_the_chains():
    g = torch.Generator().manual_seed(0)
    chains = torch.randn(7, 200, 4, generator=g)
    p = vote_probs(chains, 0.5)
    counts = torch.nn.functional.one_hot(chains.argmax(-1), 4).sum(0)  # (B, C)
    top = counts.max(dim=1, keepdim=True).values
    tied = (counts == top).sum(1) > 1
    assert tied.any() and (~tied).any()  # the draw has both cases
    assert torch.equal(p.argmax(1)[~tied], counts.argmax(1)[~tied])
    torch.testing.assert_close(p.sum(1), torch.ones(200))
    # ties go to the tied class with the larger mean y0, deterministically
    mean = chains.mean(0).masked_fill(counts != top, -float("inf"))
    assert torch.equal(p.argmax(1)[tied], mean.argmax(1)[tied])
    assert torch.equal(p, vote_probs(chains, 0.5))


def test_vote_exact_tie_goes_to_the_lowest_index():
    chains = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]])  # one vote each, equal means
    assert vote_probs(chains, 1.0).argmax(1).item() == 0


def test_vote_orders_equal_votes_by_mean_y0_for_auroc():
    a = torch.tensor([[[0.9, 0.1]], [[0.8, 0.2]]])
    b = torch.tensor([[[0.6, 0.4]], [[0.55, 0.45]]])
    pa, pb = vote_probs(a, 1.0), vote_probs(b, 1.0)
    assert pa.argmax() == pb.argmax() == 0
    assert pa[0, 0] > pb[0, 0]  # same votes, larger margin in y0: a higher score


def test_mean_softmax_and_path_probs():
    y = torch.tensor([[[0.2, 0.0]], [[0.0, 0.2]]])
    torch.testing.assert_close(mean_softmax_probs(y, 0.1), torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(path_probs(y[0], 0.1), torch.tensor([[2.0, 0.0]]).softmax(1))


def test_readout_probs_dispatch_and_errors():
    chains, path = torch.randn(3, 2, 4), torch.randn(2, 4)
    assert torch.equal(readout_probs("mean_path", temperature=1.0, path=path), path.softmax(1))
    assert torch.equal(readout_probs("vote", temperature=1.0, chains=chains), vote_probs(chains, 1.0))
    with pytest.raises(ValueError, match="mean_path"):
        readout_probs("mean_path", temperature=1.0, chains=chains)
    with pytest.raises(ValueError, match="chains"):
        readout_probs("vote", temperature=1.0, path=path)
    with pytest.raises(ValueError, match="unknown readout"):
        readout_probs("median", temperature=1.0, chains=chains)
