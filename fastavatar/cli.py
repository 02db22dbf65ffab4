"""How every script ends: a one-line ``error: ...`` on stderr and an exit code, never a traceback
for bad input, a missing file, a full disk or Ctrl-C.

Scripts call ``sys.exit(run_script(main))``. Expected failures are the exceptions a user can cause
(``OSError`` including missing files and full disks, ``ValueError`` including bad configs and
damaged checkpoints, unpickling refusals, ``ImportError`` for a missing optional dependency,
:class:`TrainingStopped` from the training guards, ``MemoryError``); anything else is a bug and
keeps its traceback. ``FASTAVATAR_TRACEBACK=1`` shows the traceback of expected failures too.
"""

from __future__ import annotations

import os
import pickle
import sys
from typing import Callable, Optional, Sequence

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # the shell's convention for SIGINT


class TrainingStopped(RuntimeError):
    """A training guard stopped the run (non-finite or exploding loss / gradients / weights)."""


EXPECTED_ERRORS = (OSError, ValueError, pickle.UnpicklingError, ImportError, TrainingStopped, MemoryError)


def one_line(exc: BaseException) -> str:
    """The exception as a single line; an ``OSError`` names its file."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename and not str(exc).startswith(str(exc.filename)):
        text = f"{exc.filename}: {exc.strerror}"
    elif isinstance(exc, MemoryError):
        text = f"out of memory ({exc})" if str(exc) else "out of memory"
    else:
        text = str(exc) or type(exc).__name__
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines) if lines else type(exc).__name__


def run_script(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None,
               extra_errors: tuple = ()) -> int:
    """Run a script's ``main(argv)``; expected failures become one line and exit code 1,
    Ctrl-C exit code 130."""
    try:
        return int(main(argv) or 0)
    except KeyboardInterrupt as exc:
        detail = str(exc)
        print(f"interrupted (Ctrl-C){': ' + detail if detail else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except EXPECTED_ERRORS + tuple(extra_errors) as exc:
        if os.environ.get("FASTAVATAR_TRACEBACK"):
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR


__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXPECTED_ERRORS", "TrainingStopped", "one_line", "run_script"]
