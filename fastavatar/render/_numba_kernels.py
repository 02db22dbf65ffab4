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
