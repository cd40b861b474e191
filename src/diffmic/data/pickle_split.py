"""Reader for the original DiffMIC split lists: pickled ``[{'img_root': path, 'label': int}, ...]``.

``data.path`` is a folder holding ``*train*.pkl`` and ``*test*.pkl`` (optionally ``*val*.pkl``),
or a single ``.pkl`` which is then split. The original lists have no val split: a stratified one is
carved out of train (``data.val_fraction``, ``data.split_seed``). Pickles are read with a restricted
unpickler that refuses every global, so a malicious file cannot run code. Images are centre-square
cropped then resized, as the original data loader.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from diffmic.config import DataConfig
from diffmic.data.base import DataBundle
from diffmic.data.files import resolve_dir
from diffmic.data.splits import read_file_layout
from diffmic.errors import DataError, first_line


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only builds plain containers and scalars: any global is refused."""

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        raise DataError(
            f"{self.source}: refusing to load global {module}.{name}; only plain lists/dicts of "
            "str/int/float/bool/None are accepted (re-save the list with plain Python types)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self.source}: persistent ids are not allowed in a split list")


def safe_load_pickle(path: Path) -> Any:
    """Load ``path`` with :class:`RestrictedUnpickler`.

    Raises:
        DataError: unreadable, corrupt, or referencing any global (class, function).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read pickle ({exc})") from None
    try:
        return RestrictedUnpickler(io.BytesIO(data), str(path)).load()
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt pickles raise many types (UnpicklingError, EOFError, ...)
        raise DataError(
            f"{path}: corrupt or unsupported pickle ({first_line(exc)})"
        ) from None


def read_entries(path: Path) -> list[tuple[str, int]]:
    """(img_root, label) pairs of one split list, validated."""
    data = safe_load_pickle(path)
    if not isinstance(data, (list, tuple)):
        raise DataError(
            f"{path}: expected a list of {{'img_root', 'label'}} dicts, got {type(data).__name__}"
        )
    out = []
    for k, item in enumerate(data):
        if not isinstance(item, dict) or "img_root" not in item or "label" not in item:
            raise DataError(f"{path} entry {k}: expected a dict with keys 'img_root' and 'label'")
        root, label = item["img_root"], item["label"]
        if not isinstance(root, str) or not root:
            raise DataError(
                f"{path} entry {k}: 'img_root' must be a non-empty string, got {root!r}"
            )
        out.append((root, _as_label(label, f"{path} entry {k}")))
    if not out:
        raise DataError(f"{path}: the split list is empty")
    return out


def _as_label(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise DataError(f"{where}: label must be an integer, got {value!r}")
    if isinstance(value, int):
        label = value
    elif (isinstance(value, float) and value.is_integer()
          or isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        label = int(value)
    else:
        raise DataError(f"{where}: label must be an integer, got {value!r}")
    if label < 0:
        raise DataError(f"{where}: negative label {label}")
    return label


def find_split_files(path: Path) -> dict[str, Path]:
    """``{"train", "test"[, "val"]}`` -> .pkl files in folder ``path``; ``{"all": file}``."""
    if path.is_file():
        return {"all": path}
    if not path.is_dir():
        raise DataError(
            f"data.path not found: {path} (data.format=pickle expects a folder of .pkl files)"
        )
    pkls = sorted(p for p in path.glob("*.pkl") if p.is_file())
    if not pkls:
        raise DataError(f"{path}: no .pkl files found")
    lower = {p: p.name.lower() for p in pkls}
    found = {
        "train": [p for p in pkls if "train" in lower[p]],
        "test": [p for p in pkls if "test" in lower[p] and "train" not in lower[p]],
        "val": [
            p
            for p in pkls
            if "val" in lower[p] and "train" not in lower[p] and "test" not in lower[p]
        ],
    }
    if not found["train"] and not found["test"] and len(pkls) == 1:
        return {"all": pkls[0]}
    for name, hits in found.items():
        if len(hits) > 1:
            raise DataError(
                f"{path}: several *{name}*.pkl files {[p.name for p in hits]}; keep one"
            )
    if not found["train"] or not found["test"]:
        raise DataError(
            f"{path}: need one *train*.pkl and one *test*.pkl (or a single .pkl), "
            f"found {[p.name for p in pkls]}"
        )
    return {k: v[0] for k, v in found.items() if v}


class _Resolver:
    """Find the image file of an ``img_root`` by trying bases and dropping leading components."""

    def __init__(self, bases: list[Path]) -> None:
        self.bases = bases
        self.hint: tuple[int, int] | None = None

    def __call__(self, img_root: str) -> Path | None:
        p = Path(img_root).expanduser()
        if p.is_absolute() and p.is_file():
            return p
        parts = [x for x in p.parts if x not in (p.anchor, ".")]
        order = [(b, k) for b in range(len(self.bases)) for k in range(len(parts))]
        if self.hint is not None:
            order.insert(0, self.hint)
        for b, k in order:
            if k >= len(parts):
                continue
            cand = self.bases[b].joinpath(*parts[k:])
            if cand.is_file():
                self.hint = (b, k)
                return cand
        return None


def read_pickle_split(cfg: DataConfig, run_dir: Path | None) -> DataBundle:
    """Read the original DiffMIC ``.pkl`` split lists found at ``cfg.path``.

    ``img_root`` paths are tried relative to ``data.image_dir`` (if given), else the pkl folder, its
    parents and the working directory, also with leading ``./`` and leading folders dropped.
    """
    files = find_split_files(Path(cfg.path))
    pkl_dir = next(iter(files.values())).parent
    if cfg.image_dir is not None:
        image_dir = resolve_dir(cfg.image_dir, pkl_dir)
        if not image_dir.is_dir():
            raise DataError(f"data.image_dir not found: {cfg.image_dir}")
        bases = [image_dir]
    else:
        bases = [pkl_dir, *list(pkl_dir.absolute().parents)[:4], Path.cwd()]
    resolve = _Resolver(bases)

    paths: list[Path] = []
    labels: list[int] = []
    ids: list[str] = []
    split_names: list[str] = []
    for split, pkl in files.items():
        for k, (img_root, label) in enumerate(read_entries(pkl)):
            path = resolve(img_root)
            if path is None:
                raise DataError(
                    f"{pkl} entry {k}: image file not found: {img_root!r} (tried relative to "
                    f"{[str(b) for b in bases]}; set data.image_dir)"
                )
            paths.append(path)
            labels.append(label)
            ids.append(img_root)
            split_names.append(split)
    num_classes = max(labels) + 1
    names = list(cfg.class_names) if cfg.class_names else [str(i) for i in range(num_classes)]
    if len(names) < num_classes:
        raise DataError(
            f"{pkl_dir}: label {num_classes - 1} but data.class_names has {len(names)} names"
        )
    return read_file_layout(
        cfg,
        run_dir,
        root=pkl_dir,
        source=str(Path(cfg.path)),
        paths=paths,
        labels=labels,
        ids=ids,
        class_names=names,
        split_names=None if "all" in files else split_names,
        extra={"split_files": {k: str(v) for k, v in files.items()}},
    )
