"""numba kernels of the compiled CPU rasterizer (imported only when numba is installed).

Pure NumPy-array code, no torch. The torch glue, the autograd Function and the conventions are in
:mod:`fastavatar.render.rasterize_numba`; the per-pair rules below are the ones documented at the top
of :mod:`fastavatar.render` (alpha clamp 0.999, pairs with alpha < 1/255 skipped, a pixel stops before
the pair that would take its transmittance to <= 1e-4).

Layout: G projected Gaussians, already culled and sorted front to back by camera z; images are
row-major ``[H, W, ...]``; square tiles of ``tile`` pixels, ``n_tx`` columns of tiles, tile ``t`` covers
columns ``(t % n_tx) * tile ...`` and rows ``(t // n_tx) * tile ...``. Per-pair maths is float64
whatever the input dtype (inputs and outputs keep their dtype).

All kernels are compiled on first use and cached on disk (``cache=True``).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

ALPHA_THRESHOLD = 1.0 / 255.0
MAX_ALPHA = 0.999
T_EPS = 1e-4
# the bounding box is widened by this factor and margin, so that float rounding in the per-pixel
# alpha test can never accept a pixel outside its tile range (the per-pixel test decides)
_BOX_WIDEN = 1.0001
_BOX_MARGIN = 1e-3
# number of gradient channels per Gaussian: d/d(mean x, mean y, conic a, b, c, opacity, 4 features)
N_GRAD = 10


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
    """Copy one tile's Gaussians into contiguous float64 blocks (cache friendly): par [n, 10] = mean x,
    mean y, conic a, b, c, opacity, sigma cut-off, 1/a, b/a, c - b^2/a; ft [n, 4] = features."""
    n = end - start
    par = np.empty((n, 10), np.float64)
    ft = np.empty((n, 4), np.float64)
    for k in range(n):
        g = ids[start + k]
        par[k, 0] = means2d[g, 0]
        par[k, 1] = means2d[g, 1]
        par[k, 2] = conics[g, 0]
        par[k, 3] = conics[g, 1]
        par[k, 4] = conics[g, 2]
        par[k, 5] = opacities[g]
        # sigma above this cannot give alpha >= 1/255 (widened so that rounding never flips the exact test)
        par[k, 6] = math.log(255.0 * opacities[g]) * 1.0001 + 1e-6
        # per-row ellipse solution terms (see _cols): 1/a, b/a, c - b^2/a (= 1 / cov_yy)
        par[k, 7] = 1.0 / conics[g, 0]
        par[k, 8] = conics[g, 1] / conics[g, 0]
        par[k, 9] = conics[g, 2] - conics[g, 1] * par[k, 8]
        for c in range(4):
            ft[k, c] = feats[g, c]
    return par, ft


@nb.njit(cache=True, inline="always")
def _exp(x, fast):
    """exp(x); in float32 when ``fast`` (float32 inputs: libm's expf, ~2x cheaper, 6e-8 relative)."""
    if fast:
        return float(math.exp(np.float32(x)))
    return math.exp(x)


@nb.njit(cache=True, inline="always")
def _rows(par, k, y0, y1):
    """First and last image row of tile rows [y0, y1) that Gaussian k's cut-off ellipse can reach."""
    cov_yy = 1.0 / max(par[k, 9], 1e-30)  # (conic^-1)_yy = 1 / (c - b^2 / a)
    hy = math.sqrt(max(2.0 * par[k, 6] * cov_yy, 0.0)) * _BOX_WIDEN + _BOX_MARGIN
    lo = max(math.ceil(par[k, 1] - hy - 0.5), y0)
    hi = min(math.floor(par[k, 1] + hy - 0.5), y1 - 1)
    return lo, hi


@nb.njit(cache=True, inline="always")
def _cols(par, k, dy, x0, x1):
    """Pixel columns of tile columns [x0, x1) inside Gaussian k's cut-off ellipse on a row at offset
    dy = mean y - pixel centre y. Along the row ``sigma = a/2 (x - xc)^2 + dy^2 (c - b^2/a) / 2`` with
    ``xc = mean x + b dy / a``; widened like the bounding box (the per-pixel test decides)."""
    r = (2.0 * par[k, 6] - dy * dy * par[k, 9]) * par[k, 7]
    if r < 0.0:
        return 1, 0
    hw = math.sqrt(r) * _BOX_WIDEN + _BOX_MARGIN
    xc = par[k, 0] + par[k, 8] * dy
    lo = max(math.ceil(xc - hw - 0.5), x0)
    hi = min(math.floor(xc + hw - 0.5), x1 - 1)
    return lo, hi


@nb.njit(parallel=True, cache=True)
def composite_forward(means2d, conics, opacities, feats, offsets, ids, width, height, tile, n_chunks, fast_exp,
                      out, t_final, n_used):
    """Front-to-back compositing, one tile at a time, tiles spread over ``n_chunks`` parallel chunks.

    Inputs as :func:`bin_tiles`, plus conics [G, 3] (a, b, c: ``sigma = a dx^2/2 + b dx dy + c dy^2/2``,
    ``d = mean - pixel centre``) and feats [G, 4] (rgb, z). Within a tile, Gaussians are visited front
    to back and each one only over its own rows and, per row, its own pixel interval (as gsplat's
    per-tile batches, but without testing pixels outside the ellipse); each pixel keeps its running
    transmittance and stops (gsplat's rule) independently; the tile stops when all its pixels have.
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
            start = offsets[t]
            end = offsets[t + 1]
            n = end - start
            trans = np.ones((y1 - y0) * nx, np.float64)
            acc = np.zeros(((y1 - y0) * nx, 4), np.float64)
            used = np.zeros((y1 - y0) * nx, np.int32)
            done = np.zeros((y1 - y0) * nx, np.bool_)
            alive = (y1 - y0) * nx
            if n > 0:
                par, ft = _gather(means2d, conics, opacities, feats, ids, start, end)
                for k in range(n):
                    if alive == 0:
                        break
                    y_lo, y_hi = _rows(par, k, y0, y1)
                    for y in range(y_lo, y_hi + 1):
                        dy = par[k, 1] - (y + 0.5)
                        x_lo, x_hi = _cols(par, k, dy, x0, x1)
                        for x in range(x_lo, x_hi + 1):
                            p = (y - y0) * nx + (x - x0)
                            if done[p]:
                                continue
                            dx = par[k, 0] - (x + 0.5)
                            sigma = 0.5 * (par[k, 2] * dx * dx + par[k, 4] * dy * dy) + par[k, 3] * dx * dy
                            if sigma < 0.0 or sigma > par[k, 6]:
                                continue
                            alpha = min(MAX_ALPHA, par[k, 5] * _exp(-sigma, fast_exp))
                            if alpha < ALPHA_THRESHOLD:
                                continue
                            next_t = trans[p] * (1.0 - alpha)
                            if next_t <= T_EPS:
                                done[p] = True
                                alive -= 1
                                continue
                            w = alpha * trans[p]
                            for c in range(4):
                                acc[p, c] += w * ft[k, c]
                            trans[p] = next_t
                            used[p] = k + 1
            for y in range(y0, y1):
                for x in range(x0, x1):
                    p = (y - y0) * nx + (x - x0)
                    for c in range(4):
                        out[y, x, c] = acc[p, c]
                    t_final[y, x] = trans[p]
                    n_used[y, x] = used[p]


@nb.njit(parallel=True, cache=True)
def composite_backward(means2d, conics, opacities, feats, offsets, ids, width, height, tile, n_chunks, fast_exp,
                       t_final, n_used, g_out, g_tfinal):
    """Back-to-front gradient pass (gsplat's): per tile, Gaussians are visited back to front, each over
    its own footprint; every pixel starts from its final transmittance at its last composited pair,
    undoes ``T <- T / (1 - alpha)`` and carries the sum of what lies behind it. Each Gaussian's
    gradient is summed over its pixels in registers, then added to the chunk's own [G, 10] buffer;
    the chunk buffers are summed at the end (no races; deterministic for a given ``n_chunks``).

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
            trans = np.empty(npix, np.float64)
            t_fin = np.empty(npix, np.float64)
            last = np.empty(npix, np.int32)
            go = np.empty((npix, 4), np.float64)
            gt = np.empty(npix, np.float64)
            behind = np.zeros((npix, 4), np.float64)
            max_last = 0
            for y in range(y0, y1):
                for x in range(x0, x1):
                    p = (y - y0) * nx + (x - x0)
                    trans[p] = t_final[y, x]
                    t_fin[p] = t_final[y, x]
                    last[p] = n_used[y, x]
                    max_last = max(max_last, last[p])
                    gt[p] = g_tfinal[y, x]
                    for c in range(4):
                        go[p, c] = g_out[y, x, c]
            if max_last == 0:
                continue
            par, ft = _gather(means2d, conics, opacities, feats, ids, start, end)
            for k in range(max_last - 1, -1, -1):
                g_mx = 0.0
                g_my = 0.0
                g_a = 0.0
                g_b = 0.0
                g_c = 0.0
                g_o = 0.0
                g_f0 = 0.0
                g_f1 = 0.0
                g_f2 = 0.0
                g_f3 = 0.0
                f0 = ft[k, 0]
                f1 = ft[k, 1]
                f2 = ft[k, 2]
                f3 = ft[k, 3]
                y_lo, y_hi = _rows(par, k, y0, y1)
                for y in range(y_lo, y_hi + 1):
                    dy = par[k, 1] - (y + 0.5)
                    x_lo, x_hi = _cols(par, k, dy, x0, x1)
                    for x in range(x_lo, x_hi + 1):
                        p = (y - y0) * nx + (x - x0)
                        if k >= last[p]:
                            continue
                        dx = par[k, 0] - (x + 0.5)
                        sigma = 0.5 * (par[k, 2] * dx * dx + par[k, 4] * dy * dy) + par[k, 3] * dx * dy
                        if sigma < 0.0 or sigma > par[k, 6]:
                            continue
                        vis = _exp(-sigma, fast_exp)
                        raw = par[k, 5] * vis
                        alpha = min(MAX_ALPHA, raw)
                        if alpha < ALPHA_THRESHOLD:
                            continue
                        inv = 1.0 / (1.0 - alpha)
                        tr = trans[p] * inv  # transmittance in front of this pair
                        trans[p] = tr
                        w = alpha * tr
                        g0 = go[p, 0]
                        g1 = go[p, 1]
                        g2 = go[p, 2]
                        g3 = go[p, 3]
                        g_f0 += w * g0
                        g_f1 += w * g1
                        g_f2 += w * g2
                        g_f3 += w * g3
                        # d out / d alpha = T f - behind / (1 - alpha); d T_final / d alpha = -T_final / (1 - alpha)
                        g_alpha = ((f0 * tr - behind[p, 0] * inv) * g0 + (f1 * tr - behind[p, 1] * inv) * g1
                                   + (f2 * tr - behind[p, 2] * inv) * g2 + (f3 * tr - behind[p, 3] * inv) * g3
                                   - gt[p] * t_fin[p] * inv)
                        behind[p, 0] += w * f0
                        behind[p, 1] += w * f1
                        behind[p, 2] += w * f2
                        behind[p, 3] += w * f3
                        if raw < MAX_ALPHA:  # the clamp has zero gradient
                            g_sigma = -raw * g_alpha
                            g_o += vis * g_alpha
                            g_a += 0.5 * dx * dx * g_sigma
                            g_b += dx * dy * g_sigma
                            g_c += 0.5 * dy * dy * g_sigma
                            g_mx += (par[k, 2] * dx + par[k, 3] * dy) * g_sigma
                            g_my += (par[k, 3] * dx + par[k, 4] * dy) * g_sigma
                g = ids[start + k]
                buf = buffers[chunk, g]
                buf[0] += g_mx
                buf[1] += g_my
                buf[2] += g_a
                buf[3] += g_b
                buf[4] += g_c
                buf[5] += g_o
                buf[6] += g_f0
                buf[7] += g_f1
                buf[8] += g_f2
                buf[9] += g_f3
    total = np.zeros((n_g, N_GRAD), np.float64)
    for chunk in range(n_chunks):
        total += buffers[chunk]
    return total
