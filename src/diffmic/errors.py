"""User-facing error types: the CLI prints their message as one line and exits non-zero."""

from __future__ import annotations


class DiffMICError(Exception):
    """Base class of errors caused by user input (files, options, checkpoints)."""


class ConfigError(DiffMICError, ValueError):
    """An invalid configuration value, key or file."""


class DataError(DiffMICError, ValueError):
    """A missing, malformed or inconsistent dataset."""


class CheckpointError(DiffMICError, ValueError):
    """A missing, corrupt or incompatible checkpoint."""


class ExportError(DiffMICError, RuntimeError):
    """A model that cannot be exported (missing export packages, unsupported op, unwritable file)."""


def first_line(exc: BaseException, limit: int = 240, *, typed: bool = True) -> str:
    """The first line of an exception's message, cut at ``limit`` characters, for one-line errors.

    With ``typed``, prefixed by the exception's class name (``"KeyError: 'x'"``; just the class name
    when the message is empty); without, the bare line (``""`` when empty).
    """
    lines = str(exc).strip().splitlines()
    text = lines[0][:limit] if lines else ""
    if not typed:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
