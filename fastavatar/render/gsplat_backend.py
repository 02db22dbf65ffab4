"""The gsplat CUDA backend (``gsplat.rendering.rasterization``), loaded lazily.

Nothing here imports gsplat at module import time: ``gsplat.rendering`` is imported only when a
render is asked for on CUDA tensors, so CPU-only machines never reach gsplat's JIT build.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Tuple

import torch


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


@lru_cache(maxsize=None)
def _gsplat_check(device: torch.device) -> Tuple[bool, str]:
    try:
        from gsplat.cuda._backend import _C  # builds or loads the extension; only reached on CUDA
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"; the reason is reported
        return False, f"gsplat's CUDA extension failed to build or load: {_first_line(exc)}"
    if _C is None:
        return False, "gsplat's CUDA extension is missing and no CUDA toolkit (nvcc) was found to build it"
    try:  # a 1-Gaussian render catches extensions built for another GPU architecture or CUDA
        rasterize_gsplat(
            torch.tensor([[0.0, 0.0, 2.0]], device=device), torch.tensor([[1.0, 0.0, 0.0, 0.0]], device=device),
            torch.full((1, 3), 0.1, device=device), torch.ones(1, device=device),
            torch.zeros(1, 1, 3, device=device), torch.eye(4, device=device)[None],
            torch.tensor([[[8.0, 0.0, 4.0], [0.0, 8.0, 4.0], [0.0, 0.0, 1.0]]], device=device), 8, 8, sh_degree=0,
        )
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001
        return False, f"gsplat's CUDA extension loaded but failed to run: {_first_line(exc)}"
    return True, ""


def gsplat_status(device: torch.device) -> Tuple[bool, str]:
    """(usable, reason): True when ``device`` is CUDA, a GPU is present, gsplat's CUDA extension builds
    or loads, and a 1-Gaussian render runs. ``reason`` says why not, with the error's first line."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"gsplat needs CUDA tensors, got device {device}"
    if not torch.cuda.is_available():
        return False, "no CUDA device is available to torch"
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _gsplat_check(device)


def gsplat_usable(device: torch.device) -> bool:
    """True when gsplat can render on ``device`` (see :func:`gsplat_status`)."""
    return gsplat_status(device)[0]


def rasterize_gsplat(
    means: torch.Tensor,  # [N, 3]
    quats: torch.Tensor,  # [N, 4] wxyz
    scales: torch.Tensor,  # [N, 3] activated
    opacities: torch.Tensor,  # [N] activated
    sh: torch.Tensor,  # [N, K, 3]
    viewmats: torch.Tensor,  # [C, 4, 4]
    Ks: torch.Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    sh_degree: int = 3,
    backgrounds: Optional[torch.Tensor] = None,  # [C, 3]
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    antialiased: bool = False,
    packed: bool = False,  # True: gsplat's packed layout (False leaves gsplat's own default)
    sparse_grad: bool = False,  # True: sparse gradients (needs packed)
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gsplat RGB+ED render, rasterize_mode "classic" or (``antialiased``) "antialiased". Returns rgb [C,H,W,3], alpha [C,H,W,1], depth [C,H,W,1].

    The background is composited once, inside gsplat's kernel (``rgb + T_final * background``).
    """
    if means.device.type != "cuda":
        raise RuntimeError(f"gsplat backend needs CUDA tensors, got device {means.device}")
    from gsplat.rendering import rasterization  # lazy: never imported on CPU

    k = (sh_degree + 1) ** 2
    colors, alphas, _ = rasterization(
        means=means,
        quats=quats,
        scales=scales,
        opacities=opacities,
        colors=sh[:, :k],
        viewmats=viewmats,
        Ks=Ks,
        width=width,
        height=height,
        near_plane=near_plane,
        far_plane=far_plane,
        sh_degree=sh_degree,
        backgrounds=backgrounds,
        render_mode="RGB+ED",
        rasterize_mode="antialiased" if antialiased else "classic",
        **{k: True for k, v in (("packed", packed), ("sparse_grad", sparse_grad)) if v},
        eps2d=0.3,
    )
    return colors[..., :3], alphas, colors[..., 3:4]
