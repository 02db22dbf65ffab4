"""The compiled CPU rasterizer: a gsplat-style tile rasterizer written with numba, forward and backward.

Split of the work (default, ``NumbaRasterConfig.fused=True``): everything is compiled
(:mod:`._numba_kernels`), inside one ``torch.autograd.Function`` (:class:`_FusedRender`), per camera:

1. ``project_forward``: covariance from quaternion and scale, EWA projection (:mod:`.projection`'s
   maths, float64), antialiasing compensation, colours from SH; culling (near/far, det, opacity
   < 1/255) and the stable front-to-back sort by camera z (numpy) pick the drawn Gaussians;
2. bin: every Gaussian goes into the 16 x 16 pixel tiles touched by the bounding box of its
   alpha >= 1/255 ellipse; visiting Gaussians front to back makes every tile's list depth sorted;
3. forward: per tile, per pixel, composite front to back with gsplat's rules and early stop; keep
   the final transmittance and the position of the last composited pair per pixel;
4. backward: per pixel, walk back to front from the last composited pair, undoing the
   transmittance product, and accumulate d/d(means2d, conics, opacity, rgb, z) in per-chunk
   buffers that are summed at the end; then ``project_backward`` (hand-written) takes those to
   d/d(means, quats, scales, opacities, sh).
   Tiles are spread over parallel chunks (one per thread); nothing is stored per pair.

The reference path (``fused=False``, and always when the cameras require gradients) runs step 1 in
torch with autograd (:mod:`.projection`, :func:`fastavatar.core.sh.sh_to_rgb`), as
:mod:`.rasterize_torch` does, and only steps 2-4 compiled (:class:`_Composite`); tests hold the two
paths to the same images (1e-5) and gradients (1e-4 relative).

CPU tensors only; float32 or float64 (per-pair maths in the input dtype, projection in float64). The number of threads
follows ``torch.get_num_threads()`` (at most numba's ``NUMBA_NUM_THREADS``); numba's "workqueue"
thread pool is used unless ``NUMBA_THREADING_LAYER`` says otherwise.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from fastavatar.render.projection import (
    ALPHA_THRESHOLD,
    antialias_compensation,
    camera_centers,
    project_gaussians,
    quat_scale_to_covar,
)
from fastavatar.render.rasterize_torch import finish_camera, sh_to_rgb


@dataclass
class NumbaRasterConfig:
    """Knobs of the compiled CPU rasterizer."""

    # tile side in pixels: smaller tiles gather and clip each Gaussian more often, larger ones spread
    # worse over threads; 16 is gsplat's (one-thread kernel CPU time at 275x401: 8 is 10% slower, 32 4% faster)
    tile: int = 16
    # projection, antialiasing, culling, the depth sort and SH colours compiled too, with a hand-written
    # backward (:class:`_FusedRender`); False runs them in torch with autograd (the reference path).
    # Cameras that require gradients always take the torch path.
    fused: bool = True


@lru_cache(maxsize=None)
def numba_status() -> Tuple[bool, str]:
    """(usable, reason): whether numba imports (the kernels compile lazily on first use)."""
    try:
        import numba  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return False, f"numba is not importable: {first}"
    return True, ""


_announced = set()


def _kernels():
    from fastavatar.render import _numba_kernels

    return _numba_kernels


def _is_cached(dispatcher) -> bool:
    """Best effort: does numba's on-disk cache hold an index for this kernel? (numba internals)"""
    try:
        cache_dir = Path(dispatcher._cache.cache_path)
        stem = Path(dispatcher.py_func.__code__.co_filename).stem
        return any(cache_dir.glob(f"{stem}.{dispatcher.py_func.__name__}-*.nbi"))
    except Exception:  # noqa: BLE001
        return False


