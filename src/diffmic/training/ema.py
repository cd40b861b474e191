"""Exponential moving average of a module's parameters (buffers are copied from the live module)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """Holds an EMA copy of ``module``; its state is part of the owner's ``state_dict``.

    The effective decay warms up as min(decay, (1 + n) / (10 + n)) so short runs are not
    dominated by the random initialisation.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.shadow = copy.deepcopy(module)
        self.shadow.requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        n = int(self.num_updates)
        d = min(self.decay, (1 + n) / (10 + n))
        for s, p in zip(self.shadow.parameters(), module.parameters(), strict=True):
            s.lerp_(p.detach(), 1 - d)
        for s, b in zip(self.shadow.buffers(), module.buffers(), strict=True):
            s.copy_(b)
        self.num_updates += 1
