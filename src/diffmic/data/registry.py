"""Select a reader by ``data.format``: a literal dict, no decorator registry."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from diffmic.config import DataConfig
from diffmic.data.aptos import read_aptos2019
from diffmic.data.base import DataBundle
from diffmic.data.csv_manifest import read_csv_manifest
from diffmic.data.folder import read_folder
from diffmic.data.isic import read_isic2018
from diffmic.data.medmnist import read_medmnist
from diffmic.data.medmnist_info import resolve_medmnist
from diffmic.data.pickle_split import read_pickle_split
from diffmic.errors import ConfigError


def _medmnist(cfg: DataConfig, run_dir: Path | None) -> DataBundle:
    # data.path may be a MedMNIST flag ("breastmnist", "retinamnist_64"): its file and class names
    path, info = resolve_medmnist(cfg.path)
    names = cfg.class_names
    if names is None and info is not None:
        names = list(info.class_names)
    bundle = read_medmnist(
        path, image_size=cfg.image_size, channels=cfg.channels, class_names=names
    )
    if info is not None:
        bundle.extra["medmnist"] = {"flag": info.flag, "size": info.size, "task": info.task}
    return bundle


READERS: dict[str, Callable[[DataConfig, Path | None], DataBundle]] = {
    "medmnist": _medmnist,
    "folder": read_folder,
    "csv": read_csv_manifest,
    "isic2018": read_isic2018,
    "aptos2019": read_aptos2019,
    "pickle": read_pickle_split,
}


def build_data(cfg: DataConfig, run_dir: str | Path | None = None) -> DataBundle:
    """Read the dataset described by ``cfg``; splits made here are written into ``run_dir``."""
    if not cfg.path:
        raise ConfigError("data.path is empty: give the dataset file or folder (data.path=...)")
    try:
        reader = READERS[cfg.format]
    except KeyError:
        raise ConfigError(f"unknown data.format {cfg.format!r}; choose from {sorted(READERS)}") from None
    return reader(cfg, Path(run_dir) if run_dir is not None else None)
