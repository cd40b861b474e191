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
