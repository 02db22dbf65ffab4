"""Malicious pickle payloads for the reliability suite, and a control that proves they are real.

Each payload, unpickled by the standard unpickler, creates ``marker`` (a file path). Tests load
the payload through our loaders and assert the marker does not exist. :func:`fires_under_pickle`
runs the standard unpickler in a subprocess to show that the payload would have run.
"""

from __future__ import annotations

import cProfile
import os
import pickle
import pydoc
import shlex
import subprocess
import sys
from pathlib import Path


class _Reduce:
    """Pickles as ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *args):  # pickle insists the reduce callable be callable; never called
        raise AssertionError("payload stand-in called")


def _touch_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def make_payload(kind: str, marker: Path):
    """An object whose unpickling (by the standard unpickler) creates ``marker``.

    kinds: ``cprofile_run``, ``pydoc_pipepager``, ``os_system``, ``builtin_exec`` (protocol 2
    writes it as ``__builtin__.exec``), ``commands_getoutput`` (``commands.getoutput`` at protocol
    2), ``chained_getattr`` (``getattr(__import__('os'), 'system')(...)``).
    """
    marker = Path(marker)
    shell = f"touch {shlex.quote(str(marker))}"
    if kind == "cprofile_run":
        return _Reduce(cProfile.run, _touch_code(marker))
    if kind == "pydoc_pipepager":
        return _Reduce(pydoc.pipepager, "x", shell)
    if kind == "os_system":
        return _Reduce(os.system, shell)
    if kind == "builtin_exec":
        return _Reduce(exec, _touch_code(marker))
    if kind == "commands_getoutput":
        return _Reduce(subprocess.getoutput, shell)
    if kind == "chained_getattr":
        system = _Reduce(getattr, _Reduce(__import__, "os"), "system")
        return _Reduce(system, shell)
    raise ValueError(kind)


PAYLOAD_KINDS = ("cprofile_run", "pydoc_pipepager", "os_system", "builtin_exec", "commands_getoutput", "chained_getattr")

# The global each payload names, as the restricted unpickler records it (after Python 2 mapping).
EXPECTED_GLOBAL = {
    "cprofile_run": "cProfile.run",
    "pydoc_pipepager": "pydoc.pipepager",
    "os_system": f"{os.system.__module__}.system",  # posix.system on Linux
    "builtin_exec": "builtins.exec",
    "commands_getoutput": "subprocess.getoutput",
    "chained_getattr": "builtins.getattr",
}


def fires_under_pickle(data_file: Path, marker: Path, loader: str = "pickle") -> bool:
    """Load ``data_file`` with the standard (unsafe) unpickler in a subprocess; True if the
    marker appeared. ``loader``: ``pickle`` (pickle.load), ``torch`` (torch.load with
    weights_only=False) or ``npz`` (np.load with allow_pickle=True)."""
    code = {
        "pickle": "import pickle,sys; pickle.load(open(sys.argv[1],'rb'), encoding='latin1')",
        "torch": "import torch,sys; torch.load(sys.argv[1], weights_only=False)",
        "npz": "import numpy,sys; d=numpy.load(sys.argv[1], allow_pickle=True); [d[k] for k in d.files]",
    }[loader]
    subprocess.run([sys.executable, "-c", code, str(data_file)], capture_output=True, timeout=120,
                   cwd=str(Path(data_file).parent))
    return Path(marker).exists()


def raw_globals(data: bytes) -> set:
    """'module name' strings of the GLOBAL opcodes in a pickle (as written, before mapping)."""
    import pickletools

    out = set()
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("GLOBAL", "INST"):
            out.add(arg)
    return out


def pickle_bytes(obj, protocol: int = 2) -> bytes:
    return pickle.dumps(obj, protocol=protocol)
