"""The released FastAvatar's rendering flags, and what each one does here.

- ``--camera_model``: only ``pinhole`` (what the released code, its weights and our rasterizers
  use); anything else is a one-line error.
- ``--near_plane`` / ``--far_plane``: the renderer's near / far planes (aliases of ``--near`` / ``--far``).
- ``--antialiased``: ``rasterize_mode="antialiased"`` in gsplat and the same opacity compensation
  in our rasterizers (``render_splats(antialiased=...)``).
- ``--packed`` / ``--sparse_grad``: gsplat memory/gradient layouts, forwarded to gsplat when the
  run renders with it; on the CPU backends (numba, torch) they have nothing to change, and the run
  says so in one line. ``--sparse_grad`` needs ``--packed`` (gsplat asserts it).
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any, Dict

import torch

GSPLAT_ONLY_FLAGS = ("packed", "sparse_grad")
SUPPORTED_CAMERA_MODELS = ("pinhole",)


def check_render_flags(cfg: Any) -> None:
    """One-line ValueError for a camera model we do not render, or ``--sparse_grad`` without ``--packed``."""
    model = getattr(cfg, "camera_model", "pinhole")
    if model not in SUPPORTED_CAMERA_MODELS:
        raise ValueError(f"--camera_model {model}: only {', '.join(SUPPORTED_CAMERA_MODELS)} is supported "
                         "(the released weights and all our rasterizers use pinhole cameras)")
    if getattr(cfg, "sparse_grad", False) and not getattr(cfg, "packed", False):
        raise ValueError("--sparse_grad needs --packed (gsplat supports sparse gradients only in packed mode)")


@lru_cache(maxsize=None)
def _resolved(backend: str, device: str, packed: bool, sparse_grad: bool) -> tuple:
    from fastavatar.render import render_splats, resolve_backend

    concrete = resolve_backend(backend, torch.device(device))
    asked = {k: v for k, v in (("packed", packed), ("sparse_grad", sparse_grad)) if v}
    if concrete != "gsplat":
        print(f"[render] --{' --'.join(asked)}: gsplat-only options; the {concrete} backend does not use them")
        return ()
    accepted = inspect.signature(render_splats).parameters
    missing = [k for k in asked if k not in accepted]
    if missing:
        raise ValueError(f"--{missing[0]}: this version's render_splats does not forward it to gsplat yet")
    return tuple(asked.items())


def gsplat_only_kwargs(cfg: Any, device) -> Dict[str, bool]:
    """``render_splats`` keyword arguments for ``--packed`` / ``--sparse_grad`` ({} when unset or not gsplat)."""
    packed, sparse = bool(getattr(cfg, "packed", False)), bool(getattr(cfg, "sparse_grad", False))
    if not (packed or sparse):
        return {}
    backend = getattr(cfg, "render_backend", "auto")
    return dict(_resolved(backend, str(torch.device(device)), packed, sparse))
