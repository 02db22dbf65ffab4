"""Differentiable Gaussian-splat rendering: splats + cameras -> RGB, alpha and depth.

Backends (all render the same image, gsplat "classic" semantics, or "antialiased" with ``antialiased=True``):
- ``"gsplat"``: gsplat's CUDA ``rasterization`` (imported lazily, CUDA tensors only). Asked for
  explicitly, it fails with the reason when gsplat cannot build or run; it never falls back.
- ``"numba"``: our compiled CPU tile rasterizer (:mod:`.rasterize_numba`, needs the numba package).
- ``"torch"``: our sparse rasterizer in plain PyTorch (:mod:`.rasterize_torch`), CPU or GPU.
- ``"reference"``: a dense pixels x Gaussians composite (:mod:`.reference`), tiny images only.
- ``"auto"``: on CUDA gsplat; on CPU numba. When that one is unusable, ``auto`` says so once, in one
  line with the reason (for gsplat, the first line of its build or run error), and uses ``"torch"``.

Output conventions (:class:`RenderOutput`):
- ``rgb = sum_i c_i a_i T_i + T_final * background`` (background composited exactly once),
  colours from SH (``max(0, SH(mean - camera centre) + 0.5)``), ``a_i = min(0.999, o_i exp(-sigma_i))``,
  pairs with ``a_i < 1/255`` skipped, 2D covariance dilated by 0.3 px^2, a pixel stops before the pair
  that would take its transmittance to <= 1e-4 (as gsplat).
- ``antialiased=True`` (gsplat's ``rasterize_mode="antialiased"``): each opacity is multiplied, per
  camera, by ``sqrt(det(cov2d) / det(cov2d + 0.3 I))`` (cov2d before the dilation), so that small
  Gaussians do not grow brighter when the dilation widens them.
- ``alpha = 1 - T_final``.
- ``depth`` is the **normalised expected camera-z** (gsplat "ED"): ``sum_i z_i a_i T_i / max(alpha, 1e-10)``;
  multiply by ``alpha`` for the un-normalised sum. It is 0 where nothing was drawn.

Importing this package never needs CUDA and never imports ``gsplat.rendering``.
"""

from __future__ import annotations

import sys
from typing import NamedTuple, Optional, Sequence, Union

import torch

from fastavatar.render.rasterize_numba import NumbaRasterConfig
from fastavatar.render.rasterize_torch import TorchRasterConfig

__all__ = ["NumbaRasterConfig", "RenderOutput", "TorchRasterConfig", "rasterize", "render_splats", "resolve_backend"]

BACKENDS = ("auto", "numba", "torch", "gsplat", "reference")
_said = set()  # fallback notices already printed (once per process)


class RenderOutput(NamedTuple):
    """Rendered views; C cameras, H x W pixels."""

    rgb: torch.Tensor  # [C, H, W, 3] composited on the background
    alpha: torch.Tensor  # [C, H, W, 1] 1 - final transmittance
    depth: torch.Tensor  # [C, H, W, 1] normalised expected z (gsplat "ED"), 0 where alpha = 0


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        print(message, file=sys.stderr, flush=True)


