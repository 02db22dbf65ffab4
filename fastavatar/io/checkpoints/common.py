"""What every checkpoint reader and writer shares: reading a file, checking its kind, and the
common layout of the files we write.

Reading: :func:`load_checkpoint_file` checks the file (zip CRCs, our sha256 stamp, NaN/Inf) and
unpickles it with the restricted allowlist unpickler of :mod:`fastavatar.io.unpickle`; released
files' pickled dataclass configs load as inert stand-ins (see :mod:`fastavatar.io.integrity`).
Writing: ``config`` is always a plain dict (no pickled classes), so every file we write loads with
``weights_only=True`` too, and carries an ``integrity`` entry (format version, tensor sha256).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from fastavatar.io.atomic import atomic_torch_save
from fastavatar.io.integrity import read_checkpoint, stamp
from fastavatar.io.plain import plain_config, to_plain
from fastavatar.io.state_dict import KIND_NAMES, check_state_dict, detect_checkpoint_kind, first_items, state_of

PathLike = Union[str, os.PathLike]
WEIGHTS_README = "pretrained_weights/README.md"


def load_checkpoint_file(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Any:
    """Read a checkpoint safely (:func:`fastavatar.io.integrity.read_checkpoint`).

    Raises FileNotFoundError (naming the file and pretrained_weights/README.md) when missing,
    ValueError (:class:`fastavatar.io.integrity.CheckpointError`, one line naming the file) when the
    file is damaged, has non-finite tensors, fails its checksum or asks for something refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint not found: {path} (see {WEIGHTS_README} for the files and where to put them)"
        )
    return read_checkpoint(path, map_location=map_location)


def short_error(e: BaseException) -> str:
    """'TypeName: first line of the message' (at most 200 characters)."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def checkpoint_config(ckpt: Mapping[str, Any]) -> dict:
    """The ``config`` entry of a loaded checkpoint as a plain dict (works for released pickled
    dataclasses, which load as stand-ins)."""
    cfg = ckpt.get("config") if isinstance(ckpt, Mapping) else None
    plain = to_plain(cfg) if cfg is not None else {}
    return plain if isinstance(plain, dict) else {"value": plain}


def require_kind(ckpt: Any, path: Path, kind: str, state_keys: Tuple[str, ...],
                 reference: Callable[[], Mapping[str, torch.Tensor]]) -> Mapping[str, torch.Tensor]:
    """The state dict of a ``kind`` checkpoint, or a one-line ValueError saying what the file is.

    ``reference()`` builds the state dict of a tiny model of ``kind`` (key names for the message)."""
    found = detect_checkpoint_kind(ckpt)
    state = state_of(ckpt, state_keys)
    if found == kind and state is not None:
        return state
    if state is None:
        top = first_items(sorted(map(str, ckpt))) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise ValueError(
            f"{path}: not a {KIND_NAMES[kind]} checkpoint: no {' / '.join(repr(k) for k in state_keys)} entry "
            f"(top-level keys: {top}; looks like a {KIND_NAMES[found]} checkpoint)"
        )
    check_state_dict(reference(), state, path, kind, found, names_only=True)
    raise ValueError(f"{path}: not a {KIND_NAMES[kind]} checkpoint (looks like a {KIND_NAMES[found]} checkpoint)")


def cpu_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """A detached CPU copy of ``module``'s state dict."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def save_trained_model(
    path: PathLike,
    model_key: str,
    module: nn.Module,
    model_config: dict,
    fmt: str,
    epoch: int,
    global_step: int,
    config: Any,
    optimizer_dict: Optional[Mapping[str, Any]],
    scheduler_dict: Optional[Mapping[str, Any]],
    extra: Optional[Mapping[str, Any]],
) -> None:
    """The W-encoder / tracker checkpoint layout: weights under ``model_key`` (as released), then
    optimizer / scheduler state, progress, run config, model config, ``format`` and ``extra``."""
    obj = {
        model_key: cpu_state(module),
        "optimizer_dict": dict(optimizer_dict) if optimizer_dict is not None else None,
        "scheduler_dict": dict(scheduler_dict) if scheduler_dict is not None else None,
        "epoch": int(epoch),
        "global_step": int(global_step),
        "config": plain_config(config, str(path)),
        "model_config": model_config,
        "format": fmt,
        "extra": plain_config(extra, str(path), allow_tensors=True) if extra is not None else None,
    }
    atomic_torch_save(stamp(obj), path)
