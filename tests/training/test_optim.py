"""diffmic.training.optim.adam: fused where possible, the same update rule as torch's default Adam."""

from __future__ import annotations

import copy

import pytest
import torch

from diffmic.training.optim import adam


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _steps(net: torch.nn.Module, opt: torch.optim.Optimizer, n: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()


@pytest.mark.parametrize("amsgrad", [False, True])
def test_fused_adam_follows_the_default_update(amsgrad):
    a, b = _net(), _net()
    fa = adam(a.parameters(), lr=1e-2, weight_decay=1e-4, amsgrad=amsgrad)
    ref = torch.optim.Adam(b.parameters(), lr=1e-2, weight_decay=1e-4, amsgrad=amsgrad)
    assert fa.defaults["fused"] is True and not ref.defaults.get("fused")
    _steps(a, fa, 6), _steps(b, ref, 6)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.equal(a[0].weight, _net()[0].weight)  # it did train


def test_state_of_an_unfused_optimiser_resumes_in_a_fused_one():
    """Checkpoints written before the optimiser was fused resume with the same trajectory."""
    a, b = _net(), _net()
    old = torch.optim.Adam(a.parameters(), lr=1e-2)
    _steps(a, old, 3)
    b.load_state_dict(a.state_dict())
    resumed = adam(b.parameters(), lr=1e-2)
    resumed.load_state_dict(copy.deepcopy(old.state_dict()))  # as read back from a checkpoint file
    _steps(a, old, 3, seed=2), _steps(b, resumed, 3, seed=2)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_not_fused_for_mixed_or_integer_parameters():
    p = torch.nn.Parameter(torch.zeros(3))
    q = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    assert adam([p, q]).defaults["fused"] is True  # dtypes may differ, one device type
    assert adam([p], lr=1e-3).defaults["lr"] == 1e-3
