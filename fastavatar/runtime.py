"""Process-level helpers every entry point shares: the torch device, seeding, progress bars and
the library versions recorded next to results.

A leaf module (imports torch/numpy only), so that library code never imports a trainer for them.
"""

from __future__ import annotations

import random
import sys
from typing import Any, Dict, Optional

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda when available else cpu; an unavailable ``cuda`` falls back to cpu with a note."""
    if name in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {name!r}: not a torch device (use auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name!r}: unsupported device type {device.type!r} (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("[fastavatar] CUDA requested but not available: using cpu")
        return torch.device("cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def progress(iterable: Any, enabled: bool = True, **kwargs):
    """tqdm when enabled (main process), the bare iterable otherwise."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, dynamic_ncols=True, **kwargs)


def versions() -> Dict[str, Optional[str]]:
    """Python, torch, fastavatar and the optional runtime packages' versions (None when absent)."""
    from importlib import metadata

    import fastavatar

    out: Dict[str, Optional[str]] = {"python": sys.version.split()[0], "torch": torch.__version__,
                                     "fastavatar": fastavatar.__version__}
    for dist in ("gsplat", "onnxruntime", "onnxruntime-gpu", "insightface", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
