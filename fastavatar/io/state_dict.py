"""State-dict checks: which model a checkpoint holds, and whether its keys and shapes fit.

Every message is one line naming the file. Knows key prefixes only, never the network classes
(so :mod:`fastavatar.models` can use it).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

PathLike = Union[str, os.PathLike]

KIND_NAMES = {
    "decoder": "decoder",
    "w_encoder": "W-encoder",
    "tracker": "DINO tracker",
    "dinov2_backbone": "bare DINOv2 backbone",
    "unknown": "unrecognised",
}


def state_of(ckpt: Any, keys: Iterable[str]) -> Optional[Mapping[str, torch.Tensor]]:
    """The first of ``keys`` that holds a mapping, or ``ckpt`` itself when it is a bare state dict."""
    if not isinstance(ckpt, Mapping):
        return None
    for k in keys:
        if isinstance(ckpt.get(k), Mapping):
            return ckpt[k]
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    return None


def detect_checkpoint_kind(ckpt: Any) -> str:
    """'decoder', 'w_encoder', 'tracker', 'dinov2_backbone' or 'unknown'."""
    state = state_of(ckpt, ("model_dict", "model_state_dict", "state_dict", "model"))
    if state is None:
        return "unknown"
    keys = set(state)
    if any(k.startswith("conditioning_mlp.") for k in keys):
        return "decoder"
    if "temperature" in keys and any(k.startswith("projector.") for k in keys):
        return "w_encoder"
    if any(k.startswith("encoder.dino.") for k in keys) or "encoder.points_projector.0.weight" in keys:
        return "tracker"
    if "cls_token" in keys and "pos_embed" in keys:
        return "dinov2_backbone"
    return "unknown"


def first_items(items: List[str], n: int = 4) -> str:
    """'[a, b, c, d] (+k more)' for messages."""
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + "]" + more


def state_dict_mismatch(model_or_keys: Union[nn.Module, Mapping[str, torch.Tensor]],
                        state: Mapping[str, torch.Tensor]) -> Tuple[List[str], List[str], List[str]]:
    """(missing keys, unexpected keys, 'key: file [..] vs model [..]' shape mismatches)."""
    expected = model_or_keys.state_dict() if isinstance(model_or_keys, nn.Module) else model_or_keys
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {list(state[k].shape)} vs model {list(expected[k].shape)}"
        for k in expected
        if k in state and isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    return missing, unexpected, shapes


def check_state_dict(model_or_keys, state: Mapping[str, torch.Tensor], path: PathLike, kind: str,
                     found_kind: Optional[str] = None, names_only: bool = False) -> None:
    """Raise a one-line ValueError naming ``path`` when ``state`` does not fit the model exactly
    (missing / unexpected keys, and shape mismatches unless ``names_only``)."""
    missing, unexpected, shapes = state_dict_mismatch(model_or_keys, state)
    if names_only:
        shapes = []
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"missing keys {first_items(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {first_items(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches {first_items(shapes, 3)}")
    name = KIND_NAMES.get(kind, kind)
    if found_kind and found_kind != kind:
        head = f"not a {name} checkpoint (it looks like a {KIND_NAMES[found_kind]} checkpoint)"
    else:
        head = f"{name} weights do not fit the model"
    raise ValueError(f"{path}: {head}: " + "; ".join(parts))


__all__ = ["KIND_NAMES", "check_state_dict", "detect_checkpoint_kind", "first_items", "state_dict_mismatch", "state_of"]
