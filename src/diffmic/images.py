"""The one image-preprocessing path, shared by every dataset reader and by the model's inference.

An :class:`ImageSpec` (side, channels, centre crop, mean/std) describes it; checkpoints store it.
Every image, whether a file a reader decodes or an image given to ``predict``, goes through:

1. decode (:func:`decode_image`) and :func:`pil_to_uint8`: EXIF orientation applied, palette/RGBA/LA
   converted, alpha dropped, 16-bit grey divided by 257 (65535 -> 255): uint8 (H, W, 1 | 3);
2. :func:`prepare`: centre-square crop (``spec.center_crop``), channel conversion (grey -> RGB by
   repetition, RGB -> grey by ITU-R 601 luma, rounded), PIL bilinear resize to ``spec.size``;
3. :func:`to_model_input`: uint8 / 255 (float inputs must already be in [0, 1]), then
   ``(x - mean) / std`` per channel.

The readers store the uint8 result of steps 1-2; training applies step 3 to each batch. So for a
file, ``predict`` and training see the same numbers. ``uint16`` arrays are scaled to uint8 as
16-bit files are; float arrays and tensors skip the uint8 rounding but share the crop, channel
conversion and resize filter.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from diffmic.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
CENTER_CROP_FORMATS = frozenset({"isic2018", "aptos2019", "pickle"})  # as the original DiffMIC loaders
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ImageSpec:
    """What the network expects, and how any image is brought to it.

    Attributes:
        size: square side in pixels.
        channels: 1 (grey) or 3 (RGB).
        center_crop: crop the centred min(H, W) square before resizing.
        mean: per-channel normalisation mean in [0, 1] units (1 value or ``channels`` values).
        std: per-channel normalisation std (same length as ``mean``).
    """

    size: int
    channels: int
    center_crop: bool = False
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise DataError(f"image spec: size must be a positive integer, got {self.size!r}")
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise DataError(f"image spec: channels must be 1 or 3, got {self.channels!r}")
        if not isinstance(self.center_crop, bool):
            raise DataError(f"image spec: center_crop must be true or false, got {self.center_crop!r}")
        if len(self.mean) not in (1, self.channels) or len(self.std) != len(self.mean):
            raise DataError(
                f"image spec: mean {list(self.mean)} and std {list(self.std)} need 1 or "
                f"{self.channels} values each"
            )
        if not all(math.isfinite(v) for v in self.mean) or not all(math.isfinite(s) and s > 0 for s in self.std):
            raise DataError(f"image spec: mean must be finite and std > 0, got {list(self.mean)}, {list(self.std)}")

    @classmethod
    def for_format(
        cls, data_format: str, *, size: int, channels: int, mean: Sequence[float], std: Sequence[float]
    ) -> ImageSpec:
        """The spec of a dataset layout: ``isic2018``, ``aptos2019`` and ``pickle`` crop the centre."""
        return cls(int(size), int(channels), data_format in CENTER_CROP_FORMATS, tuple(mean), tuple(std))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> ImageSpec:
        """Inverse of :meth:`to_dict`; a missing, unknown or invalid key is a :class:`DataError`."""
        if not isinstance(d, dict):
            raise DataError(f"image spec must be a mapping, got {type(d).__name__}")
        keys = {"size", "channels", "center_crop", "mean", "std"}
        if set(d) != keys:
            raise DataError(f"image spec keys must be {sorted(keys)}, got {sorted(map(str, d))}")
        if not isinstance(d["mean"], (list, tuple)) or not isinstance(d["std"], (list, tuple)):
            raise DataError("image spec: mean and std must be lists of numbers")
        try:
            return cls(d["size"], d["channels"], d["center_crop"], tuple(d["mean"]), tuple(d["std"]))
        except (TypeError, ValueError) as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(f"image spec: invalid value ({exc})") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def describe(self) -> str:
        """One line for messages, model cards and the export docs."""
        crop = "centre-square crop, " if self.center_crop else ""
        return (f"{crop}resize to {self.size}x{self.size} (PIL bilinear), {self.channels} channel(s), "
                f"uint8/255, (x - {list(self.mean)}) / {list(self.std)}")


# ----------------------------------------------------------------------------- decoding
def decode_image(path: str | Path) -> Image.Image:
    """Open and fully decode one image file (the only place pixels are read from disk)."""
    img = Image.open(path)
    try:
        img.load()
    except BaseException:
        img.close()
        raise
    return img


def pil_to_uint8(img: Image.Image) -> np.ndarray:
    """A PIL image of any common mode -> uint8 (H, W, 1) grey or (H, W, 3) RGB, EXIF orientation applied.

    Alpha is dropped, palettes are expanded, 16-bit grey is divided by 257 (65535 -> 255, whatever
    the image's own maximum) and 32-bit integer / float grey is scaled from its value range.

    Raises:
        DataError: non-finite values in a float image.
    """
    img = ImageOps.exif_transpose(img) if img.getexif().get(0x0112, 1) != 1 else img
    mode = img.mode
    if mode in ("RGB", "L"):
        arr = np.asarray(img, dtype=np.uint8)
    elif mode in ("RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV"):
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    elif mode in ("1", "LA", "La"):
        arr = np.asarray(img.convert("L"), dtype=np.uint8)
    elif mode in ("P", "PA"):
        arr = np.asarray(img.convert("RGBA").convert("RGB"), dtype=np.uint8)
    elif mode.startswith("I;16"):
        arr = _to_uint8(np.asarray(img).astype(np.float64), 65535.0)
    elif mode in ("I", "F"):
        raw = np.asarray(img).astype(np.float64)
        if not np.isfinite(raw).all():
            raise DataError("image contains NaN or infinite values")
        top = float(raw.max()) if raw.size else 0.0
        if mode == "F" and top <= 1.0:
            full = 1.0
        elif top <= 255:
            full = 255.0
        elif top <= 65535:
            full = 65535.0
        else:
            full = top
        arr = _to_uint8(raw - min(0.0, float(raw.min()) if raw.size else 0.0), full)
    else:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    return arr


def _to_uint8(raw: np.ndarray, full: float) -> np.ndarray:
    return np.clip(np.rint(raw * (255.0 / full)), 0, 255).astype(np.uint8)


def uint16_to_uint8(arr: np.ndarray) -> np.ndarray:
    """uint16 values -> uint8 exactly as a 16-bit image file is converted (÷ 257, rounded)."""
    return _to_uint8(arr.astype(np.float64), 65535.0)


# ----------------------------------------------------------------------- geometry, channels
def center_square(arr: np.ndarray) -> np.ndarray:
    """Crop the centred square of side min(H, W) of an (H, W, ...) array (offsets as the original DiffMIC)."""
    h, w = arr.shape[:2]
    s = min(h, w)
    y0, x0 = round((h - s) / 2.0), round((w - s) / 2.0)
    return arr[y0 : y0 + s, x0 : x0 + s]


def convert_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """(..., C) uint8 or float32 -> (..., channels): grey repeated to RGB, RGB to ITU-R 601 luma, alpha dropped.

    uint8 luma is rounded to uint8; float luma is kept as float32.
    """
    have = arr.shape[-1]
    if have == 4:
        arr, have = arr[..., :3], 3
    if have == channels:
        return arr
    if have == 1 and channels == 3:
        return np.repeat(arr, 3, axis=-1)
    if have == 3 and channels == 1:
        x = arr.astype(np.float32)
        r, g, b = (np.float32(w) for w in LUMA)
        gray = x[..., 0:1] * r + x[..., 1:2] * g + x[..., 2:3] * b
        if arr.dtype == np.uint8:
            return np.clip(np.rint(gray), 0, 255).astype(np.uint8)
        return gray
    raise DataError(f"cannot convert {have}-channel images to {channels} channels")


def resize(arr: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) uint8 or float32 -> (size, size, C) with PIL's (antialiased) bilinear filter, per channel."""
    if arr.shape[0] == size and arr.shape[1] == size:
        return arr
    mode = "L" if arr.dtype == np.uint8 else "F"
    src = arr if mode == "L" else arr.astype(np.float32)
    chans = [
        np.asarray(Image.fromarray(np.ascontiguousarray(src[..., c]), mode).resize(
            (size, size), Image.Resampling.BILINEAR))
        for c in range(arr.shape[2])
    ]
    return np.stack(chans, axis=2)


def prepare(arr: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """One (H, W, C) uint8 or float32 image -> (size, size, channels), same dtype: crop, channels, resize."""
    if spec.center_crop:
        arr = center_square(arr)
    return np.ascontiguousarray(resize(convert_channels(arr, spec.channels), spec.size))


def prepare_batch(images: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """(N, H, W, C) -> (N, size, size, channels): :func:`prepare` applied to each image."""
    if images.shape[1:] == (spec.size, spec.size, spec.channels):
        return images  # crop of a square is the identity; nothing else to do
    out = np.empty((len(images), spec.size, spec.size, spec.channels), dtype=images.dtype
                   if images.dtype == np.uint8 else np.float32)
    for i, im in enumerate(images):
        out[i] = prepare(im, spec)
    return out


def image_to_array(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """A decoded PIL image -> the uint8 (size, size, channels) array a reader stores."""
    return prepare(pil_to_uint8(img), spec)


def load_image(path: str | Path, spec: ImageSpec) -> np.ndarray:
    """Decode one image file into the uint8 (size, size, channels) array a reader stores.

    Raises:
        DataError: naming the file when it is missing, unreadable or corrupt.
    """
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p}: is a folder, not an image file")
    try:
        with decode_image(p) as img:
            return image_to_array(img, spec)
    except FileNotFoundError:
        raise DataError(f"image file not found: {p}") from None
    except DECODE_ERRORS as exc:
        raise DataError(f"{p}: unreadable or corrupt image ({exc})") from None


# ------------------------------------------------------------------------- model input
def to_model_input(x: Tensor, spec: ImageSpec) -> Tensor:
    """(N, C, H, W) uint8 (÷ 255) or float in [0, 1] -> ``(x - mean) / std`` float32, on x's device.

    For uint8 this is exactly the training path (``images.float() / 255`` then ``DiffMIC.normalize``).

    Raises:
        DataError: float values that are not finite or outside [0, 1].
    """
    return normalize(to_unit_range(x), spec)


def to_unit_range(x: Tensor) -> Tensor:
    """uint8 -> float / 255; float must already be finite and in [0, 1] (other dtypes: DataError)."""
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise DataError(f"unsupported image dtype {x.dtype}; give uint8, uint16 or float in [0, 1]")
    x = x.float()
    if not torch.isfinite(x).all():
        raise DataError("images contain NaN or infinite values")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise DataError(
            f"float images must be in [0, 1], got values in [{x.min().item():.4g}, {x.max().item():.4g}] "
            "(give uint8/uint16 arrays as they are, or divide by their full scale)"
        )
    return x


def normalize(x01: Tensor, spec: ImageSpec) -> Tensor:
    """(N, C, H, W) in [0, 1] -> ``(x - mean) / std`` with the spec's per-channel mean/std."""
    c = spec.channels
    m = torch.tensor(spec.mean, dtype=torch.float32, device=x01.device).expand(c).reshape(1, c, 1, 1)
    s = torch.tensor(spec.std, dtype=torch.float32, device=x01.device).expand(c).reshape(1, c, 1, 1)
    return (x01 - m) / s


def to_batch(images: Any, spec: ImageSpec) -> Tensor:
    """Any accepted input -> (N, channels, size, size) uint8 or float tensor, through :func:`prepare`.

    Accepted: PIL images; numpy arrays (H, W), (H, W, C) or (N, H, W, C) with C in 1, 3, 4 (a 3-D
    array whose last axis is not 1, 3 or 4 is an (N, H, W) grey stack) of dtype uint8, uint16
    (÷ 257 to uint8, as 16-bit files) or float in [0, 1]; tensors (C, H, W) or (N, C, H, W) of the
    same dtypes; or a list of any of these. A tensor already at the spec's size and channels stays
    on its device.

    Raises:
        DataError: an unsupported type, rank, dtype, or value range.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise DataError("no images given")
        parts = [to_batch(im, spec) for im in images]
        if len({p.dtype for p in parts}) > 1:
            parts = [to_unit_range(p) for p in parts]
        return torch.cat([p.cpu() for p in parts])
    if isinstance(images, Image.Image):
        return _nhwc_to_nchw(image_to_array(images, spec)[None])
    if isinstance(images, np.ndarray):
        arr = images
        if arr.ndim == 2:
            arr = arr[None, ..., None]
        elif arr.ndim == 3:
            arr = arr[None] if arr.shape[-1] in (1, 3, 4) else arr[..., None]
        if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
            raise DataError(
                f"image array must be (H, W), (H, W, C) or (N, H, W, C) with C in 1, 3, 4, got shape {images.shape}"
            )
        return _nhwc_to_nchw(prepare_batch(_array_dtype(arr), spec))
    if isinstance(images, Tensor):
        t = images
        if t.ndim == 2:
            t = t[None, None]
        elif t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or t.shape[1] not in (1, 3, 4):
            raise DataError(
                f"image tensor must be (C, H, W) or (N, C, H, W) with C in 1, 3, 4, got shape {tuple(images.shape)}"
            )
        if tuple(t.shape[1:]) == (spec.channels, spec.size, spec.size) and (
            t.dtype == torch.uint8 or t.is_floating_point()
        ):
            return t
        arr = t.detach().cpu().permute(0, 2, 3, 1)
        if arr.dtype == torch.uint16:
            arr = arr.to(torch.int32)  # numpy() of uint16 tensors is not supported everywhere
            return _nhwc_to_nchw(prepare_batch(uint16_to_uint8(arr.numpy()), spec))
        return _nhwc_to_nchw(prepare_batch(_array_dtype(arr.numpy()), spec))
    raise DataError(
        f"unsupported image type {type(images).__name__}; give tensors, numpy arrays or PIL images"
    )


def _array_dtype(arr: np.ndarray) -> np.ndarray:
    """uint8 as is; uint16 -> uint8 as 16-bit files; float -> float32 checked to be in [0, 1]."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return uint16_to_uint8(arr)
    if arr.dtype.kind == "f":
        return to_unit_range(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))).numpy()
    raise DataError(
        f"unsupported image dtype {arr.dtype}; give uint8 (0-255), uint16 (0-65535) or float in [0, 1]"
    )


def _nhwc_to_nchw(arr: np.ndarray) -> Tensor:
    arr = np.ascontiguousarray(arr)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy()).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------ folders
def list_image_files(folder: Path, *, recursive: bool = False) -> tuple[list[Path], list[Path]]:
    """(image files, other entries) in ``folder``, both sorted.

    Image files have one of :data:`IMAGE_EXTENSIONS` (any case). Other entries are every file that
    is not an image, and, without ``recursive``, the sub-folders that were not searched.
    """
    images: list[Path] = []
    others: list[Path] = []
    entries = folder.rglob("*") if recursive else folder.iterdir()
    for p in entries:
        if p.is_dir():
            if not recursive:
                others.append(p)
        elif p.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(p)
        else:
            others.append(p)
    return sorted(images), sorted(others)