def _call(kernel, *args):
    """Run a kernel; the first time in a process, say in one line when it has to be compiled."""
    if not hasattr(kernel, "py_func"):  # NUMBA_DISABLE_JIT=1: plain Python functions
        return kernel(*args)
    key = (kernel.py_func.__name__, tuple(getattr(a, "dtype", None) for a in args))
    if key in _announced:
        return kernel(*args)
    _announced.add(key)
    if _is_cached(kernel):
        t0 = time.perf_counter()
        result = kernel(*args)
        misses = sum(kernel.stats.cache_misses.values())
        if misses:  # cache present but for another signature or stale: it compiled anyway
            print(f"fastavatar.render: compiled numba kernel {kernel.py_func.__name__} in "
                  f"{time.perf_counter() - t0:.1f} s (cached for later runs)", file=sys.stderr, flush=True)
        return result
    print(f"fastavatar.render: compiling numba kernel {kernel.py_func.__name__} (first use only; cached "
          f"under {getattr(kernel._cache, 'cache_path', 'the numba cache')})", file=sys.stderr, flush=True)
    return kernel(*args)


def _threads() -> int:
    import numba

    if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
        # numba's own thread pool: its OpenMP layer would start a second OpenMP runtime beside torch's,
        # whose idle threads spin and take the cores from the other one (measured: several times slower)
        numba.config.THREADING_LAYER = "workqueue"
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


class _Composite(torch.autograd.Function):
    """Tile compositing of one camera. See the module docstring."""

    @staticmethod
    def forward(ctx, means2d, conics, opacities, feats, covars2d, width: int, height: int, tile: int):
        # means2d [G, 2], conics [G, 3], opacities [G], feats [G, 4] (rgb, z), covars2d [G, 3] (no grad);
        # Gaussians culled and sorted front to back. Returns out [H, W, 4], t_final [H, W].
        k = _kernels()
        arrays = [t.detach().contiguous().numpy() for t in (means2d, conics, opacities, feats)]
        n_chunks = _threads()
        offsets, ids = _call(k.bin_tiles, arrays[0], covars2d.detach().contiguous().numpy(), arrays[2],
                             width, height, tile)
        out = torch.empty(height, width, 4, dtype=means2d.dtype)
        t_final = torch.empty(height, width, dtype=means2d.dtype)
        n_used = torch.empty(height, width, dtype=torch.int32)
        _call(k.composite_forward, *arrays, offsets, ids, width, height, tile, n_chunks,
              out.numpy(), t_final.numpy(), n_used.numpy())
        ctx.raster = (arrays, offsets, ids, width, height, tile, t_final.numpy(), n_used.numpy())
        return out, t_final

    @staticmethod
    def backward(ctx, g_out, g_tfinal):
        arrays, offsets, ids, width, height, tile, t_final, n_used = ctx.raster
        dtype = torch.from_numpy(arrays[0][:0]).dtype
        g_out = g_out.to(dtype).contiguous().numpy()
        g_tfinal = g_tfinal.to(dtype).contiguous().numpy()
        grads = _call(_kernels().composite_backward, *arrays, offsets, ids, width, height, tile, _threads(),
                      t_final, n_used, g_out, g_tfinal)
        grads = torch.from_numpy(grads).to(dtype)
        return grads[:, 0:2], grads[:, 2:5], grads[:, 5], grads[:, 6:10], None, None, None, None


def _camera_params(viewmat: torch.Tensor, K: torch.Tensor, width: int, height: int, near: float, far: float):
    """float64 numpy (rc [3, 3], tc [3], centre [3], cam [N_CAM]) of one camera for the fused kernels."""
    v = viewmat.detach().double().cpu()
    k = K.detach().double().cpu()
    rc, tc = v[:3, :3], v[:3, 3]
    fx, fy, cx, cy = (float(k[0, 0]), float(k[1, 1]), float(k[0, 2]), float(k[1, 2]))
    # the Jacobian's clamp of the camera-space mean to 1.3x the field of view (projection.project_gaussians)
    cam = [fx, fy, cx, cy,
           cx / fx + 0.3 * (0.5 * width / fx), (width - cx) / fx + 0.3 * (0.5 * width / fx),
           cy / fy + 0.3 * (0.5 * height / fy), (height - cy) / fy + 0.3 * (0.5 * height / fy),
           near, far, 0.3]
    centre = -(rc.t() @ tc)
    return (rc.contiguous().numpy(), tc.contiguous().numpy(), centre.contiguous().numpy(),
            torch.tensor(cam, dtype=torch.float64).numpy())


