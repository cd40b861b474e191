"""``diffmic`` command line: a thin shell over the Python API.

Every user error ends in one line on stderr (``diffmic: error: ...``) and a non-zero exit code.
The parser is in :mod:`diffmic.cli.parser`, the sub-commands in :mod:`diffmic.cli.commands`.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Sequence

from diffmic.cli.commands import (
    _cmd_app,
    _cmd_config,
    _cmd_evaluate,
    _cmd_explain,
    _cmd_export,
    _cmd_predict,
    _cmd_report,
    _cmd_train,
)
from diffmic.cli.parser import build_parser, positive_int
from diffmic.errors import DiffMICError, first_line

COMMANDS = {
    "train": _cmd_train,
    "evaluate": _cmd_evaluate,
    "predict": _cmd_predict,
    "explain": _cmd_explain,
    "report": _cmd_report,
    "config": _cmd_config,
    "export": _cmd_export,
    "app": _cmd_app,
}


class _StderrHandler(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record is written (tests replace it)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging() -> None:
    """diffmic's own messages: one line each on stderr, through one handler on the ``diffmic`` logger.

    The root logger is left alone on purpose. ``import lightning`` puts an ``INFO: ...`` handler on the
    ``lightning`` logger, and ``lightning.pytorch`` / ``lightning.fabric`` add their own plain handler
    (and stop propagating) only when the root logger has none. A root handler here (the former
    ``logging.basicConfig``) therefore printed every Lightning line twice: ``INFO: GPU available ...``
    and again ``GPU available ...``.
    """
    log = logging.getLogger("diffmic")
    log.setLevel(logging.INFO)
    log.propagate = False
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)


def quiet_library_warnings() -> None:
    """Hide the libraries' warnings that no user can act on (the CLI without ``--debug``; benchmarks)."""
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
    # deprecations inside the libraries (e.g. Lightning's use of torch's LeafSpec): nothing a user can act on
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(lightning|torch|timm|torchmetrics)\b")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 error, 2 usage error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors: already reported in one line; --help/--version: exit 0
        if exc.code in (0, None):
            raise
        return int(exc.code) if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    _configure_logging()
    if not args.debug:
        quiet_library_warnings()
    try:
        return COMMANDS[args.command](args)
    except DiffMICError as exc:
        if args.debug:
            raise
        print(f"diffmic: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("diffmic: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, permission denied, ... while reading or writing a file
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"diffmic: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except MemoryError:
        print("diffmic: error: out of memory (try a smaller data.batch_size)", file=sys.stderr)
        return 1
    except Exception as exc:
        if args.debug:
            raise
        print(f"diffmic: error: {first_line(exc, 300)} (rerun with --debug for details)",
              file=sys.stderr)
        return 1


__all__ = ["COMMANDS", "build_parser", "main", "positive_int", "quiet_library_warnings"]
