"""Plain Python data from config objects: what checkpoints store under ``config`` / ``extra``.

:func:`to_plain` is lenient (reading: released files pickle dataclasses that load as stand-ins);
:func:`plain_config` is strict (writing: anything that is not plain data is an error).
"""

from __future__ import annotations

import os
from dataclasses import asdict, is_dataclass
from enum import Enum
from typing import Any, Mapping

import torch

from fastavatar.io.unpickle import StandInGlobal, StandInObject


def to_plain(obj: Any) -> Any:
    """Best-effort conversion of a (possibly stand-in) config object to plain Python data."""
    if isinstance(obj, StandInObject):
        if obj.module == "pathlib" and obj.args and all(isinstance(a, str) for a in obj.args):
            return os.path.join(*obj.args)  # a pickled Path in a released config
        return {str(k): to_plain(v) for k, v in obj.to_dict().items()}
    if isinstance(obj, StandInGlobal):
        return f"<{obj.qualname}>"
    if is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_plain(v) for k, v in asdict(obj).items()}
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, (int, float, bool)) else k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Enum):
        return to_plain(obj.value)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        try:
            return obj.item()
        except Exception:
            pass
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return repr(obj)


def plain_config(config: Any, where: str, allow_tensors: bool = False) -> dict:
    """Config for saving: a dataclass or mapping -> plain dict (strict: unknown objects are an
    error naming ``where`` and the key). ``allow_tensors`` keeps tensors (still
    ``weights_only``-loadable) for ``extra``."""
    if config is None:
        return {}
    if is_dataclass(config) and not isinstance(config, type):
        config = asdict(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"{where}: config must be a dict or dataclass, got {type(config).__name__}")

    def conv(v: Any, key: str) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, Mapping):
            return {str(k): conv(x, f"{key}.{k}") for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x, f"{key}[{i}]") for i, x in enumerate(v)]
        if is_dataclass(v) and not isinstance(v, type):
            return conv(asdict(v), key)
        if isinstance(v, Enum):
            return conv(v.value, key)
        if isinstance(v, os.PathLike):
            return os.fspath(v)
        if isinstance(v, torch.Tensor):
            if allow_tensors:
                return v.detach().cpu().clone()
            if v.numel() == 1:
                return v.item()
        if type(v).__module__ == "numpy" and hasattr(v, "item"):
            return v.item()
        raise TypeError(f"{where}: config entry {key!r} has type {type(v).__name__}, not plain data")

    return {str(k): conv(v, str(k)) for k, v in config.items()}


__all__ = ["plain_config", "to_plain"]