class _FusedRender(torch.autograd.Function):
    """All cameras, compiled end to end: per camera :func:`._numba_kernels.project_forward` (projection,
    antialiasing, colours), culling and the stable depth sort (numpy), binning, compositing and the
    final images (:func:`._numba_kernels.finish_forward`: background, alpha, normalised depth); the
    backward runs the same steps' backward kernels in reverse order."""

    @staticmethod
    def forward(ctx, means, quats, scales, opacities, sh, backgrounds, viewmats, Ks, width: int, height: int,
                sh_degree: int, near: float, far: float, antialiased: bool, tile: int):
        # means [N, 3], quats [N, 4], scales [N, 3], opacities [N], sh [N, K, 3]; backgrounds [C, 3] or None;
        # viewmats [C, 4, 4], Ks [C, 3, 3]. Returns rgb [C, H, W, 3], alpha [C, H, W, 1], depth [C, H, W, 1].
        k = _kernels()
        dtype = means.dtype
        inputs = [t.detach().contiguous().numpy() for t in (means, quats, scales, opacities, sh)]
        n = means.shape[0]
        n_chunks = _threads()
        n_cams = viewmats.shape[0]
        if backgrounds is None:
            bgs = np.zeros((n_cams, 3), inputs[0].dtype)
        else:
            bgs = backgrounds.detach().to(dtype).contiguous().numpy()
        rgb = torch.empty(n_cams, height, width, 3, dtype=dtype)
        alpha = torch.empty(n_cams, height, width, 1, dtype=dtype)
        depth = torch.empty(n_cams, height, width, 1, dtype=dtype)
        # sort keys: camera z computed exactly as projection.project_gaussians does (same op, same rounding),
        # so that Gaussians at (nearly) equal depth are drawn in the same order as by the torch paths
        with torch.no_grad():
            depth_keys = (torch.einsum("cij,nj->cni", viewmats[:, :3, :3], means)
                          + viewmats[:, None, :3, 3])[..., 2].contiguous().numpy()
        saved = []
        for c in range(n_cams):
            camera = _camera_params(viewmats[c], Ks[c], width, height, near, far)
            means2d = np.empty((n, 2), inputs[0].dtype)
            conics = np.empty((n, 3), inputs[0].dtype)
            covars2d = np.empty((n, 3), inputs[0].dtype)
            opac = np.empty(n, inputs[0].dtype)
            feats = np.empty((n, 4), inputs[0].dtype)
            keep = np.empty(n, np.bool_)
            _call(k.project_forward, *inputs, *camera, sh_degree, antialiased, n_chunks,
                  means2d, conics, covars2d, opac, feats, keep)
            cand = np.flatnonzero(keep)
            sel = cand[np.argsort(depth_keys[c, cand], kind="stable")]  # front to back, ties by index (as torch)
            arrays = [np.ascontiguousarray(a[sel]) for a in (means2d, conics, opac, feats)]
            offsets, ids = _call(k.bin_tiles, arrays[0], np.ascontiguousarray(covars2d[sel]), arrays[2],
                                 width, height, tile)
            out = np.empty((height, width, 4), inputs[0].dtype)
            t_final = np.empty((height, width), inputs[0].dtype)
            n_used = np.empty((height, width), np.int32)
            _call(k.composite_forward, *arrays, offsets, ids, width, height, tile, n_chunks, out, t_final, n_used)
            _call(k.finish_forward, out, t_final, bgs[c], rgb[c].numpy(), alpha[c].numpy(), depth[c].numpy())
            saved.append((camera, sel, arrays, offsets, ids, out, t_final, n_used))
        ctx.fused = (inputs, bgs, saved, width, height, sh_degree, antialiased, tile)
        return rgb, alpha, depth

    @staticmethod
    def backward(ctx, g_rgb, g_alpha, g_depth):
        inputs, bgs, saved, width, height, sh_degree, antialiased, tile = ctx.fused
        k = _kernels()
        n_chunks = _threads()
        # gradients accumulate over cameras in the input dtype (each camera adds one term per Gaussian)
        g_means, g_quats, g_scales, g_opac, g_sh = (np.zeros(a.shape, a.dtype) for a in inputs)
        g_bg = np.zeros((len(saved), 3))
        # numpy conversions (one thread) rather than torch ops: cheaper for these sizes, and they never
        # wait at an OpenMP barrier for a busy core (cotangents of sums arrive as stride-0 views)
        np_dtype = inputs[0].dtype
        g_rgb, g_alpha, g_depth = (np.ascontiguousarray(g.detach().numpy(), dtype=np_dtype)
                                   for g in (g_rgb, g_alpha, g_depth))
        g_out = np.empty((height, width, 4), inputs[0].dtype)
        g_tfinal = np.empty((height, width), inputs[0].dtype)
        g_bg_rows = np.empty((height, 3))
        for c, (camera, sel, arrays, offsets, ids, out, t_final, n_used) in enumerate(saved):
            _call(k.finish_backward, out, t_final, bgs[c], g_rgb[c], g_alpha[c], g_depth[c], g_out, g_tfinal,
                  g_bg_rows)
            g_bg[c] = g_bg_rows.sum(0)
            if sel.shape[0] == 0:
                continue
            grads = _call(k.composite_backward, *arrays, offsets, ids, width, height, tile, n_chunks,
                          t_final, n_used, g_out, g_tfinal)
            _call(k.project_backward, *inputs, *camera, sh_degree, antialiased, n_chunks, sel, grads,
                  g_means, g_quats, g_scales, g_opac, g_sh)
        grads = [torch.from_numpy(g) for g in (g_means, g_quats, g_scales, g_opac, g_sh)]
        g_backgrounds = torch.from_numpy(g_bg.astype(np_dtype)) if ctx.needs_input_grad[5] else None
        return (*grads, g_backgrounds, None, None, None, None, None, None, None, None, None)


