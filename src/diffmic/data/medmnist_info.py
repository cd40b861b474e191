"""MedMNIST by name: ``data.path: breastmnist`` (or ``retinamnist_64``) resolves to a local ``.npz``.

A *flag* is a bare name (no path separator, no ``.npz``) that names one of the 12 2D MedMNIST
datasets, optionally with a size suffix (``_64``, ``_128``, ``_224``; none means 28×28). The file is
looked up with medmnist's own naming (``{flag}.npz``, ``{flag}_{size}.npz``) in, in order,
``$MEDMNIST_ROOT``, medmnist's default folder ``~/.medmnist`` and ``../shared/data`` (relative to the
current folder). A missing file is downloaded with medmnist's own downloader only when the
``medmnist`` package is installed; otherwise one error line says where it looked and how to get it.

Class names and task types are facts of the datasets: ``medmnist.INFO`` when the package is
installed, else the literal table below (copied from medmnist 3.0.2's ``INFO``).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from diffmic.errors import DataError

SIZES = (28, 64, 128, 224)
HOMEPAGE = "https://github.com/MedMNIST/MedMNIST/"

# flag: (medmnist dataset class, task, channels, label names in label order)
TABLE: dict[str, tuple[str, str, int, tuple[str, ...]]] = {
    "pathmnist": ("PathMNIST", "multi-class", 3, (
        "adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
        "normal colon mucosa", "cancer-associated stroma",
        "colorectal adenocarcinoma epithelium",
    )),
    "chestmnist": ("ChestMNIST", "multi-label, binary-class", 1, (
        "atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
        "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis",
        "pleural", "hernia",
    )),
    "dermamnist": ("DermaMNIST", "multi-class", 3, (
        "actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
        "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
        "vascular lesions",
    )),
    "octmnist": ("OCTMNIST", "multi-class", 1, (
        "choroidal neovascularization", "diabetic macular edema", "drusen", "normal",
    )),
    "pneumoniamnist": ("PneumoniaMNIST", "binary-class", 1, (
        "normal", "pneumonia",
    )),
    "retinamnist": ("RetinaMNIST", "ordinal-regression", 3, (
        "0", "1", "2", "3", "4",
    )),
    "breastmnist": ("BreastMNIST", "binary-class", 1, (
        "malignant", "normal, benign",
    )),
    "bloodmnist": ("BloodMNIST", "multi-class", 3, (
        "basophil", "eosinophil", "erythroblast",
        "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte",
        "monocyte", "neutrophil", "platelet",
    )),
    "tissuemnist": ("TissueMNIST", "multi-class", 1, (
        "Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
        "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
        "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb",
    )),
    "organamnist": ("OrganAMNIST", "multi-class", 1, (
        "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
        "lung-left", "lung-right", "pancreas", "spleen",
    )),
    "organcmnist": ("OrganCMNIST", "multi-class", 1, (
        "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
        "lung-left", "lung-right", "pancreas", "spleen",
    )),
    "organsmnist": ("OrganSMNIST", "multi-class", 1, (
        "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
        "lung-left", "lung-right", "pancreas", "spleen",
    )),
}
FLAGS_3D = ("organmnist3d", "nodulemnist3d", "adrenalmnist3d", "fracturemnist3d", "vesselmnist3d",
            "synapsemnist3d")


@dataclass(frozen=True)
class MedMNISTInfo:
    """What the flag says about its dataset."""

    flag: str  # e.g. "breastmnist"
    size: int  # 28, 64, 128 or 224
    python_class: str  # medmnist's dataset class, e.g. "BreastMNIST"
    task: str  # "binary-class" | "multi-class" | "ordinal-regression" | "multi-label, binary-class"
    channels: int
    class_names: tuple[str, ...]

    @property
    def filename(self) -> str:
        """medmnist's file name: ``breastmnist.npz`` at 28, ``breastmnist_64.npz`` otherwise."""
        return f"{self.flag}{'' if self.size == 28 else f'_{self.size}'}.npz"


def parse_flag(name: str | os.PathLike) -> tuple[str, int] | None:
    """``(flag, size)`` when ``name`` is a MedMNIST flag (``"retinamnist_64"`` -> ``("retinamnist", 64)``).

    None for anything else (a path, a file name, an unknown name). 3D flags are an error:
    diffmic classifies 2D images.
    """
    text = os.fspath(name).strip()
    if not text or "/" in text or os.sep in text or (os.altsep and os.altsep in text) \
            or text.lower().endswith(".npz"):
        return None
    flag, size = text.lower(), 28
    base, _, suffix = flag.rpartition("_")
    if base and suffix.isdigit():
        flag, size = base, int(suffix)
    if flag in FLAGS_3D:
        raise DataError(f"{text!r} is a 3D MedMNIST dataset; diffmic classifies 2D images "
                        f"(2D flags: {', '.join(TABLE)})")
    if flag not in TABLE:
        return None
    if size not in SIZES:
        raise DataError(f"{text!r}: MedMNIST sizes are {', '.join(map(str, SIZES))} "
                        f"(use {flag} or {flag}_64, {flag}_128, {flag}_224)")
    return flag, size


