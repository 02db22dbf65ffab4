"""The gsplat CUDA backend (``gsplat.rendering.rasterization``), loaded lazily.

Nothing here imports gsplat at module import time: ``gsplat.rendering`` is imported only when a
render is asked for on CUDA tensors, so CPU-only machines never reach gsplat's JIT build.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Tuple

import torch


@lru_cache(maxsize=None)
def _gsplat_cuda_extension_ok() -> bool:
    try:
        from gsplat.cuda._backend import _C  # builds or loads the extension; only reached on CUDA
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return False
    return _C is not None


def gsplat_usable(device: torch.device) -> bool:
    """True when ``device`` is CUDA, a GPU is present and gsplat's CUDA extension loads."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return _gsplat_cuda_extension_ok()


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
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gsplat "classic" RGB+ED render. Returns rgb [C,H,W,3], alpha [C,H,W,1], depth [C,H,W,1].

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
        rasterize_mode="classic",
        eps2d=0.3,
    )
    return colors[..., :3], alphas, colors[..., 3:4]
