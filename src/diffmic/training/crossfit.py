"""Cross-fitted (out-of-fold) DCG priors for the denoiser's training images.

Stacking without cross-fitting lets the denoiser learn the *training-set* residuals y_0 − ŷ of a
DCG that was fitted on the same images; at test time the residuals look different
(docs/method.md). With ``train.crossfit_folds = k``, the training images are split into k
stratified folds; fold DCG f is trained from scratch with the DCG pre-training recipe on the images
of the other folds only, and gives the priors of fold f's images. The denoiser then trains on
these out-of-fold priors, while the DCG that ships (and gives test-time priors) is trained on all
images as usual.

Cost: k DCGs, each for ``dcg_pretrain_epochs`` on (k − 1)/k of the images, i.e. (k − 1)× the DCG
pre-training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from diffmic.models.guidance import DCG, GuidanceOutput

log = logging.getLogger(__name__)


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index (N,) in [0, k): each class is shuffled and dealt round-robin over the folds."""
    labels = np.asarray(labels)
    folds = np.empty(len(labels), dtype=np.int64)
    rng = np.random.default_rng(seed)
    offset = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        folds[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)  # the next class continues where this one stopped: balanced fold sizes
    return folds


@dataclass
class CrossFit:
    """Out-of-fold priors of the training images.

    ``priors``: (N, 3, C) softmax of the fused, global and local logits of the fold DCG that did not
    see image i; ``folds``: (N,) fold of each image; ``trained_on``: for each fold, the sorted indices
    of the images its DCG actually drew in training (a record, not a plan).
    """

    priors: Tensor
    folds: Tensor
    trained_on: list[Tensor]

    def to_state(self) -> dict[str, object]:
        return {"priors": self.priors, "folds": self.folds, "trained_on": list(self.trained_on)}

    @classmethod
    def from_state(cls, state: dict[str, object]) -> CrossFit:
        return cls(state["priors"], state["folds"], list(state["trained_on"]))  # type: ignore[arg-type]


def guidance_priors(guide: GuidanceOutput) -> Tensor:
    """(B, 3, C): softmax of the fused, global and local logits."""
    return torch.stack([guide.logits, guide.logits_global, guide.logits_local], dim=1).softmax(dim=-1)


def crossfit_priors(
    make_dcg: Callable[[int], DCG],
    images: Tensor,
    labels: Tensor,
    *,
    folds: int,
    epochs: int,
    batch_size: int,
    eval_batch_size: int,
    inputs: Callable[[Tensor, bool], Tensor],
    loss_fn: Callable[[GuidanceOutput, Tensor], Tensor],
    make_optimizer: Callable[[DCG], torch.optim.Optimizer],
    lr_at: Callable[[float], float],
    seed: int,
) -> CrossFit:
    """Train ``folds`` DCGs and return the out-of-fold priors of every training image.

    Args:
        make_dcg: fold index -> a freshly initialised DCG (on the right device).
        images: uint8 (N, C_in, H, W); labels: (N,) long; on the DCG's device.
        inputs: (uint8 batch, train) -> normalised (and, when training, augmented) images.
        loss_fn: the DCG's cross-entropy loss; make_optimizer: the DCG optimiser;
        lr_at: DCG learning rate at a fractional epoch of pre-training.
        seed: fixes the folds and each fold's batch order.
    """
    n = len(labels)
    fold_of = torch.from_numpy(stratified_folds(labels.cpu().numpy(), folds, seed)).to(labels.device)
    priors: Tensor | None = None
    trained_on: list[Tensor] = []
    for f in range(folds):
        train_idx = torch.nonzero(fold_of != f).squeeze(1)
        held_out = torch.nonzero(fold_of == f).squeeze(1)
        dcg = make_dcg(f)
        opt = make_optimizer(dcg)
        gen = torch.Generator().manual_seed(seed * 1000 + f)
        per_epoch = max(1, len(train_idx) // batch_size) if len(train_idx) > batch_size else 1
        seen = torch.zeros(n, dtype=torch.bool, device=labels.device)
        dcg.train()
        for epoch in range(epochs):
            order = train_idx[torch.randperm(len(train_idx), generator=gen).to(train_idx.device)]
            for b in range(per_epoch):
                idx = order[b * batch_size:(b + 1) * batch_size]
                seen[idx] = True
                for group in opt.param_groups:
                    group["lr"] = lr_at(epoch + b / per_epoch)
                loss = loss_fn(dcg(inputs(images[idx], True)), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        dcg.eval()
        with torch.no_grad():
            out = torch.cat([guidance_priors(dcg(inputs(images[c], False)))
                             for c in held_out.split(eval_batch_size)])
        if priors is None:
            priors = torch.zeros(n, 3, out.shape[-1], device=out.device)
        priors[held_out] = out
        trained_on.append(torch.nonzero(seen).squeeze(1).cpu())
        acc = (out[:, 0].argmax(1) == labels[held_out]).float().mean().item()
        log.info("cross-fit fold %d/%d: trained on %d images, out-of-fold accuracy %.3f",
                 f + 1, folds, int(seen.sum()), acc)
    assert priors is not None
    return CrossFit(priors.cpu(), fold_of.cpu(), trained_on)


__all__ = ["CrossFit", "crossfit_priors", "guidance_priors", "stratified_folds"]