def rasterize_numba(
    means: torch.Tensor,  # [N, 3]
    quats: torch.Tensor,  # [N, 4] unit wxyz
    scales: torch.Tensor,  # [N, 3] activated
    opacities: torch.Tensor,  # [N] activated 0..1
    sh: torch.Tensor,  # [N, K, 3]
    viewmats: torch.Tensor,  # [C, 4, 4] world-to-camera
    Ks: torch.Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    sh_degree: int = 3,
    backgrounds: Optional[torch.Tensor] = None,  # [C, 3]
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    antialiased: bool = False,
    config: Optional[NumbaRasterConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as :func:`fastavatar.render.rasterize_torch.rasterize_torch` (CPU tensors only)."""
    if means.device.type != "cpu":
        raise RuntimeError(f"the numba render backend runs on CPU tensors, got device {means.device}")
    if means.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"the numba render backend needs float32 or float64 tensors, got {means.dtype}")
    cfg = config or NumbaRasterConfig()
    if cfg.fused and not (viewmats.requires_grad or Ks.requires_grad):
        return _FusedRender.apply(means, quats, scales, opacities, sh, backgrounds, viewmats, Ks, width, height,
                                  sh_degree, near_plane, far_plane, antialiased, cfg.tile)
    covars = quat_scale_to_covar(quats, scales)
    proj = project_gaussians(means, covars, viewmats, Ks, width, height, near_plane=near_plane, far_plane=far_plane)
    centres = camera_centers(viewmats)
    rgbs, alphas, depths = [], [], []
    for cam in range(viewmats.shape[0]):
        opac = opacities
        if antialiased:
            opac = opacities * antialias_compensation(proj.covars2d[cam])
        with torch.no_grad():
            cand = torch.nonzero(proj.valid[cam] & (opac >= ALPHA_THRESHOLD)).squeeze(1)
            sel = cand.index_select(0, torch.argsort(proj.depths[cam].index_select(0, cand), stable=True))
        colors = sh_to_rgb(sh_degree, means.index_select(0, sel) - centres[cam], sh.index_select(0, sel))
        feats = torch.cat([colors, proj.depths[cam].index_select(0, sel)[:, None]], 1)  # [G, 4]
        out, t_final = _Composite.apply(
            proj.means2d[cam].index_select(0, sel),
            proj.conics[cam].index_select(0, sel),
            opac.index_select(0, sel),
            feats,
            proj.covars2d[cam].index_select(0, sel),
            width,
            height,
            cfg.tile,
        )
        rgb, alpha, depth = finish_camera(out, t_final[..., None], None if backgrounds is None else backgrounds[cam])
        rgbs.append(rgb)
        alphas.append(alpha)
        depths.append(depth)
    return torch.stack(rgbs), torch.stack(alphas), torch.stack(depths)
