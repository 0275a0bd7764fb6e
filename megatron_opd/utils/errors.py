"""The expected failures of a run or a tool, and how an entry point reports them.

Why it exists: a wrong config value, a malformed data row, an unreachable server, a corrupt checkpoint or a
vocabulary mismatch is the user's to fix; one line naming what and where tells them how, while a traceback from
every rank buries it. A bug (any other exception) keeps its traceback. Every expected error class derives from
``OPDError``; entry points wrap their work in ``expected_errors_exit()``.

This module imports nothing heavy: the config and data modules import ``OPDError`` from it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

__all__ = [
    "EXIT_CODE",
    "MissingFileError",
    "OPDError",
    "OutputExistsError",
    "expected_errors",
    "expected_errors_exit",
    "one_line",
]

EXIT_CODE = 2  # as argparse's usage errors: the input was wrong, not the program


class OPDError(Exception):
    """An expected failure whose message names what was wrong, where, and how to fix it."""


class MissingFileError(OPDError, FileNotFoundError):
    """An input file or directory the user named (or a format requires) does not exist."""


class OutputExistsError(OPDError, FileExistsError):
    """An output would overwrite something that exists and overwriting was not asked for."""


def expected_errors() -> tuple[type[BaseException], ...]:
    """The exception types reported as one line: ``OPDError`` and its subclasses (``CheckpointError`` too)."""
    return (OPDError,)


def one_line(error: BaseException) -> str:
    """``error``'s message on one line (its own lines joined by `` | ``)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " | ".join(lines) or type(error).__name__


def _rank() -> int:
    """This process's global rank (torchrun's RANK; 0 in a plain single-process launch)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


@contextlib.contextmanager
def expected_errors_exit() -> Iterator[None]:
    """Turn an expected error into ``error: <message>`` on stderr (rank 0 only; other ranks stay silent) and exit
    code 2. Anything else propagates with its traceback."""
    try:
        yield
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)) or not isinstance(e, expected_errors()):
            raise
        if _rank() == 0:
            print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_CODE)
