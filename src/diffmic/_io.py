"""Atomic file writes: a temporary file in the same folder, flushed and renamed over the target.

A process killed (or a disk that fills up) mid-write leaves the previous file or none, never a
truncated file that looks complete; the temporary file is removed when the write fails. Every
writer of the package goes through here: :func:`atomic_write` (a file object),
:func:`atomic_write_text`, :func:`atomic_torch_save`, and :func:`atomic_path` for writers that
need a path (the ONNX exporter).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

PARTIAL_SUFFIX = ".partial"


def check_output_file(path: Path, error: type[Exception], inputs: Iterable[str | Path] = ()) -> None:
    """Raise ``error`` (one line) unless ``path`` can be written as a file.

    It must not be a folder or one of ``inputs`` (the files the command reads: images, checkpoint,
    data; the same file under another name or link counts), and its parent must exist and be writable.
    """
    if path.exists():
        for inp in inputs:
            if Path(inp).exists() and os.path.samefile(path, inp):
                alias = f" ({inp})" if Path(inp) != path else ""
                raise error(f"output file {path} is an input of this command{alias}; "
                            "refusing to overwrite it, choose another output name")
    if path.is_dir():
        raise error(f"output path is a folder, expected a file name: {path}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise error(f"output folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise error(f"output folder is not writable: {parent}")


def prepare_output_dir(path: Path, error: type[Exception]) -> None:
    """Create the output folder if its parent exists; ``error`` (one line) otherwise."""
    if path.exists() and not path.is_dir():
        raise error(f"output path exists and is not a folder: {path}")
    if not path.is_dir():
        check_output_file(path, error)
        try:
            path.mkdir()
        except OSError as exc:
            raise error(f"cannot create output folder {path} ({exc.strerror or type(exc).__name__})") from None
    if not os.access(path, os.W_OK):
        raise error(f"output folder is not writable: {path}")


def partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; the block writes it, and on success it is renamed
    over ``path``. On any error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = partial_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(path)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a binary temporary file, fsync it, and rename it to ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return path


def _sync_folder(path: Path) -> None:
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_text(path: str | Path, text: str) -> Path:
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))