def medmnist_info(flag: str, size: int = 28) -> MedMNISTInfo:
    """Class names and task of a 2D MedMNIST flag: ``medmnist.INFO`` if installed, else :data:`TABLE`."""
    python_class, task, channels, names = TABLE[flag]
    info = _installed_info(flag)
    if info is not None:
        labels = info.get("label", {})
        try:
            names = tuple(labels[str(i)] for i in range(len(labels)))
            python_class, task = info.get("python_class", python_class), info.get("task", task)
            channels = int(info.get("n_channels", channels))
        except (KeyError, TypeError, ValueError):
            python_class, task, channels, names = TABLE[flag]
    return MedMNISTInfo(flag, size, python_class, task, channels, names)


def search_folders() -> list[Path]:
    """Where a flag's file is looked for, in order: $MEDMNIST_ROOT, ~/.medmnist, ../shared/data."""
    folders = []
    root = os.environ.get("MEDMNIST_ROOT")
    if root:
        folders.append(Path(root).expanduser())
    folders.append(Path("~/.medmnist").expanduser())
    folders.append(Path("..") / "shared" / "data")
    return folders


def resolve_medmnist(path: str | os.PathLike, *, download: bool = True) -> tuple[Path, MedMNISTInfo | None]:
    """``(file, info)`` for a flag, ``(Path(path), None)`` for anything else (paths work as before).

    A flag's file is taken from the first of :func:`search_folders` that has it; if none has it and
    ``medmnist`` is installed (and ``download``), medmnist downloads it into ``$MEDMNIST_ROOT`` (or
    ``~/.medmnist``). Raises :class:`DataError` (one line) when it cannot be found or fetched.
    """
    parsed = parse_flag(path)
    if parsed is None:
        return Path(path), None
    info = medmnist_info(*parsed)
    if info.task.startswith("multi-label"):
        raise DataError(f"{info.flag} is multi-label ({len(info.class_names)} findings per image); "
                        "diffmic trains single-label classifiers")
    folders = search_folders()
    for folder in folders:
        candidate = folder / info.filename
        if candidate.is_file():
            return candidate, info
    where = ", ".join(str(f) for f in folders)
    if not os.environ.get("MEDMNIST_ROOT"):
        where = f"$MEDMNIST_ROOT (unset), {where}"
    module = _medmnist_module()
    dataset_class = getattr(module, info.python_class, None) if module is not None else None
    if dataset_class is None or not download:
        raise DataError(
            f"{path}: {info.filename} not found in {where}; pip install medmnist (downloads it on first "
            f"use) or download {info.filename} from {HOMEPAGE} into $MEDMNIST_ROOT"
        )
    return _download(dataset_class, info, where), info


def _download(dataset_class: type, info: MedMNISTInfo, where: str) -> Path:
    """Fetch ``info.filename`` with medmnist's own downloader (which checks the file's MD5)."""
    root = Path(os.environ.get("MEDMNIST_ROOT") or "~/.medmnist").expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the MedMNIST folder {root} ({exc.strerror or exc})") from None
    print(f"diffmic: {info.filename} not found in {where}; downloading it with medmnist into {root}",
          file=sys.stderr, flush=True)
    kwargs: dict = {"split": "train", "download": True, "root": str(root)}
    params = inspect.signature(dataset_class).parameters
    if info.size != 28:
        if "size" not in params:
            raise DataError(f"{info.filename}: the installed medmnist has only 28x28 images; "
                            "pip install 'medmnist>=3' for sizes 64, 128, 224")
        kwargs["size"] = info.size
    if "mmap_mode" in params:
        kwargs["mmap_mode"] = "r"  # the download is what we want; do not load the images
    try:
        dataset_class(**kwargs)
    except Exception:  # noqa: BLE001 - medmnist raises a RuntimeError with a multi-line text
        entry = _installed_info(info.flag) or {}
        suffix = "" if info.size == 28 else f"_{info.size}"
        url = entry.get(f"url{suffix}") or HOMEPAGE
        md5 = f" (MD5 {entry[f'MD5{suffix}']})" if entry.get(f"MD5{suffix}") else ""
        raise DataError(
            f"{info.filename}: not found in {where} and medmnist could not download it (offline?); "
            f"download {url}{md5} into {root} (or $MEDMNIST_ROOT)"
        ) from None
    target = root / info.filename
    if not target.is_file():
        raise DataError(f"{info.filename}: medmnist's download did not write {target}")
    return target


def _medmnist_module():
    """The ``medmnist`` package, or None when it is not installed (or does not import)."""
    if importlib.util.find_spec("medmnist") is None:
        return None
    try:
        import medmnist
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return None
    return medmnist


def _installed_info(flag: str) -> dict | None:
    module = _medmnist_module()
    info = getattr(module, "INFO", None) if module is not None else None
    entry = info.get(flag) if isinstance(info, dict) else None
    return entry if isinstance(entry, dict) else None


__all__ = ["FLAGS_3D", "SIZES", "TABLE", "MedMNISTInfo", "medmnist_info", "parse_flag",
           "resolve_medmnist", "search_folders"]
