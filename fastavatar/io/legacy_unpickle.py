"""Lenient unpickling of released checkpoints (the loader used today; a restricted allowlist
unpickler is to replace it, see :mod:`fastavatar.io.unpickle` once it lands).

Released FastAvatar files pickle ``__main__.TrainingConfig`` dataclasses, which
``weights_only=True`` refuses. :func:`lenient_torch_load` unpickles them with classes that cannot
be imported turned into harmless :class:`PickledStandIn` objects, and a short list of dangerous
callables (os/subprocess/eval/...) refused. Only load files you trust.
"""

from __future__ import annotations

import io
import os
import pickle
import types
from typing import Any, Dict, Tuple, Union

import torch


class PickledStandIn:
    """Stand-in for a pickled object whose class cannot be imported (e.g. ``__main__.TrainingConfig``).

    Keeps the pickled state in ``__dict__`` (:func:`fastavatar.io.plain.to_plain` turns it into a dict).
    """

    _pickled_module = "?"
    _pickled_name = "?"

    def __init__(self, *args, **kwargs):
        if args:
            self.__dict__["_args"] = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state, slots = state
            self.__dict__.update(slots or {})
        if isinstance(state, dict):
            self.__dict__.update(state)
        elif state is not None:
            self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<stand-in for {self._pickled_module}.{self._pickled_name}: {sorted(self.__dict__)}>"


_STANDINS: Dict[Tuple[str, str], type] = {}
_REFUSED_MODULES = {"os", "posix", "nt", "subprocess", "sys", "shutil", "importlib", "runpy", "socket",
                    "pty", "code", "ctypes", "multiprocessing", "webbrowser", "pickle", "marshal"}
_REFUSED_BUILTINS = {"eval", "exec", "compile", "__import__", "open", "getattr", "setattr", "delattr",
                     "globals", "locals", "vars", "input", "breakpoint", "help", "exit", "quit"}


def _standin(module: str, name: str) -> type:
    key = (module, name)
    if key not in _STANDINS:
        _STANDINS[key] = type(name, (PickledStandIn,), {"_pickled_module": module, "_pickled_name": name,
                                                         "__module__": __name__})
    return _STANDINS[key]


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        root = module.split(".")[0]
        if root in _REFUSED_MODULES or (root == "builtins" and name in _REFUSED_BUILTINS):
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _standin(module, name)


_lenient_pickle = types.ModuleType("fastavatar_lenient_pickle")
_lenient_pickle.Unpickler = _LenientUnpickler
_lenient_pickle.load = lambda f, **kw: _LenientUnpickler(f, **kw).load()
_lenient_pickle.loads = lambda b, **kw: _LenientUnpickler(io.BytesIO(b), **kw).load()
_lenient_pickle.__name__ = "fastavatar_lenient_pickle"


def lenient_torch_load(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> Any:
    """``torch.load`` with the lenient unpickler (see the module doc); errors propagate."""
    return torch.load(path, map_location=map_location, weights_only=False, pickle_module=_lenient_pickle)


__all__ = ["PickledStandIn", "lenient_torch_load"]