def resolve_backend(backend: str, device: Union[str, torch.device]) -> str:
    """Map ``"auto"`` to a concrete backend for ``device`` (see the module docstring); check that an
    explicitly named backend can run there (a clear RuntimeError when it cannot, never a fallback)."""
    if backend not in BACKENDS:
        raise ValueError(f"render backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "gsplat":
        from fastavatar.render.gsplat_backend import gsplat_status

        ok, reason = gsplat_status(device)
        if not ok:
            raise RuntimeError(f"render backend 'gsplat' is not usable: {reason}")
        return backend
    if backend == "numba":
        from fastavatar.render.rasterize_numba import numba_status

        if device.type != "cpu":
            raise RuntimeError(f"render backend 'numba' runs on CPU tensors, got device {device}")
        ok, reason = numba_status()
        if not ok:
            raise RuntimeError(f"render backend 'numba' is not usable: {reason} (pip install numba)")
        return backend
    if backend != "auto":
        return backend
    if device.type == "cuda":
        from fastavatar.render.gsplat_backend import gsplat_status

        ok, reason = gsplat_status(device)
        if ok:
            return "gsplat"
        _say_once(f"fastavatar.render: gsplat is not usable ({reason}); falling back to the (slower) torch rasterizer")
        return "torch"
    if device.type == "cpu":
        from fastavatar.render.rasterize_numba import numba_status

        ok, reason = numba_status()
        if ok:
            return "numba"
        _say_once(f"fastavatar.render: compiled CPU rasterizer unavailable ({reason}); using the torch "
                  "rasterizer (pip install numba for a faster one)")
    return "torch"


def rasterize(
    means: torch.Tensor,  # [N, 3]
    quats: torch.Tensor,  # [N, 4] unit wxyz
    scales: torch.Tensor,  # [N, 3] activated (standard deviations)
    opacities: torch.Tensor,  # [N] activated, 0..1
    sh: torch.Tensor,  # [N, K, 3] SH coefficients, K >= (sh_degree + 1)^2
    viewmats: torch.Tensor,  # [C, 4, 4] world-to-camera (OpenCV)
    Ks: torch.Tensor,  # [C, 3, 3] pixels
    width: int,
    height: int,
    *,
    sh_degree: int = 3,
    backgrounds: Optional[torch.Tensor] = None,  # [C, 3]; None = black (premultiplied output)
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    backend: str = "auto",
    antialiased: bool = False,
    packed: bool = False,  # gsplat only: packed (sparse) intermediate layout; the CPU backends have none
    sparse_grad: bool = False,  # gsplat only (needs packed): sparse gradients of the Gaussian tensors
    torch_config: Optional[TorchRasterConfig] = None,
    numba_config: Optional[NumbaRasterConfig] = None,
) -> RenderOutput:
    """Render activated Gaussians into C cameras. Differentiable w.r.t. all Gaussian inputs."""
    n = means.shape[0]
    if not 0 <= sh_degree <= 3:
        raise ValueError(f"rasterize: sh_degree must be 0..3, got {sh_degree}")
    if sh.dim() != 3 or sh.shape[0] != n or sh.shape[2] != 3 or sh.shape[1] < (sh_degree + 1) ** 2:
        raise ValueError(f"rasterize: sh has shape {tuple(sh.shape)}, need ({n}, >={(sh_degree + 1) ** 2}, 3)")
    if viewmats.dim() != 3 or viewmats.shape[1:] != (4, 4) or Ks.shape != (viewmats.shape[0], 3, 3):
        raise ValueError(
            f"rasterize: viewmats {tuple(viewmats.shape)} / Ks {tuple(Ks.shape)} must be [C,4,4] / [C,3,3]"
        )
    if backgrounds is not None:
        backgrounds = backgrounds.to(means).expand(viewmats.shape[0], 3)
    kind = resolve_backend(backend, means.device)
    args = (means, quats, scales, opacities, sh, viewmats, Ks, width, height)
    kwargs = dict(sh_degree=sh_degree, backgrounds=backgrounds, near_plane=near_plane, far_plane=far_plane,
                  antialiased=antialiased)
    if kind == "numba":
        from fastavatar.render.rasterize_numba import rasterize_numba

        rgb, alpha, depth = rasterize_numba(*args, **kwargs, config=numba_config)
    elif kind == "torch":
        from fastavatar.render.rasterize_torch import rasterize_torch

        rgb, alpha, depth = rasterize_torch(*args, **kwargs, config=torch_config)
    elif kind == "gsplat":
        from fastavatar.render.gsplat_backend import rasterize_gsplat

        rgb, alpha, depth = rasterize_gsplat(*args, **kwargs, packed=packed, sparse_grad=sparse_grad)
    else:
        from fastavatar.render.reference import rasterize_reference

        rgb, alpha, depth = rasterize_reference(*args, **kwargs)
    return RenderOutput(rgb=rgb, alpha=alpha, depth=depth)


def render_splats(
    splats: dict,
    c2w: torch.Tensor,  # [C, 4, 4] or [4, 4] camera-to-world (OpenCV)
    Ks: torch.Tensor,  # [C, 3, 3] or [3, 3]
    width: int,
    height: int,
    *,
    sh_degree: int = 3,
    background: Union[Sequence[float], torch.Tensor, None] = (1.0, 1.0, 1.0),  # [3] or [C, 3]; None = black
    backend: str = "auto",
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    antialiased: bool = False,
    packed: bool = False,
    sparse_grad: bool = False,
    torch_config: Optional[TorchRasterConfig] = None,
    numba_config: Optional[NumbaRasterConfig] = None,
) -> RenderOutput:
    """Render RAW splats (see :mod:`fastavatar.core.splats`; activated here) from c2w cameras."""
    from fastavatar.core.cameras import c2w_to_w2c
    from fastavatar.core.splats import activate

    act = activate(splats)
    means = act["means"]
    c2w = c2w.to(means)
    Ks = Ks.to(means)
    if c2w.dim() == 2:
        c2w = c2w[None]
    if Ks.dim() == 2:
        Ks = Ks[None].expand(c2w.shape[0], 3, 3)
    backgrounds = None
    if background is not None:
        backgrounds = torch.as_tensor(background, dtype=means.dtype, device=means.device).expand(c2w.shape[0], 3)
    return rasterize(
        means,
        act["quats"],
        act["scales"],
        act["opacities"],
        act["sh"],
        c2w_to_w2c(c2w),
        Ks,
        width,
        height,
        sh_degree=sh_degree,
        backgrounds=backgrounds,
        near_plane=near_plane,
        far_plane=far_plane,
        backend=backend,
        antialiased=antialiased,
        packed=packed,
        sparse_grad=sparse_grad,
        torch_config=torch_config,
        numba_config=numba_config,
    )
