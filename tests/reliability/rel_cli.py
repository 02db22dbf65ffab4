"""Run a script the way a user does and check how it fails.

:func:`run_cli` runs ``scripts/<name>`` as ``__main__`` (in this process by default, so the suite
stays cheap on a 2-core machine; ``REL_SUBPROCESS=1`` or ``subprocess=True`` runs a real
``python scripts/<name>`` instead). An exception escaping the script is what a user would see as a
traceback; it is reported as such, not raised. :func:`assert_clean_failure` is the suite's rule:
non-zero exit, no traceback, and a last stderr line that names the culprit.
"""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[2]


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def last_error_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def run_cli(script: str, args: Sequence, timeout: float = 300, subprocess_mode: Optional[bool] = None,
            cwd: Optional[Path] = None, env: Optional[dict] = None) -> CliResult:
    path = REPO / "scripts" / script
    argv = [str(a) for a in args]
    if subprocess_mode is None:
        subprocess_mode = bool(os.environ.get("REL_SUBPROCESS"))
    if subprocess_mode:
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
        proc = subprocess.run([sys.executable, str(path), *argv], capture_output=True, text=True, timeout=timeout,
                              cwd=str(cwd or REPO), env=full_env)
        return CliResult(proc.returncode, proc.stdout, proc.stderr)
    out, err = io.StringIO(), io.StringIO()
    old_argv, old_cwd = sys.argv, os.getcwd()
    code = 0
    try:
        sys.argv = [str(path), *argv]
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(path), run_name="__main__")
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if isinstance(exc.code, str):
                    err.write(exc.code + "\n")
            except BaseException:  # noqa: BLE001 - what a user would see as a traceback
                err.write(traceback.format_exc())
                code = 1
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    return CliResult(code, out.getvalue(), err.getvalue())


def assert_clean_failure(res: CliResult, *names) -> str:
    """Non-zero exit, no traceback, and the last stderr line names every item in ``names``."""
    text = res.stdout + res.stderr
    assert res.returncode != 0, f"exit 0 for bad input:\n{text[-2000:]}"
    assert "Traceback" not in text, f"traceback:\n{text[-3000:]}"
    line = res.last_error_line
    for name in names:
        assert str(name) in line, f"{name!r} not named in the error line: {line!r}\n{text[-1500:]}"
    return line
