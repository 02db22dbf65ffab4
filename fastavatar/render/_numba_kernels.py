"""numba kernels of the compiled CPU rasterizer (imported only when numba is installed).

Pure NumPy-array code, no torch. The torch glue, the autograd Function and the conventions are in
:mod:`fastavatar.render.rasterize_numba`; the per-pair rules below are the ones documented at the top
of :mod:`fastavatar.render` (alpha clamp 0.999, pairs with alpha < 1/255 skipped, a pixel stops before
the pair that would take its transmittance to <= 1e-4).

Layout: G projected Gaussians, already culled and sorted front to back by camera z; images are
row-major ``[H, W, ...]``; square tiles of ``tile`` pixels, ``n_tx`` columns of tiles, tile ``t`` covers
columns ``(t % n_tx) * tile ...`` and rows ``(t // n_tx) * tile ...``. Within a tile, pixels are one flat
row-major run ``p = (y - y0) * nx + (x - x0)`` and every per-pixel state is its own 1-D array.

Speed (SIMD): for each (Gaussian, tile) the composite visits ONE contiguous run of tile pixels, from
the first to the last pixel of the Gaussian's cut-off bounding box within the tile, with a branch-free
loop body (masks and selects, no early ``continue``), so that LLVM vectorises it (8 or 16 float32 lanes).
Pixels of the run outside the ellipse fail the per-pixel alpha test like any other; only the per-pixel
test decides what is drawn. Per-pair maths runs in the input dtype: float32 inputs use a vectorisable
polynomial ``exp`` (:func:`exp_neg`, 1e-7 relative) and float32 tile state; float64 inputs use
``math.exp`` and float64 state (the tight reference). Per-Gaussian gradient sums are float64.

All kernels are compiled on first use and cached on disk (``cache=True``).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
from numba import types
from numba.extending import overload

ALPHA_THRESHOLD = 1.0 / 255.0
MAX_ALPHA = 0.999
T_EPS = 1e-4
# the bounding box is widened by this factor and margin, so that float rounding in the per-pixel
# alpha test can never accept a pixel outside its tile range (the per-pixel test decides)
_BOX_WIDEN = 1.0001
_BOX_MARGIN = 1e-3
# number of gradient channels per Gaussian: d/d(mean x, mean y, conic a, b, c, opacity, 4 features)
N_GRAD = 10
# flags that let LLVM vectorise the pixel loops and their sums (reassociation); no finite-math or
# approximate-function assumptions, so comparisons and NaN handling keep their IEEE meaning
_FASTMATH = {"nsz", "contract", "reassoc"}

# float32 constants of the per-pixel loops (a float64 literal would promote float32 maths to float64)
_F = np.float32
_THR = _F(ALPHA_THRESHOLD)
_MAXA = _F(MAX_ALPHA)
_TEPS = _F(T_EPS)
_ZERO = _F(0.0)
_ONE = _F(1.0)
_HALF = _F(0.5)
# exp(-s) for float32: s = n ln2 + r, exp(-s) = 2^-n exp(-r), exp(-r) by a degree-7 Taylor polynomial
# about r = ln2 / 2 (|r - ln2/2| <= 0.35: truncation 5e-9; measured 1.0e-7 relative on [0, 12])
_LOG2E = _F(1.4426950408889634)
_LN2_HI = _F(0.693145751953125)  # ln2 = _LN2_HI + _LN2_LO (Cody-Waite: n * _LN2_HI is exact)
_LN2_LO = _F(1.428606765330187e-06)
_HALF_LN2 = _F(0.34657359027997264)
_EXP_C = tuple(_F(math.exp(-0.34657359027997264) * (-1.0) ** j / math.factorial(j)) for j in range(8))
_C0, _C1, _C2, _C3, _C4, _C5, _C6, _C7 = _EXP_C
_S_MAX = _F(30.0)  # exp(-s) for s > 30 is returned as exp(-30): far below any alpha that is drawn


def exp_neg(s):
    """exp(-s) for s >= 0: ``math.exp`` in float64; in float32 (numba) the vectorisable polynomial."""
    return math.exp(-s)


def _exp_neg_f32(s):
    s = min(max(s, _ZERO), _S_MAX)
    n = np.int32(s * _LOG2E)  # floor (s >= 0)
    fn = _F(n)
    r = (s - fn * _LN2_HI) - fn * _LN2_LO - _HALF_LN2
    q = _C7
    q = q * r + _C6
    q = q * r + _C5
    q = q * r + _C4
    q = q * r + _C3
    q = q * r + _C2
    q = q * r + _C1
    q = q * r + _C0
    return q / _F(np.int32(1) << n)


@overload(exp_neg, inline="always", fastmath=_FASTMATH)
def _exp_neg_overload(s):
    if s == types.float32:
        return _exp_neg_f32
    return lambda s: math.exp(-s)


@nb.njit(cache=True)
def bin_tiles(means2d, covars2d, opacities, width, height, tile):
    """Tile lists of G depth-sorted Gaussians.

    means2d [G, 2], covars2d [G, 3] (dilated xx, xy, yy), opacities [G] (>= 1/255).
    A Gaussian goes into every tile its alpha >= 1/255 ellipse's bounding box touches:
    ``o exp(-sigma) >= 1/255  <=>  d^T Sigma^-1 d <= 2 log(255 o)``, whose x half-extent is
    ``sqrt(2 log(255 o) Sigma_xx)``. Gaussians are visited front to back, so each list comes out
    depth sorted (a stable bucket sort, the same order as gsplat's per-tile sort by depth).
    Returns (offsets [n_tiles + 1] int64, ids [offsets[-1]] int32): tile t holds ids[offsets[t]:offsets[t+1]].
    """
    n_g = means2d.shape[0]
    n_tx = (width + tile - 1) // tile
    n_ty = (height + tile - 1) // tile
    n_tiles = n_tx * n_ty
    rect = np.zeros((n_g, 4), np.int64)  # tile x0, x1, y0, y1 (inclusive); x1 = y1 = -1 when not drawn
    counts = np.zeros(n_tiles + 1, np.int64)
    for g in range(n_g):
        level = math.log(255.0 * opacities[g])
        rect[g, 1] = -1
        rect[g, 3] = -1
        if not level >= 0.0:
            continue
        hx = math.sqrt(2.0 * level * covars2d[g, 0]) * _BOX_WIDEN + _BOX_MARGIN
        hy = math.sqrt(2.0 * level * covars2d[g, 2]) * _BOX_WIDEN + _BOX_MARGIN
        mx = means2d[g, 0]
        my = means2d[g, 1]
        # pixel j (centre j + 0.5) is inside when |j + 0.5 - m| <= h
        x_lo = max(math.ceil(mx - hx - 0.5), 0.0)
        x_hi = min(math.floor(mx + hx - 0.5), width - 1.0)
        y_lo = max(math.ceil(my - hy - 0.5), 0.0)
        y_hi = min(math.floor(my + hy - 0.5), height - 1.0)
        if not (x_lo <= x_hi and y_lo <= y_hi):
            continue
        tx0 = int(x_lo) // tile
        tx1 = int(x_hi) // tile
        ty0 = int(y_lo) // tile
        ty1 = int(y_hi) // tile
        rect[g, 0] = tx0
        rect[g, 1] = tx1
        rect[g, 2] = ty0
        rect[g, 3] = ty1
        for ty in range(ty0, ty1 + 1):
            for tx in range(tx0, tx1 + 1):
                counts[ty * n_tx + tx + 1] += 1
    offsets = np.cumsum(counts)
    fill = offsets[:-1].copy()
    ids = np.empty(offsets[-1], np.int32)
    for g in range(n_g):
        for ty in range(rect[g, 2], rect[g, 3] + 1):
            for tx in range(rect[g, 0], rect[g, 1] + 1):
                t = ty * n_tx + tx
                ids[fill[t]] = g
                fill[t] += 1
    return offsets, ids


@nb.njit(cache=True)
def _gather(means2d, conics, opacities, feats, ids, start, end):
    """One tile's Gaussians as contiguous blocks: pv [n, 6] (input dtype) = mean x, mean y, a/2, b, c/2,
    opacity; ext [n, 2] float64 = x and y half-extents of the cut-off ellipse (see :func:`_span`);
    ft [n, 4] (input dtype) = features."""
    n = end - start
    pv = np.empty((n, 6), means2d.dtype)
    ext = np.empty((n, 2), np.float64)
    ft = np.empty((n, 4), feats.dtype)
    for k in range(n):
        g = ids[start + k]
        a = float(conics[g, 0])
        b = float(conics[g, 1])
        c = float(conics[g, 2])
        pv[k, 0] = means2d[g, 0]
        pv[k, 1] = means2d[g, 1]
        pv[k, 2] = 0.5 * a
        pv[k, 3] = b
        pv[k, 4] = 0.5 * c
        pv[k, 5] = opacities[g]
        # alpha >= 1/255 <=> d^T conic d <= 2 log(255 o); the ellipse's half-extents are
        # sqrt(2 level cov_xx), sqrt(2 level cov_yy) with cov = conic^-1 (level widened against rounding)
        level = max(math.log(255.0 * float(opacities[g])) * _BOX_WIDEN + 1e-6, 0.0)
        inv_det = 1.0 / max(a * c - b * b, 1e-30)
        ext[k, 0] = math.sqrt(2.0 * level * c * inv_det) * _BOX_WIDEN + _BOX_MARGIN
        ext[k, 1] = math.sqrt(2.0 * level * a * inv_det) * _BOX_WIDEN + _BOX_MARGIN
        for j in range(4):
            ft[k, j] = feats[g, j]
    return pv, ext, ft


@nb.njit(cache=True, inline="always")
def _span(pv, ext, k, x0, y0, x1, y1, nx):
    """Flat run [q0, q1) of tile pixels from the first to the last pixel of Gaussian k's cut-off bounding
    box inside the tile (pixel j, centre j + 0.5, is inside when |j + 0.5 - mean| <= half-extent);
    (0, 0) when the box misses the tile."""
    mx = float(pv[k, 0])
    my = float(pv[k, 1])
    x_lo = max(math.ceil(mx - ext[k, 0] - 0.5), x0)
    x_hi = min(math.floor(mx + ext[k, 0] - 0.5), x1 - 1)
    y_lo = max(math.ceil(my - ext[k, 1] - 0.5), y0)
    y_hi = min(math.floor(my + ext[k, 1] - 0.5), y1 - 1)
    if x_lo > x_hi or y_lo > y_hi:
        return 0, 0
    return (y_lo - y0) * nx + (x_lo - x0), (y_hi - y0) * nx + (x_hi - x0) + 1


@nb.njit(cache=True)
def _tile_centres(x0, y0, nx, npix, dtype_like):
    """Pixel-centre coordinates px, py [npix] of a tile's flat pixels (dtype of ``dtype_like``)."""
    px = np.empty(npix, dtype_like.dtype)
    py = np.empty(npix, dtype_like.dtype)
    for p in range(npix):
        px[p] = (x0 + p % nx) + 0.5
        py[p] = (y0 + p // nx) + 0.5
    return px, py


@nb.njit(cache=True, inline="always", fastmath=_FASTMATH)
def _forward_run(trans, acc0, acc1, acc2, acc3, used, live, px, py, mx, my, ha, b, hc, o, f0, f1, f2, f3, kk):
    """Composite one Gaussian over one run of pixels (all arrays are views of the run, length m).

    Branch-free: ``draw`` pixels take ``w = alpha T``; a live pixel whose pair would take T to <= 1e-4
    stops (``live = 0``) and stays stopped. Returns the number of pixels that stopped here."""
    n_stop = 0
    for i in range(trans.shape[0]):
        dx = mx - px[i]
        dy = my - py[i]
        sigma = (ha * dx + b * dy) * dx + hc * dy * dy
        alpha = min(_MAXA, o * exp_neg(sigma))
        tp = trans[i]
        nt = tp * (_ONE - alpha)
        ok = (sigma >= _ZERO) & (alpha >= _THR) & (live[i] != 0)
        draw = ok & (nt > _TEPS)
        stop = ok & (nt <= _TEPS)
        w = alpha * tp if draw else _ZERO
        acc0[i] += w * f0
        acc1[i] += w * f1
        acc2[i] += w * f2
        acc3[i] += w * f3
        trans[i] = nt if draw else tp
        used[i] = kk if draw else used[i]
        live[i] = 0 if stop else live[i]
        n_stop += 1 if stop else 0
    return n_stop


@nb.njit(parallel=True, cache=True, fastmath=_FASTMATH)
def composite_forward(means2d, conics, opacities, feats, offsets, ids, width, height, tile, n_chunks,
                      out, t_final, n_used):
    """Front-to-back compositing, one tile at a time, tiles spread over ``n_chunks`` parallel chunks.

    Inputs as :func:`bin_tiles`, plus conics [G, 3] (a, b, c: ``sigma = a dx^2/2 + b dx dy + c dy^2/2``,
    ``d = mean - pixel centre``) and feats [G, 4] (rgb, z). Within a tile, Gaussians are visited front
    to back, each over its run of pixels (:func:`_span`, :func:`_forward_run`); each pixel keeps its
    running transmittance and stops (gsplat's rule) independently; the tile stops when all its pixels have.
    Writes out [H, W, 4] (sum_i w_i feats_i), t_final [H, W] (final transmittance) and n_used [H, W]
    int32 (1 + list position of the last pair composited; 0 when none) for the backward pass.
    """
    n_tx = (width + tile - 1) // tile
    n_tiles = offsets.shape[0] - 1
    for chunk in nb.prange(n_chunks):
        for t in range(chunk, n_tiles, n_chunks):  # interleaved: every chunk gets centre and border tiles
            x0 = (t % n_tx) * tile
            y0 = (t // n_tx) * tile
            x1 = min(x0 + tile, width)
            y1 = min(y0 + tile, height)
            nx = x1 - x0
            npix = (y1 - y0) * nx
            start = offsets[t]
            end = offsets[t + 1]
            trans = np.ones(npix, means2d.dtype)
            acc0 = np.zeros(npix, means2d.dtype)
            acc1 = np.zeros(npix, means2d.dtype)
            acc2 = np.zeros(npix, means2d.dtype)
            acc3 = np.zeros(npix, means2d.dtype)
            used = np.zeros(npix, np.int32)
            live = np.ones(npix, np.int32)
            alive = npix
            if end > start:
                px, py = _tile_centres(x0, y0, nx, npix, means2d)
                pv, ext, ft = _gather(means2d, conics, opacities, feats, ids, start, end)
                for k in range(end - start):
                    if alive == 0:
                        break
                    q0, q1 = _span(pv, ext, k, x0, y0, x1, y1, nx)
                    if q0 >= q1:
                        continue
                    alive -= _forward_run(trans[q0:q1], acc0[q0:q1], acc1[q0:q1], acc2[q0:q1], acc3[q0:q1],
                                          used[q0:q1], live[q0:q1], px[q0:q1], py[q0:q1], pv[k, 0], pv[k, 1],
                                          pv[k, 2], pv[k, 3], pv[k, 4], pv[k, 5], ft[k, 0], ft[k, 1], ft[k, 2],
                                          ft[k, 3], np.int32(k + 1))
            for y in range(y0, y1):
                for x in range(x0, x1):
                    p = (y - y0) * nx + (x - x0)
                    out[y, x, 0] = acc0[p]
                    out[y, x, 1] = acc1[p]
                    out[y, x, 2] = acc2[p]
                    out[y, x, 3] = acc3[p]
                    t_final[y, x] = trans[p]
                    n_used[y, x] = used[p]


@nb.njit(cache=True, inline="always", fastmath=_FASTMATH)
def _backward_run(trans, last, gtt, go0, go1, go2, go3, be0, be1, be2, be3, px, py, k, mx, my, ha, b, hc, o,
                  f0, f1, f2, f3):
    """Undo one Gaussian over one run of pixels (back to front) and sum its gradient over them.

    Per pixel (only where this pair was composited: ``k < last``, alpha >= 1/255): T <- T / (1 - alpha),
    ``d out / d alpha = T f - behind / (1 - alpha)`` and ``d T_final / d alpha = -T_final / (1 - alpha)``.
    Returns sums over the run of w * dL/dout (4), dL/d opacity, and dL/d sigma times dx, dy, dx^2, dx dy, dy^2.
    """
    s_w0 = _ZERO
    s_w1 = _ZERO
    s_w2 = _ZERO
    s_w3 = _ZERO
    s_o = _ZERO
    sx = _ZERO
    sy = _ZERO
    sxx = _ZERO
    sxy = _ZERO
    syy = _ZERO
    for i in range(trans.shape[0]):
        dx = mx - px[i]
        dy = my - py[i]
        sigma = (ha * dx + b * dy) * dx + hc * dy * dy
        vis = exp_neg(sigma)
        raw = o * vis
        alpha = min(_MAXA, raw)
        ok = (k < last[i]) & (sigma >= _ZERO) & (alpha >= _THR)
        inv = _ONE / (_ONE - alpha)
        tp = trans[i]
        tr = tp * inv  # transmittance in front of this pair
        w = alpha * tr if ok else _ZERO
        trans[i] = tr if ok else tp
        g0 = go0[i]
        g1 = go1[i]
        g2 = go2[i]
        g3 = go3[i]
        b0 = be0[i]
        b1 = be1[i]
        b2 = be2[i]
        b3 = be3[i]
        s_w0 += w * g0
        s_w1 += w * g1
        s_w2 += w * g2
        s_w3 += w * g3
        g_alpha = (f0 * g0 + f1 * g1 + f2 * g2 + f3 * g3) * tr - (b0 * g0 + b1 * g1 + b2 * g2 + b3 * g3 + gtt[i]) * inv
        be0[i] = b0 + w * f0
        be1[i] = b1 + w * f1
        be2[i] = b2 + w * f2
        be3[i] = b3 + w * f3
        g_vis = vis * g_alpha if (ok & (raw < _MAXA)) else _ZERO  # = dL/d opacity; the clamp has zero gradient
        g_sigma = -o * g_vis
        s_o += g_vis
        sx += dx * g_sigma
        sy += dy * g_sigma
        sxx += dx * dx * g_sigma
        sxy += dx * dy * g_sigma
        syy += dy * dy * g_sigma
    return s_w0, s_w1, s_w2, s_w3, s_o, sx, sy, sxx, sxy, syy


@nb.njit(parallel=True, cache=True, fastmath=_FASTMATH)
def composite_backward(means2d, conics, opacities, feats, offsets, ids, width, height, tile, n_chunks,
                       t_final, n_used, g_out, g_tfinal):
    """Back-to-front gradient pass (gsplat's): per tile, Gaussians are visited back to front from the
    last one any pixel composited, each over its run of pixels (:func:`_backward_run`); every pixel
    starts from its final transmittance, undoes ``T <- T / (1 - alpha)`` and carries the sum of what
    lies behind it. Each Gaussian's gradient is summed over the run, then added (float64) to the
    chunk's own [G, 10] buffer; the chunk buffers are summed at the end (no races; deterministic for a
    given ``n_chunks``).

    g_out [H, W, 4], g_tfinal [H, W]. Returns [G, 10] float64: d/d(mean x, mean y, conic a, b, c,
    opacity, r, g, b, z).
    """
    n_g = means2d.shape[0]
    n_tx = (width + tile - 1) // tile
    n_tiles = offsets.shape[0] - 1
    buffers = np.zeros((n_chunks, n_g, N_GRAD), np.float64)
    for chunk in nb.prange(n_chunks):
        for t in range(chunk, n_tiles, n_chunks):
            start = offsets[t]
            end = offsets[t + 1]
            if start == end:
                continue
            x0 = (t % n_tx) * tile
            y0 = (t // n_tx) * tile
            x1 = min(x0 + tile, width)
            y1 = min(y0 + tile, height)
            nx = x1 - x0
            npix = (y1 - y0) * nx
            dt = means2d.dtype
            trans = np.empty(npix, dt)
            gtt = np.empty(npix, dt)  # dL/dT_final * T_final
            last = np.empty(npix, np.int32)
            go0 = np.empty(npix, dt)
            go1 = np.empty(npix, dt)
            go2 = np.empty(npix, dt)
            go3 = np.empty(npix, dt)
            be0 = np.zeros(npix, dt)
            be1 = np.zeros(npix, dt)
            be2 = np.zeros(npix, dt)
            be3 = np.zeros(npix, dt)
            max_last = 0
            for y in range(y0, y1):
                for x in range(x0, x1):
                    p = (y - y0) * nx + (x - x0)
                    trans[p] = t_final[y, x]
                    gtt[p] = g_tfinal[y, x] * t_final[y, x]
                    last[p] = n_used[y, x]
                    max_last = max(max_last, n_used[y, x])
                    go0[p] = g_out[y, x, 0]
                    go1[p] = g_out[y, x, 1]
                    go2[p] = g_out[y, x, 2]
                    go3[p] = g_out[y, x, 3]
            if max_last == 0:
                continue
            px, py = _tile_centres(x0, y0, nx, npix, means2d)
            pv, ext, ft = _gather(means2d, conics, opacities, feats, ids, start, start + max_last)
            for k in range(max_last - 1, -1, -1):
                q0, q1 = _span(pv, ext, k, x0, y0, x1, y1, nx)
                if q0 >= q1:
                    continue
                s_w0, s_w1, s_w2, s_w3, s_o, sx, sy, sxx, sxy, syy = _backward_run(
                    trans[q0:q1], last[q0:q1], gtt[q0:q1], go0[q0:q1], go1[q0:q1], go2[q0:q1], go3[q0:q1],
                    be0[q0:q1], be1[q0:q1], be2[q0:q1], be3[q0:q1], px[q0:q1], py[q0:q1], np.int32(k),
                    pv[k, 0], pv[k, 1], pv[k, 2], pv[k, 3], pv[k, 4], pv[k, 5], ft[k, 0], ft[k, 1], ft[k, 2],
                    ft[k, 3])
                # sigma = a dx^2/2 + b dx dy + c dy^2/2 with dx = mean x - pixel x
                a = 2.0 * float(pv[k, 2])
                b = float(pv[k, 3])
                c = 2.0 * float(pv[k, 4])
                buf = buffers[chunk, ids[start + k]]
                buf[0] += a * sx + b * sy
                buf[1] += b * sx + c * sy
                buf[2] += 0.5 * sxx
                buf[3] += sxy
                buf[4] += 0.5 * syy
                buf[5] += s_o
                buf[6] += s_w0
                buf[7] += s_w1
                buf[8] += s_w2
                buf[9] += s_w3
    total = np.zeros((n_g, N_GRAD), np.float64)
    for chunk in range(n_chunks):
        total += buffers[chunk]
    return total


# ----------------------------------------------------------------------------------------------------
# Fused projection + SH colours (forward and hand-written backward), one camera at a time.
# The maths is that of fastavatar.render.projection / fastavatar.core.sh (the torch reference), in float64.

SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154, -0.4570457994644658,
         1.445305721320277, -0.5900435899266435)
# camera: fx, fy, cx, cy, lim_x_neg, lim_x_pos, lim_y_neg, lim_y_pos, near, far, eps2d (see _camera_params)
N_CAM = 11


@nb.njit(cache=True, inline="always")
def _sh_basis(x, y, z, basis):
    """Fill basis[0:16] with the degree-3 real SH of the unit direction (x, y, z) (core.sh.sh_terms)."""
    basis[0] = SH_C0
    basis[1] = -SH_C1 * y
    basis[2] = SH_C1 * z
    basis[3] = -SH_C1 * x
    xx = x * x
    yy = y * y
    zz = z * z
    basis[4] = SH_C2[0] * x * y
    basis[5] = SH_C2[1] * y * z
    basis[6] = SH_C2[2] * (2.0 * zz - xx - yy)
    basis[7] = SH_C2[3] * x * z
    basis[8] = SH_C2[4] * (xx - yy)
    r = 4.0 * zz - xx - yy
    basis[9] = SH_C3[0] * y * (3.0 * xx - yy)
    basis[10] = SH_C3[1] * x * y * z
    basis[11] = SH_C3[2] * y * r
    basis[12] = SH_C3[3] * z * (2.0 * zz - 3.0 * xx - 3.0 * yy)
    basis[13] = SH_C3[4] * x * r
    basis[14] = SH_C3[5] * z * (xx - yy)
    basis[15] = SH_C3[6] * x * (xx - 3.0 * yy)


@nb.njit(cache=True, inline="always")
def _sh_basis_grad(x, y, z, gb, n_basis):
    """d/d(x, y, z) of sum_k gb[k] basis_k(x, y, z) for the first n_basis terms (x, y, z independent)."""
    gx = 0.0
    gy = 0.0
    gz = 0.0
    if n_basis > 1:
        gy -= SH_C1 * gb[1]
        gz += SH_C1 * gb[2]
        gx -= SH_C1 * gb[3]
    if n_basis > 4:
        gx += SH_C2[0] * y * gb[4]
        gy += SH_C2[0] * x * gb[4]
        gy += SH_C2[1] * z * gb[5]
        gz += SH_C2[1] * y * gb[5]
        gx -= 2.0 * SH_C2[2] * x * gb[6]
        gy -= 2.0 * SH_C2[2] * y * gb[6]
        gz += 4.0 * SH_C2[2] * z * gb[6]
        gx += SH_C2[3] * z * gb[7]
        gz += SH_C2[3] * x * gb[7]
        gx += 2.0 * SH_C2[4] * x * gb[8]
        gy -= 2.0 * SH_C2[4] * y * gb[8]
    if n_basis > 9:
        xx = x * x
        yy = y * y
        zz = z * z
        r = 4.0 * zz - xx - yy
        gx += SH_C3[0] * 6.0 * x * y * gb[9]
        gy += SH_C3[0] * 3.0 * (xx - yy) * gb[9]
        gx += SH_C3[1] * y * z * gb[10]
        gy += SH_C3[1] * x * z * gb[10]
        gz += SH_C3[1] * x * y * gb[10]
        gx -= SH_C3[2] * 2.0 * x * y * gb[11]
        gy += SH_C3[2] * (r - 2.0 * yy) * gb[11]
        gz += SH_C3[2] * 8.0 * y * z * gb[11]
        gx -= SH_C3[3] * 6.0 * x * z * gb[12]
        gy -= SH_C3[3] * 6.0 * y * z * gb[12]
        gz += SH_C3[3] * (6.0 * zz - 3.0 * xx - 3.0 * yy) * gb[12]
        gx += SH_C3[4] * (r - 2.0 * xx) * gb[13]
        gy -= SH_C3[4] * 2.0 * x * y * gb[13]
        gz += SH_C3[4] * 8.0 * x * z * gb[13]
        gx += SH_C3[5] * 2.0 * x * z * gb[14]
        gy -= SH_C3[5] * 2.0 * y * z * gb[14]
        gz += SH_C3[5] * (xx - yy) * gb[14]
        gx += SH_C3[6] * 3.0 * (xx - yy) * gb[15]
        gy -= SH_C3[6] * 6.0 * x * y * gb[15]
    return gx, gy, gz


@nb.njit(cache=True, inline="always")
def _rotation(quats, g, rm):
    """rm [3, 3] = rotation of the normalised quaternion quats[g] (wxyz; core.rotations.quat_to_matrix).
    Returns (w, x, y, z, 1 / max(|q|, 1e-12))."""
    w = float(quats[g, 0])
    x = float(quats[g, 1])
    y = float(quats[g, 2])
    z = float(quats[g, 3])
    inv_n = 1.0 / max(math.sqrt(w * w + x * x + y * y + z * z), 1e-12)
    w *= inv_n
    x *= inv_n
    y *= inv_n
    z *= inv_n
    rm[0, 0] = 1.0 - 2.0 * (y * y + z * z)
    rm[0, 1] = 2.0 * (x * y - w * z)
    rm[0, 2] = 2.0 * (x * z + w * y)
    rm[1, 0] = 2.0 * (x * y + w * z)
    rm[1, 1] = 1.0 - 2.0 * (x * x + z * z)
    rm[1, 2] = 2.0 * (y * z - w * x)
    rm[2, 0] = 2.0 * (x * z - w * y)
    rm[2, 1] = 2.0 * (y * z + w * x)
    rm[2, 2] = 1.0 - 2.0 * (x * x + y * y)
    return w, x, y, z, inv_n


@nb.njit(cache=True, inline="always")
def _camera_covariance(scales, g, rm, rc, m, sc):
    """m = R(q) diag(s); sc = Rc (m m^T) Rc^T, the camera-space covariance [3, 3]."""
    for i in range(3):
        for j in range(3):
            m[i, j] = rm[i, j] * float(scales[g, j])
    # a = Rc m, sc = a a^T
    for i in range(3):
        a0 = rc[i, 0] * m[0, 0] + rc[i, 1] * m[1, 0] + rc[i, 2] * m[2, 0]
        a1 = rc[i, 0] * m[0, 1] + rc[i, 1] * m[1, 1] + rc[i, 2] * m[2, 1]
        a2 = rc[i, 0] * m[0, 2] + rc[i, 1] * m[1, 2] + rc[i, 2] * m[2, 2]
        sc[i, 0] = a0
        sc[i, 1] = a1
        sc[i, 2] = a2
    # sc currently holds a = Rc m; form a a^T in place via a copy of the rows
    a00, a01, a02 = sc[0, 0], sc[0, 1], sc[0, 2]
    a10, a11, a12 = sc[1, 0], sc[1, 1], sc[1, 2]
    a20, a21, a22 = sc[2, 0], sc[2, 1], sc[2, 2]
    sc[0, 0] = a00 * a00 + a01 * a01 + a02 * a02
    sc[0, 1] = a00 * a10 + a01 * a11 + a02 * a12
    sc[0, 2] = a00 * a20 + a01 * a21 + a02 * a22
    sc[1, 1] = a10 * a10 + a11 * a11 + a12 * a12
    sc[1, 2] = a10 * a20 + a11 * a21 + a12 * a22
    sc[2, 2] = a20 * a20 + a21 * a21 + a22 * a22
    sc[1, 0] = sc[0, 1]
    sc[2, 0] = sc[0, 2]
    sc[2, 1] = sc[1, 2]


@nb.njit(cache=True, inline="always")
def _mean_camera(means, g, rc, tc):
    mx = float(means[g, 0])
    my = float(means[g, 1])
    mz = float(means[g, 2])
    tx = rc[0, 0] * mx + rc[0, 1] * my + rc[0, 2] * mz + tc[0]
    ty = rc[1, 0] * mx + rc[1, 1] * my + rc[1, 2] * mz + tc[1]
    tz = rc[2, 0] * mx + rc[2, 1] * my + rc[2, 2] * mz + tc[2]
    return tx, ty, tz


@nb.njit(cache=True, inline="always")
def _projected_covariance(tx, ty, z, fx, fy, cam, sc, eps2d):
    """EWA projection of the camera-space covariance sc [3, 3] of a mean (tx, ty) at depth z: the
    normalised image coordinates (u, v), the same clamped to the frustum margins (uc, vc), the Jacobian
    entries there (j00, j02, j11, j12) and the dilated 2D covariance (c00, c01, c11)."""
    inv_z = 1.0 / z
    u = tx * inv_z
    v = ty * inv_z
    uc = min(max(u, -cam[4]), cam[5])
    vc = min(max(v, -cam[6]), cam[7])
    j00 = fx * inv_z
    j02 = -fx * uc * inv_z
    j11 = fy * inv_z
    j12 = -fy * vc * inv_z
    c00 = j00 * j00 * sc[0, 0] + 2.0 * j00 * j02 * sc[0, 2] + j02 * j02 * sc[2, 2] + eps2d
    c11 = j11 * j11 * sc[1, 1] + 2.0 * j11 * j12 * sc[1, 2] + j12 * j12 * sc[2, 2] + eps2d
    c01 = j00 * j11 * sc[0, 1] + j00 * j12 * sc[0, 2] + j02 * j11 * sc[2, 1] + j02 * j12 * sc[2, 2]
    return u, v, uc, vc, j00, j02, j11, j12, c00, c01, c11


@nb.njit(parallel=True, cache=True)
def project_forward(means, quats, scales, opacities, sh, rc, tc, centre, cam, sh_degree, antialiased, n_chunks,
                    means2d, conics, covars2d, opac_out, feats, keep):
    """Per Gaussian g of one camera (projection.project_gaussians, antialias_compensation, core.sh):

    means [N, 3], quats [N, 4], scales [N, 3], opacities [N], sh [N, K, 3] (any float dtype); rc [3, 3],
    tc [3] world-to-camera rotation and translation, centre [3] camera centre, cam [N_CAM] float64.
    Writes means2d [N, 2], conics [N, 3], covars2d [N, 3] (dilated), opac_out [N] (opacity, times the
    antialiasing factor when ``antialiased``), feats [N, 4] (rgb from SH, camera z) and keep [N] bool
    (near < z < far, det(cov2d) > 0 and opac_out >= 1/255)."""
    n = means.shape[0]
    fx, fy, cx, cy = cam[0], cam[1], cam[2], cam[3]
    eps2d = cam[10]
    n_basis = (sh_degree + 1) * (sh_degree + 1)
    per = (n + n_chunks - 1) // n_chunks
    for chunk in nb.prange(n_chunks):
        rm = np.empty((3, 3))
        m = np.empty((3, 3))
        sc = np.empty((3, 3))
        basis = np.empty(16)
        for g in range(chunk * per, min(n, (chunk + 1) * per)):
            tx, ty, tz = _mean_camera(means, g, rc, tc)
            depth_ok = tz > cam[8] and tz < cam[9]
            _rotation(quats, g, rm)
            _camera_covariance(scales, g, rm, rc, m, sc)
            u, v, _, _, j00, j02, j11, j12, c00, c01, c11 = _projected_covariance(
                tx, ty, tz if depth_ok else 1.0, fx, fy, cam, sc, eps2d)
            det = c00 * c11 - c01 * c01
            detc = max(det, 1e-10)
            means2d[g, 0] = fx * u + cx
            means2d[g, 1] = fy * v + cy
            conics[g, 0] = c11 / detc
            conics[g, 1] = -c01 / detc
            conics[g, 2] = c00 / detc
            covars2d[g, 0] = c00
            covars2d[g, 1] = c01
            covars2d[g, 2] = c11
            o = float(opacities[g])
            if antialiased:
                det_orig = (c00 - eps2d) * (c11 - eps2d) - c01 * c01
                o *= math.sqrt(max(det_orig / detc, 1e-12))
            opac_out[g] = o
            keep[g] = depth_ok and det > 0.0 and o >= ALPHA_THRESHOLD
            # colour: SH of the unit direction from the camera centre to the mean
            dxw = float(means[g, 0]) - centre[0]
            dyw = float(means[g, 1]) - centre[1]
            dzw = float(means[g, 2]) - centre[2]
            inv_d = 1.0 / max(math.sqrt(dxw * dxw + dyw * dyw + dzw * dzw), 1e-12)
            _sh_basis(dxw * inv_d, dyw * inv_d, dzw * inv_d, basis)
            for c in range(3):
                acc = 0.0
                for k in range(n_basis):
                    acc += basis[k] * float(sh[g, k, c])
                feats[g, c] = max(acc + 0.5, 0.0)
            feats[g, 3] = tz


@nb.njit(parallel=True, cache=True)
def project_backward(means, quats, scales, opacities, sh, rc, tc, centre, cam, sh_degree, antialiased, n_chunks,
                     sel, grad10, g_means, g_quats, g_scales, g_opac, g_sh):
    """Backward of :func:`project_forward` for the drawn Gaussians ``sel`` [G] (their composite gradient
    grad10 [G, 10]: d/d(means2d x, y, conic a, b, c, opacity, r, g, b, z)). Adds into the float64
    g_means [N, 3], g_quats [N, 4], g_scales [N, 3], g_opac [N], g_sh [N, K, 3] (every Gaussian
    appears at most once in ``sel``, so chunks never write the same row)."""
    n_sel = sel.shape[0]
    fx, fy = cam[0], cam[1]
    eps2d = cam[10]
    n_basis = (sh_degree + 1) * (sh_degree + 1)
    per = (n_sel + n_chunks - 1) // n_chunks
    for chunk in nb.prange(n_chunks):
        rm = np.empty((3, 3))
        m = np.empty((3, 3))
        sc = np.empty((3, 3))
        gs = np.empty((3, 3))  # dL / d camera-space covariance
        gw = np.empty((3, 3))  # dL / d world covariance
        gm = np.empty((3, 3))  # dL / d m
        basis = np.empty(16)
        gb = np.zeros(16)
        for i in range(chunk * per, min(n_sel, (chunk + 1) * per)):
            g = sel[i]
            gr = grad10[i]
            # ---- recompute the forward
            tx, ty, tz = _mean_camera(means, g, rc, tc)
            qw, qx, qy, qz, inv_n = _rotation(quats, g, rm)
            _camera_covariance(scales, g, rm, rc, m, sc)
            # drawn => near < z < far, so z itself was the forward's depth
            u, v, uc, vc, j00, j02, j11, j12, c00, c01, c11 = _projected_covariance(tx, ty, tz, fx, fy, cam, sc,
                                                                                       eps2d)
            inv_z = 1.0 / tz
            u_in = -cam[4] < u < cam[5]
            v_in = -cam[6] < v < cam[7]
            det = c00 * c11 - c01 * c01
            detc = max(det, 1e-10)
            # ---- opacity (and antialiasing factor)
            o = float(opacities[g])
            g_o_eff = gr[5]
            g_c00 = 0.0
            g_c01 = 0.0
            g_c11 = 0.0
            g_detc = 0.0
            if antialiased:
                det_orig = (c00 - eps2d) * (c11 - eps2d) - c01 * c01
                ratio = det_orig / detc
                comp = math.sqrt(max(ratio, 1e-12))
                g_opac[g] += g_o_eff * comp
                if ratio > 1e-12:
                    g_ratio = g_o_eff * o * 0.5 / comp
                    g_c00 += g_ratio * (c11 - eps2d) / detc
                    g_c11 += g_ratio * (c00 - eps2d) / detc
                    g_c01 += -2.0 * g_ratio * c01 / detc
                    g_detc -= g_ratio * ratio / detc
            else:
                g_opac[g] += g_o_eff
            # ---- conic = (c11, -c01, c00) / detc
            ga = gr[2]
            gbb = gr[3]
            gc = gr[4]
            g_c11 += ga / detc
            g_c01 -= gbb / detc
            g_c00 += gc / detc
            g_detc -= (ga * c11 - gbb * c01 + gc * c00) / (detc * detc)
            if det > 1e-10:
                g_c00 += g_detc * c11
                g_c11 += g_detc * c00
                g_c01 -= 2.0 * g_detc * c01
            # ---- cov2d = J sc J^T: gradients of sc (entry by entry, as written) and of J
            for a in range(3):
                for b in range(3):
                    gs[a, b] = 0.0
            gs[0, 0] = g_c00 * j00 * j00
            gs[0, 2] = g_c00 * 2.0 * j00 * j02 + g_c01 * j00 * j12
            gs[2, 2] = g_c00 * j02 * j02 + g_c11 * j12 * j12 + g_c01 * j02 * j12
            gs[1, 1] = g_c11 * j11 * j11
            gs[1, 2] = g_c11 * 2.0 * j11 * j12
            gs[0, 1] = g_c01 * j00 * j11
            gs[2, 1] = g_c01 * j02 * j11
            g_j00 = g_c00 * (2.0 * j00 * sc[0, 0] + 2.0 * j02 * sc[0, 2]) + g_c01 * (j11 * sc[0, 1] + j12 * sc[0, 2])
            g_j02 = g_c00 * (2.0 * j00 * sc[0, 2] + 2.0 * j02 * sc[2, 2]) + g_c01 * (j11 * sc[2, 1] + j12 * sc[2, 2])
            g_j11 = g_c11 * (2.0 * j11 * sc[1, 1] + 2.0 * j12 * sc[1, 2]) + g_c01 * (j00 * sc[0, 1] + j02 * sc[2, 1])
            g_j12 = g_c11 * (2.0 * j11 * sc[1, 2] + 2.0 * j12 * sc[2, 2]) + g_c01 * (j00 * sc[0, 2] + j02 * sc[2, 2])
            # ---- J and means2d -> camera-space mean
            g_inv_z = g_j00 * fx - g_j02 * fx * uc + g_j11 * fy - g_j12 * fy * vc
            g_u = gr[0] * fx + (-g_j02 * fx * inv_z if u_in else 0.0)
            g_v = gr[1] * fy + (-g_j12 * fy * inv_z if v_in else 0.0)
            g_tx = g_u * inv_z
            g_ty = g_v * inv_z
            g_inv_z += g_u * tx + g_v * ty
            g_tz = gr[9] - g_inv_z * inv_z * inv_z
            for a in range(3):
                g_means[g, a] += rc[0, a] * g_tx + rc[1, a] * g_ty + rc[2, a] * g_tz
            # ---- sc = Rc S Rc^T -> gw = Rc^T gs Rc; S = m m^T -> gm = (gw + gw^T) m
            for p in range(3):  # gm <- gs Rc (scratch), then gw = Rc^T gm
                for b in range(3):
                    gm[p, b] = gs[p, 0] * rc[0, b] + gs[p, 1] * rc[1, b] + gs[p, 2] * rc[2, b]
            for a in range(3):
                for b in range(3):
                    gw[a, b] = rc[0, a] * gm[0, b] + rc[1, a] * gm[1, b] + rc[2, a] * gm[2, b]
            for a in range(3):
                for b in range(3):
                    acc = 0.0
                    for p in range(3):
                        acc += (gw[a, p] + gw[p, a]) * m[p, b]
                    gm[a, b] = acc
            # m = R diag(s): dL/ds_j = sum_i gm[i, j] R[i, j]; dL/dR[i, j] = gm[i, j] s_j (kept in gm)
            for b in range(3):
                s_b = float(scales[g, b])
                acc = 0.0
                for a in range(3):
                    acc += gm[a, b] * rm[a, b]
                    gm[a, b] *= s_b
                g_scales[g, b] += acc
            # R(q_hat) -> q_hat (core.rotations.quat_to_matrix) -> q (normalisation)
            g_w = 2.0 * (-gm[0, 1] * qz + gm[0, 2] * qy + gm[1, 0] * qz - gm[1, 2] * qx - gm[2, 0] * qy + gm[2, 1] * qx)
            g_x = (2.0 * (gm[0, 1] * qy + gm[0, 2] * qz + gm[1, 0] * qy - gm[1, 2] * qw + gm[2, 0] * qz
                          + gm[2, 1] * qw) - 4.0 * qx * (gm[1, 1] + gm[2, 2]))
            g_y = (2.0 * (gm[0, 1] * qx + gm[0, 2] * qw + gm[1, 0] * qx + gm[1, 2] * qz - gm[2, 0] * qw
                          + gm[2, 1] * qz) - 4.0 * qy * (gm[0, 0] + gm[2, 2]))
            g_z = (2.0 * (-gm[0, 1] * qw + gm[0, 2] * qx + gm[1, 0] * qw + gm[1, 2] * qy + gm[2, 0] * qx
                          + gm[2, 1] * qy) - 4.0 * qz * (gm[0, 0] + gm[1, 1]))
            dot = g_w * qw + g_x * qx + g_y * qy + g_z * qz
            g_quats[g, 0] += (g_w - qw * dot) * inv_n
            g_quats[g, 1] += (g_x - qx * dot) * inv_n
            g_quats[g, 2] += (g_y - qy * dot) * inv_n
            g_quats[g, 3] += (g_z - qz * dot) * inv_n
            # ---- colour: rgb = max(sum_k basis_k sh_k + 0.5, 0)
            dxw = float(means[g, 0]) - centre[0]
            dyw = float(means[g, 1]) - centre[1]
            dzw = float(means[g, 2]) - centre[2]
            norm = max(math.sqrt(dxw * dxw + dyw * dyw + dzw * dzw), 1e-12)
            dx = dxw / norm
            dy = dyw / norm
            dz = dzw / norm
            _sh_basis(dx, dy, dz, basis)
            for k in range(n_basis):
                gb[k] = 0.0
            for c in range(3):
                acc = 0.0
                for k in range(n_basis):
                    acc += basis[k] * float(sh[g, k, c])
                if acc + 0.5 > 0.0:
                    g_rgb = gr[6 + c]
                    for k in range(n_basis):
                        g_sh[g, k, c] += basis[k] * g_rgb
                        gb[k] += float(sh[g, k, c]) * g_rgb
            if n_basis > 1:
                gdx, gdy, gdz = _sh_basis_grad(dx, dy, dz, gb, n_basis)
                # d = dir / |dir| -> (g - d (d . g)) / |dir| (norm not clamped for a drawn Gaussian in practice)
                dd = gdx * dx + gdy * dy + gdz * dz
                g_means[g, 0] += (gdx - dx * dd) / norm
                g_means[g, 1] += (gdy - dy * dd) / norm
                g_means[g, 2] += (gdz - dz * dd) / norm


# ----------------------------------------------------------------------------------------------------
# Final images of one camera (rasterize_torch.finish_camera), forward and backward.


@nb.njit(parallel=True, cache=True)
def finish_forward(out, t_final, background, rgb, alpha, depth):
    """out [H, W, 4] (sum w rgb, sum w z), t_final [H, W], background [3] (zeros for none) ->
    rgb [H, W, 3] = out_rgb + T_final background, alpha [H, W, 1] = 1 - T_final,
    depth [H, W, 1] = out_z / max(alpha, 1e-10)."""
    height, width = t_final.shape
    for y in nb.prange(height):
        for x in range(width):
            t = t_final[y, x]
            a = 1.0 - t
            for c in range(3):
                rgb[y, x, c] = out[y, x, c] + t * background[c]
            alpha[y, x, 0] = a
            depth[y, x, 0] = out[y, x, 3] / max(a, 1e-10)


@nb.njit(parallel=True, cache=True)
def finish_backward(out, t_final, background, g_rgb, g_alpha, g_depth, g_out, g_tfinal, g_background_rows):
    """Backward of :func:`finish_forward`: writes g_out [H, W, 4], g_tfinal [H, W] and, per image row,
    the background gradient g_background_rows [H, 3] (sum over the row of dL/drgb * T_final)."""
    height, width = t_final.shape
    for y in nb.prange(height):
        for c in range(3):
            g_background_rows[y, c] = 0.0
        for x in range(width):
            t = t_final[y, x]
            a = 1.0 - t
            a_c = max(a, 1e-10)
            gd = g_depth[y, x, 0]
            g_a = g_alpha[y, x, 0]
            if a > 1e-10:  # clamp_min passes the gradient above the floor only
                g_a -= gd * out[y, x, 3] / (a_c * a_c)
            g_t = -g_a
            for c in range(3):
                g = g_rgb[y, x, c]
                g_out[y, x, c] = g
                g_t += g * background[c]
                g_background_rows[y, c] += g * t
            g_out[y, x, 3] = gd / a_c
            g_tfinal[y, x] = g_t
