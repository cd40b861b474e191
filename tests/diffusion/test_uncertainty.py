"""Per-image uncertainty functions against hand-computed values and numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffmic.diffusion.uncertainty import class_intervals, predictive_entropy, vote_fractions


def test_vote_fractions_hand_computed():
    # S=4 samples, B=2 images, C=3 classes
    y0 = torch.tensor([
        [[0.9, 0.1, 0.0], [0.0, 0.2, 0.8]],
        [[0.8, 0.3, 0.1], [0.1, 0.7, 0.2]],
        [[0.1, 0.6, 0.3], [0.0, 0.1, 0.9]],
        [[0.7, 0.2, 0.1], [0.3, 0.3, 0.4]],
    ])
    votes = vote_fractions(y0)
    expected = torch.tensor([[0.75, 0.25, 0.0], [0.0, 0.25, 0.75]])
    torch.testing.assert_close(votes, expected)
    torch.testing.assert_close(votes.sum(1), torch.ones(2))


def test_vote_fractions_single_sample_is_one_hot():
    y0 = torch.tensor([[[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]]])
    torch.testing.assert_close(vote_fractions(y0), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))


def test_predictive_entropy_hand_computed():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]], dtype=torch.float64)
    ent = predictive_entropy(probs)
    expected = torch.tensor([math.log(2), 0.0, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))],
                            dtype=torch.float64)
    torch.testing.assert_close(ent, expected)
    uniform = torch.full((1, 5), 0.2)
    torch.testing.assert_close(predictive_entropy(uniform), torch.tensor([math.log(5)]))


def test_class_intervals_match_numpy_percentiles():
    rng = np.random.default_rng(0)
    y0 = rng.normal(size=(50, 3, 4)).astype(np.float32)
    low, high = class_intervals(torch.from_numpy(y0))
    assert low.shape == high.shape == (3, 4)
    np.testing.assert_allclose(low.numpy(), np.percentile(y0, 2.5, axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(high.numpy(), np.percentile(y0, 97.5, axis=0), rtol=1e-5, atol=1e-6)
    assert (low <= high).all()
    low90, high90 = class_intervals(torch.from_numpy(y0), level=0.9)
    np.testing.assert_allclose(low90.numpy(), np.percentile(y0, 5, axis=0), rtol=1e-5, atol=1e-6)
    assert (low90 >= low).all() and (high90 <= high).all()


def test_class_intervals_hand_computed():
    # 5 samples 0..4 for one class: 2.5th percentile = 0 + 0.025*4 = 0.1, 97.5th = 3.9
    y0 = torch.arange(5, dtype=torch.float32).view(5, 1, 1)
    low, high = class_intervals(y0)
    torch.testing.assert_close(low, torch.tensor([[0.1]]))
    torch.testing.assert_close(high, torch.tensor([[3.9]]))
    one = torch.tensor([[[1.5, -2.0]]])
    lo1, hi1 = class_intervals(one)
    torch.testing.assert_close(lo1, one[0])
    torch.testing.assert_close(hi1, one[0])


def test_bad_shapes_and_level():
    with pytest.raises(ValueError):
        vote_fractions(torch.zeros(3, 2))
    with pytest.raises(ValueError):
        predictive_entropy(torch.zeros(3))
    with pytest.raises(ValueError):
        class_intervals(torch.zeros(2, 2, 2), level=1.0)
