"""Dataset readers (one per on-disk layout), all returning a :class:`DataBundle`."""

from __future__ import annotations

from diffmic.data.base import ArrayDataset, DataBundle, ImageArray
from diffmic.data.registry import build_data

__all__ = ["ArrayDataset", "DataBundle", "ImageArray", "build_data"]
