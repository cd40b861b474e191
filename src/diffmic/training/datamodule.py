"""A LightningDataModule over an in-memory :class:`DataBundle`."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from diffmic.data.base import ArrayDataset, DataBundle


class IndexedDataset(ArrayDataset):
    """Yields (image, label, index): lets distributed evaluation drop the sampler's padding repeats."""

    def __getitem__(self, i: int):  # type: ignore[override]
        image, label = super().__getitem__(i)
        return image, label, i


class ArrayDataModule(L.LightningDataModule):
    """Shuffled training loader (last partial batch dropped when possible); ordered eval loaders."""

    def __init__(self, data: DataBundle, *, batch_size: int, eval_batch_size: int, num_workers: int = 0) -> None:
        super().__init__()
        self.data = data
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers

    def train_dataloader(self) -> DataLoader:
        ds = IndexedDataset(self.data.train)  # the index selects cross-fitted priors
        return DataLoader(ds, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                          drop_last=len(ds) > self.batch_size, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(IndexedDataset(self.data.val), batch_size=self.eval_batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(ArrayDataset(self.data.test), batch_size=self.eval_batch_size, num_workers=self.num_workers)
