"""``eval_mode``: eval mode for a block, the module's previous train/eval mode restored afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module.eval()`` for the block; each submodule's own mode is restored on exit, even on error.

    Restoring per submodule (not ``module.train(was_training)``) keeps a mixed state, e.g. a frozen
    part held in eval mode inside a training module, as it was.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training
