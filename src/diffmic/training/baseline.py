"""A plain backbone classifier trained like DiffMIC (same augmentation, optimiser, schedule and
validation-based selection): the baseline of ``benchmarks/accuracy.py``."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffmic.config import DiffMICConfig
from diffmic.data.base import DataBundle, ImageArray
from diffmic.evaluation.metrics import classification_metrics
from diffmic.models.backbones import create_backbone, small_input_default
from diffmic.models.modes import eval_mode
from diffmic.training.augment import augment_batch
from diffmic.training.module import warmup_cosine
from diffmic.training.optim import adam


class ClassifierModule(L.LightningModule):
    """``cfg.model.backbone`` (pooled) + a linear head, cross-entropy, Adam at ``cfg.train.lr``.

    The learning rate follows DiffMIC's warm-up + cosine rule over ``epochs`` (warm-up
    ``min(cfg.train.warmup_epochs, epochs)``); ``val/select`` is ``cfg.train.select_metric``.

    Args:
        config: the resolved config as a plain dict.
        model_args: ``num_classes``, ``in_chans``, ``image_size``.
        epochs: length of the schedule (None: ``dcg_pretrain_epochs + epochs`` of the config).
    """

    def __init__(self, config: dict[str, Any], model_args: dict[str, Any], epochs: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg = cfg = DiffMICConfig.from_dict(config)
        m, n = cfg.model, model_args
        small = m.small_input if m.small_input is not None else small_input_default(n["image_size"])
        self.backbone, dim = create_backbone(
            m.backbone, in_chans=n["in_chans"], pretrained=m.pretrained, small_input=small, pooled=True
        )
        self.head = nn.Linear(dim, n["num_classes"])
        self.num_classes = int(n["num_classes"])
        self.epochs = epochs if epochs is not None else cfg.train.dcg_pretrain_epochs + cfg.train.epochs
        c = n["in_chans"]
        mean = torch.tensor(cfg.data.mean, dtype=torch.float32).expand(c).reshape(1, c, 1, 1)
        std = torch.tensor(cfg.data.std, dtype=torch.float32).expand(c).reshape(1, c, 1, 1)
        self.register_buffer("mean", mean.clone(), persistent=False)
        self.register_buffer("std", std.clone(), persistent=False)
        self._val: list[tuple[Tensor, Tensor]] = []

    def forward(self, x: Tensor) -> Tensor:
        """Normalised images (B, C, H, W) -> logits (B, num_classes)."""
        return self.head(self.backbone(x))

    def inputs(self, images: Tensor, train: bool) -> Tensor:
        """uint8 (B, C, H, W) -> x/255, batch augmentation when training, then (x - mean) / std."""
        x = images.float() / 255.0
        if train:
            d = self.cfg.data
            x = augment_batch(x, hflip=d.hflip, vflip=d.vflip, rotation=d.rotation)
        return (x - self.mean) / self.std

    def configure_optimizers(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        return adam(self.parameters(), lr=t.lr, weight_decay=t.weight_decay)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, y = batch[0], batch[1]
        t = self.cfg.train
        epoch = self.current_epoch + batch_idx / max(1, int(self.trainer.num_training_batches))
        lr = warmup_cosine(epoch, lr=t.lr, min_lr=t.min_lr, warmup=min(t.warmup_epochs, self.epochs),
                           total=self.epochs)
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = lr
        logits = self(self.inputs(images, train=True))
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        self.log_dict({"train/loss": loss.detach(), "train/acc": acc, "train/lr": lr},
                      on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, y = batch[0], batch[1]  # eval batches also carry the image index
        self._val.append((self(self.inputs(images, train=False)).softmax(1), y))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        probs = torch.cat([p for p, _ in self._val])
        y = torch.cat([t for _, t in self._val])
        metrics = classification_metrics(probs, y, self.num_classes)
        select = metrics[self.cfg.train.select_metric]
        logs = {f"val/{k}": v for k, v in metrics.items()}
        logs["val/select"] = -1.0 if math.isnan(select) else select
        self.log_dict(logs, prog_bar=False)

    @torch.no_grad()
    def predict_probs(self, data: ImageArray, batch_size: int = 256) -> Tensor:
        """Softmax probabilities (N, C) over a split, in eval mode."""
        images = torch.from_numpy(data.images).permute(0, 3, 1, 2)
        with eval_mode(self):
            out = [self(self.inputs(chunk.to(self.device), train=False)).softmax(1).cpu()
                   for chunk in images.split(batch_size)]
        return torch.cat(out)


def train_classifier(cfg: DiffMICConfig, *, epochs: int, run_dir: str | Path, data: DataBundle) -> dict[str, Any]:
    """Fit a :class:`ClassifierModule` for ``epochs``, reload the best validation checkpoint and
    return ``{"val": metrics, "test": metrics, "fit_seconds": s, "selected_epoch": e}``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from diffmic.training.datamodule import ArrayDataModule

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    model_args = {"num_classes": data.num_classes, "in_chans": data.channels, "image_size": data.image_size}
    module = ClassifierModule(cfg.to_dict(), model_args, epochs=epochs)
    dm = ArrayDataModule(data, batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size,
                         num_workers=cfg.data.num_workers)
    ckpt = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/select", mode="max",
                           save_top_k=1, enable_version_counter=False)
    t = cfg.train
    trainer = L.Trainer(
        max_epochs=epochs, accelerator=t.accelerator, devices=t.devices, strategy=t.strategy,
        precision=t.precision,  # type: ignore[arg-type]
        callbacks=[ckpt], logger=False, default_root_dir=run_dir, num_sanity_val_steps=0,
        enable_progress_bar=t.progress, enable_model_summary=False,
        gradient_clip_val=t.grad_clip if t.grad_clip > 0 else None,
    )
    start = time.time()
    trainer.fit(module, datamodule=dm)
    fit_seconds = time.time() - start
    payload: dict[str, Any] = {}
    if ckpt.best_model_path:  # else (no validation ran): keep the last weights
        payload = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(payload["state_dict"])
    module = module.cpu()
    out: dict[str, Any] = {}
    for split in ("val", "test"):
        arr = data.split(split)
        probs = module.predict_probs(arr, cfg.data.eval_batch_size)
        out[split] = classification_metrics(probs, torch.from_numpy(arr.labels).long(), data.num_classes)
    out["fit_seconds"] = round(fit_seconds, 1)
    out["selected_epoch"] = int(payload.get("epoch", -1))
    return out
