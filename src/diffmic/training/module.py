"""``DiffMICModule``: DCG pre-training, then joint diffusion + DCG training (manual optimisation)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffmic.config import DiffMICConfig
from diffmic.diffusion.losses import antithetic_timesteps, diffmic_loss
from diffmic.diffusion.readout import readout_probs
from diffmic.evaluation.metrics import classification_metrics
from diffmic.models.factory import build_model
from diffmic.models.guidance import GuidanceOutput
from diffmic.training.augment import augment_batch, draw_prior_temperatures, drop_image_features, temper_priors
from diffmic.training.checkpointing import rng_state, set_rng_state
from diffmic.training.crossfit import CrossFit, crossfit_priors
from diffmic.training.ema import EMA
from diffmic.training.optim import adam


def first_occurrences(index: Tensor) -> Tensor:
    """Positions of the first occurrence of each distinct value of ``index``, in sorted value order."""
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    first = torch.ones_like(sorted_index, dtype=torch.bool)
    first[1:] = sorted_index[1:] != sorted_index[:-1]
    return order[first]


def warmup_cosine(epoch: float, *, lr: float, min_lr: float, warmup: float, total: float) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` epochs, then half-cosine to ``min_lr`` at ``total``."""
    if epoch < warmup:
        return lr * epoch / warmup
    span = max(total - warmup, 1e-8)
    progress = min(1.0, (epoch - warmup) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class DiffMICModule(L.LightningModule):
    """Training system around :class:`~diffmic.models.DiffMIC`.

    Epochs ``[0, dcg_pretrain_epochs)`` train the DCG alone with cross-entropy (learning rate
    ``dcg_lr``, constant or warm-up + cosine per iteration); later epochs run the three-stream
    diffusion step (features computed once, priors under ``no_grad``) followed, when
    ``joint_train``, by one DCG cross-entropy step on the same batch (at ``dcg_joint_lr``). With
    ``crossfit_folds = k``, the priors of the diffusion step are the out-of-fold priors of k fold
    DCGs (:mod:`diffmic.training.crossfit`), computed once at the start of the joint phase.

    Args:
        config: the resolved config as a plain dict (stored in checkpoints).
        model_args: ``num_classes``, ``in_chans``, ``image_size``, ``class_names``.
    """

    def __init__(self, config: dict[str, Any], model_args: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg = DiffMICConfig.from_dict(config)
        self.model = build_model(self.cfg, **model_args)
        self.ema = EMA(self.model.denoiser, self.cfg.train.ema_decay)
        # train.denoiser_ce_weight: a training-only linear head on the denoiser's image embedding (not in the
        # model). Initialised on its own generator, so the run's RNG stream, hence the DCG's pre-training and
        # every later draw, is the same as without it.
        self.denoiser_head: nn.Linear | None = None
        if self.cfg.train.denoiser_ce_weight > 0:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.train.seed * 1000 + 29)
                self.denoiser_head = nn.Linear(self.cfg.model.feature_dim, self.model.num_classes)
        self.automatic_optimization = False
        self.crossfit: CrossFit | None = None
        self._val_outputs: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []

    # ------------------------------------------------------------------ phases
    @property
    def pretraining(self) -> bool:
        return self.current_epoch < self.cfg.train.dcg_pretrain_epochs

    def _lr_now(self, batch_idx: int) -> float:
        t = self.cfg.train
        batches = max(1, int(self.trainer.num_training_batches))
        epoch = self.current_epoch - t.dcg_pretrain_epochs + batch_idx / batches
        return warmup_cosine(epoch, lr=t.lr, min_lr=t.min_lr, warmup=t.warmup_epochs, total=t.epochs)

    def dcg_lr_at(self, epoch: float) -> float:
        """DCG learning rate at a fractional epoch of pre-training (``train.dcg_schedule``)."""
        t = self.cfg.train
        if t.dcg_schedule == "constant":
            return t.dcg_lr
        return warmup_cosine(epoch, lr=t.dcg_lr, min_lr=0.0, warmup=min(t.dcg_warmup_epochs, t.dcg_pretrain_epochs),
                             total=t.dcg_pretrain_epochs)

    def _dcg_lr_now(self, batch_idx: int) -> float:
        t = self.cfg.train
        if not self.pretraining:
            return t.dcg_lr if t.dcg_joint_lr is None else t.dcg_joint_lr
        batches = max(1, int(self.trainer.num_training_batches))
        return self.dcg_lr_at(self.current_epoch + batch_idx / batches)

    def _dcg_optimizer(self, params: Any) -> torch.optim.Optimizer:
        t = self.cfg.train
        return adam(params, lr=t.dcg_lr, weight_decay=t.dcg_weight_decay, amsgrad=True)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        t = self.cfg.train
        params = list(self.model.denoiser.parameters())
        if self.denoiser_head is not None:
            params += list(self.denoiser_head.parameters())
        denoiser = adam(params, lr=t.lr, weight_decay=t.weight_decay)
        return [denoiser, self._dcg_optimizer(self.model.guidance.parameters())]

    # ------------------------------------------------------------- checkpoints
    def on_train_end(self) -> None:
        self._broadcast_buffers()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the generator states, so a resumed run draws what the uninterrupted one would."""
        checkpoint["diffmic_rng"] = rng_state()
        if self.crossfit is not None:
            checkpoint["diffmic_crossfit"] = self.crossfit.to_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "diffmic_rng" in checkpoint:
            set_rng_state(checkpoint["diffmic_rng"])
        if "diffmic_crossfit" in checkpoint:
            self.crossfit = CrossFit.from_state(checkpoint["diffmic_crossfit"])

    # ------------------------------------------------------------ cross-fitting
    def on_train_epoch_start(self) -> None:
        t = self.cfg.train
        if t.denoiser_encoder_init == "dcg" and self.current_epoch == t.dcg_pretrain_epochs:
            # The first joint epoch (a run resumed later starts after it and keeps its trained encoder;
            # one resumed into this epoch starts from the checkpoint before the copy and copies again).
            self.copy_dcg_into_denoiser_encoder()
        if t.crossfit_folds >= 2 and not self.pretraining and self.crossfit is None:
            self.crossfit = self._fit_crossfit()

    @torch.no_grad()
    def copy_dcg_into_denoiser_encoder(self) -> None:
        """``train.denoiser_encoder_init=dcg``: the denoiser's encoder (and its EMA copy) take the DCG's
        global backbone weights, BatchNorm statistics included."""
        weights = self.model.guidance.global_net.model.state_dict()
        for encoder in (self.model.denoiser.encoder, self.ema.shadow.encoder):
            encoder.load_state_dict(weights)

    def _fit_crossfit(self) -> CrossFit:
        """Train the fold DCGs on the training split (the RNG streams of the run are not touched)."""
        t, m = self.cfg.train, self.model
        train = self.trainer.datamodule.data.train
        images = torch.from_numpy(train.images).permute(0, 3, 1, 2).to(self.device)
        labels = torch.from_numpy(train.labels).long().to(self.device)

        def make_dcg(fold: int) -> Any:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(t.seed * 1000 + 17 + fold)
                args = self.hparams["model_args"]
                return build_model(self.cfg, **args).guidance.to(self.device)

        with torch.random.fork_rng(devices=[]):  # augmentation draws stay off the run's stream
            torch.manual_seed(t.seed * 1000 + 3)
            with torch.enable_grad():
                fit = crossfit_priors(
                    make_dcg, images, labels, folds=t.crossfit_folds, epochs=t.dcg_pretrain_epochs,
                    batch_size=self.cfg.data.batch_size, eval_batch_size=self.cfg.data.eval_batch_size,
                    inputs=self._inputs, loss_fn=self._aux_loss,
                    make_optimizer=lambda dcg: self._dcg_optimizer(dcg.parameters()),
                    lr_at=self.dcg_lr_at, seed=t.seed,
                )
        m.guidance.train()
        return fit

    # ---------------------------------------------------------------- training
    def _inputs(self, images: Tensor, train: bool) -> Tensor:
        x = images.float() / 255.0
        if train:
            d = self.cfg.data
            x = augment_batch(x, hflip=d.hflip, vflip=d.vflip, rotation=d.rotation)
        return self.model.normalize(x)

    def _aux_loss(self, guide: GuidanceOutput, y: Tensor) -> Tensor:
        loss = F.cross_entropy(guide.logits, y)
        if self.cfg.train.aux_loss == "all":
            loss = loss + F.cross_entropy(guide.logits_global, y) + F.cross_entropy(guide.logits_local, y)
        return loss

    def _dcg_step(self, x: Tensor, y: Tensor, batch_idx: int) -> Tensor:
        _, opt = self.optimizers()
        for group in opt.param_groups:
            group["lr"] = self._dcg_lr_now(batch_idx)
        self.model.guidance.train()
        guide = self.model.guidance(x)
        loss = self._aux_loss(guide, y)
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()
        acc = (guide.logits.argmax(1) == y).float().mean()
        self.log_dict({"train/dcg_loss": loss.detach(), "train/dcg_acc": acc}, on_step=False, on_epoch=True,
                      batch_size=len(y))
        return loss.detach()

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        images, y = batch[0], batch[1]  # training batches also carry the image index
        x = self._inputs(images, train=True)
        if self.pretraining:
            self._dcg_step(x, y, batch_idx)
            return
        model, t_cfg = self.model, self.cfg.train
        opt, _ = self.optimizers()
        lr = self._lr_now(batch_idx)
        for group in opt.param_groups:
            group["lr"] = lr
        # Priors: DCG in eval mode and without autograd (the original kept autograd on; wasted work).
        model.guidance.eval()
        with torch.no_grad():
            guide = model.guidance(x)
        model.guidance.train()
        if self.crossfit is not None:  # out-of-fold priors of these (un-augmented) images
            oof = self.crossfit.priors.to(x.device)[batch[2]]
            priors = [oof[:, 0], oof[:, 1], oof[:, 2]]
        else:
            priors = [guide.logits.softmax(1), guide.logits_global.softmax(1), guide.logits_local.softmax(1)]
        priors = [model.diffusion_prior(p) for p in priors]  # model.prior_temperature, as at inference
        feats = model.encode(x, guide)  # once for all three streams and all noise draws
        # Supervised signal for the denoiser's own encoder (train.denoiser_ce_weight), on the un-repeated batch.
        head_ce = F.cross_entropy(self.denoiser_head(feats), y) if self.denoiser_head is not None else None
        k = t_cfg.noise_draws
        if k > 1:  # K independent (t, ε) per image, as a K·B batch for the cheap MLP
            feats, y = feats.repeat(k, 1), y.repeat(k)
            priors = [p.repeat(k, 1) for p in priors]
        if t_cfg.prior_temper_max > 1.0:  # harder targets: one tau per row, shared by the three streams
            tau = draw_prior_temperatures(len(y), t_cfg.prior_temper_max, device=y.device)
            priors = [temper_priors(p, tau) for p in priors]
        if t_cfg.image_dropout > 0.0:  # an image-free path: rows whose features are the gate's neutral ones
            feats = drop_image_features(feats, t_cfg.image_dropout)
        y0 = F.one_hot(y, model.num_classes).float()
        t = antithetic_timesteps(len(y), model.schedule.num_timesteps, device=y.device)
        eps = torch.randn_like(y0)  # shared by the three streams
        if model.guidance.local_branch:
            eps_hats = [model.denoiser.denoise(feats, model.schedule.q_sample(y0, p, t, eps), p, t) for p in priors]
        else:  # the three priors are the same global one: one stream, MSE + 2·w·MMD on it
            eps_hats = [model.denoiser.denoise(feats, model.schedule.q_sample(y0, priors[0], t, eps), priors[0], t)] * 3
        losses = diffmic_loss(eps, *eps_hats, mmd_weight=t_cfg.mmd_weight)
        if head_ce is not None:
            losses = losses | {"denoiser_ce": head_ce, "loss": losses["loss"] + t_cfg.denoiser_ce_weight * head_ce}
        opt.zero_grad(set_to_none=True)
        self.manual_backward(losses["loss"])
        if t_cfg.grad_clip > 0:
            self.clip_gradients(opt, gradient_clip_val=t_cfg.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        self.ema.update(model.denoiser)
        self.log_dict(
            {f"train/{k}": v.detach() for k, v in losses.items()} | {"train/lr": lr},
            on_step=False, on_epoch=True, batch_size=len(y), prog_bar=False,
        )
        self.log("loss", losses["loss"].detach(), prog_bar=True, on_step=True, on_epoch=False, logger=False)
        if t_cfg.joint_train:
            self._dcg_step(x, batch[1], batch_idx)

    # -------------------------------------------------------------- validation
    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Temporarily swap the EMA denoiser into the model (when ``train.ema_eval``)."""
        if not self.cfg.train.ema_eval:
            yield
            return
        live = self.model.denoiser
        self.model.denoiser = self.ema.shadow
        try:
            yield
        finally:
            self.model.denoiser = live

    def _should_validate(self) -> bool:
        t = self.cfg.train
        epoch = self.current_epoch + 1
        last = epoch >= self.trainer.max_epochs
        end_of_pretrain = epoch == t.dcg_pretrain_epochs
        return last or end_of_pretrain or epoch % t.val_every == 0

    def _broadcast_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics, EMA counters).

        Each DDP rank updates its running statistics on its own batches; validation and the saved
        checkpoint (written by rank 0) must see the same model on every rank.
        """
        if self.trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            for buf in self.buffers():
                torch.distributed.broadcast(buf, src=0)

    def on_validation_epoch_start(self) -> None:
        self._broadcast_buffers()
        self._val_outputs = []
        self._val_gen = torch.Generator(device=self.device).manual_seed(self.cfg.eval.seed)
        self._val_active = self._should_validate() and not self.trainer.sanity_checking

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        if not self._val_active:
            return
        images, y = batch[0], batch[1]
        index = batch[2] if len(batch) > 2 else torch.arange(len(y), device=y.device) + batch_idx * len(y)
        x = self._inputs(images, train=False)
        guide = self.model.guidance(x)
        prior = guide.logits.softmax(1)
        if self.pretraining:
            probs = prior
        else:
            readout = self.model.readout  # select on the readout that ships
            with self.ema_weights():
                feats = self.model.encode(x, guide)
                chains, path = self.model.run_chains(
                    feats, self.model.diffusion_prior(prior), samples=self.cfg.eval.samples,
                    path=readout == "mean_path", chains=readout != "mean_path", generator=self._val_gen,
                )
            probs = readout_probs(readout, temperature=self.model.temperature, chains=chains, path=path)
        self._val_outputs.append((probs, prior, y, index))

    def on_validation_epoch_end(self) -> None:
        if not self._val_active or not self._val_outputs:
            # Nothing measured: a value that never counts as an improvement.
            self.log("val/select", -math.inf, sync_dist=False)
            return
        probs = torch.cat([o[0] for o in self._val_outputs])
        prior = torch.cat([o[1] for o in self._val_outputs])
        y = torch.cat([o[2] for o in self._val_outputs])
        index = torch.cat([o[3] for o in self._val_outputs])
        if self.trainer.world_size > 1:
            probs, prior, y, index = (self.all_gather(v).flatten(0, 1) for v in (probs, prior, y, index))
            # The distributed sampler pads the split to a multiple of the world size by repeating
            # images: keep each image once, so metrics are over the whole split exactly once.
            keep = first_occurrences(index)
            probs, prior, y = probs[keep], prior[keep], y[keep]
        c = self.model.num_classes
        dcg = classification_metrics(prior, y, c)
        key = self.cfg.train.select_metric
        logs = {f"val/dcg_{k}": v for k, v in dcg.items()} | {"val/num_images": float(len(y))}
        if self.pretraining:
            # Only a DCG-only run (no diffusion epochs) is selected on the DCG; otherwise any
            # diffusion validation later beats this.
            select = dcg[key] if self.cfg.train.epochs == 0 else -1.0
        else:
            diff = classification_metrics(probs, y, c)
            logs |= {f"val/{k}": v for k, v in diff.items()}
            select = diff[key]
        logs["val/select"] = select if not math.isnan(select) else -1.0
        self.log_dict(logs, sync_dist=False, prog_bar=False)
        self.log("val_sel", logs["val/select"], prog_bar=True, logger=False)
