"""A differentiable Gaussian-splat rasterizer in plain PyTorch (CPU or GPU).

It renders exactly what gsplat's "classic" CUDA rasterizer renders, without a dense pixels x Gaussians
composite:

1. Project (EWA, +0.3 px^2 dilation), cull (near/far, opacity < 1/255, off-screen) and sort the
   Gaussians front to back by camera z.
2. For each Gaussian and each pixel row inside its alpha >= 1/255 ellipse, solve the ellipse for the
   row's pixel x-interval ("row interval"). ``sigma(x) = A (x - xc)^2 + B`` along a row, so each
   interval needs three numbers: ``xc``, ``A`` and ``q = log(opacity) - B``;
   ``alpha = min(0.999, exp(q - A (x - xc)^2))``.
3. Cut each interval at ``tile_width``-pixel boundaries into "pieces" and stably sort the pieces by
   (row, tile column). Pieces are generated front to back, so after the stable sort every tile
   (``tile_width`` pixels of one row) holds its pieces in depth order: a pixel's Gaussians are one
   lane of a contiguous group. No per-pixel sort, no pair compaction.
4. Composite each lane front to back: transmittance from a segmented cumulative sum of
   ``log(1 - alpha)`` (one float32 ``cumsum`` over all pieces; each group's running start value is
   subtracted, see :func:`_segmented_cumsum`), gsplat's early stop (a pair that would take T to
   <= 1e-4 and all later ones are dropped), ``w = alpha T``, colours and depth summed per pixel
   (CSR sparse-dense products on CPU). The compositing is a custom autograd Function with a
   hand-written backward (the same segmented sum of ``w * dL/dw`` gives the "colour behind" term).

Gradients reach means, quats, scales, opacities and SH through ordinary autograd for everything
outside the compositing. Memory is bounded by processing bands of image rows with at most
``max_slots_per_chunk`` (piece x lane) slots each; the backward keeps three float32 per slot.

Measured on subject 306 (10144 Gaussians, 275 x 401, 2 CPU threads, a shared machine): ~4.0 M
active pairs in ~5.2 M slots, forward 0.12-0.15 s, forward + backward 0.25-0.28 s (medians),
images within 6e-6 of the dense reference; see ``scripts/benchmark_render.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import warnings
from typing import List, NamedTuple, Optional, Tuple

import torch

from fastavatar.render.projection import (
    ALPHA_THRESHOLD,
    antialias_compensation,
    camera_centers,
    project_gaussians,
    quat_scale_to_covar,
)
from fastavatar.core.sh import sh_to_rgb

LOG_ALPHA_THRESHOLD = math.log(ALPHA_THRESHOLD)
MAX_ALPHA = 0.999  # per-pair alpha clamp (3DGS / gsplat)
T_EPS = 1e-4  # gsplat stops a pixel before a pair would take its transmittance to <= this


@dataclass
class TorchRasterConfig:
    """Knobs of the pure-torch rasterizer (defaults were tuned on a 2-core CPU)."""

    # pixels per piece (one row, tile_width consecutive pixels); lanes outside a Gaussian's
    # interval cost a little compute, fewer/larger pieces make the sort and gathers cheaper
    tile_width: int = 8
    # upper bound on pieces x tile_width slots processed at once, per band of image rows (bounds
    # memory: ~40 bytes per slot transient, 12 bytes per slot kept for the backward)
    max_slots_per_chunk: int = 1 << 23
    # use CSR sparse-dense products for the segment sums/scatters (fast on CPU); index_add otherwise
    use_csr: Optional[bool] = None


class _Pieces(NamedTuple):
    """Structure of one band (no gradients). Kp pieces, in (group, depth) order."""

    ivl: torch.Tensor  # [Kp] int64 band-interval index of each piece
    gauss: torch.Tensor  # [Kp] int64 compact Gaussian index of each piece
    group: torch.Tensor  # [Kp] int64 group (row-in-band * n_tx + tile column) of each piece
    group_first: torch.Tensor  # [Gne] int64 first piece of each non-empty group, ascending
    group_nonempty: torch.Tensor  # [Gne] int64 ids of the non-empty groups, ascending
    x0: torch.Tensor  # [Kp, 1] float pixel-centre x of lane 0
    lanes: torch.Tensor  # [1, TW] float 0..TW-1
    n_groups: int
    n_ivl: int
    n_gauss: int
    group_sum: "_SegmentSum"  # sums rows of [Kp, D] per group -> [n_groups, D]


class _SegmentSum:
    """Sums rows of a [K, D] tensor into [G, D] by a fixed, sorted group index.

    On CPU a CSR (groups x rows, all ones) sparse-dense product: one pass, much faster than a
    multi-column ``index_add``. Elsewhere ``index_add``.
    """

    def __init__(self, index: torch.Tensor, num_groups: int, use_csr: bool):
        # index: [K] non-decreasing group of each row
        self.index = index
        self.num_groups = num_groups
        self.mat = None
        if use_csr and index.numel() > 0:
            counts = torch.bincount(index, minlength=num_groups)
            self.crow = torch.zeros(num_groups + 1, dtype=torch.int32, device=index.device)
            torch.cumsum(counts, 0, out=self.crow[1:])
            self.cols = torch.arange(index.numel(), dtype=torch.int32, device=index.device)
            self.mat = {}

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        if self.mat is not None:
            mat = self.mat.get(rows.dtype)
            if mat is None:
                ones = torch.ones(self.cols.numel(), dtype=rows.dtype, device=rows.device)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                    mat = torch.sparse_csr_tensor(
                        self.crow, self.cols, ones, size=(self.num_groups, rows.shape[0]), check_invariants=False
                    )
                self.mat[rows.dtype] = mat
            return torch.sparse.mm(mat, rows)
        out = rows.new_zeros((self.num_groups,) + rows.shape[1:])
        return out.index_add_(0, self.index, rows)


def _lane_sum(x: torch.Tensor) -> torch.Tensor:
    """[K, TW] -> [K] sum over lanes (pairwise halving: faster than .sum(1) on CPU)."""
    while x.shape[1] > 1:
        half = x.shape[1] // 2
        y = x[:, :half] + x[:, half : 2 * half]
        if x.shape[1] % 2:
            y[:, :1] += x[:, 2 * half :]
        x = y
    return x[:, 0]


def _segmented_cumsum(values: torch.Tensor, pieces: "_Pieces") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inclusive cumulative sum of [Kp, TW] along pieces, restarted at every group, in pieces.

    Returns ``(raw [Kp, TW], start [G, TW], totals [G, TW])``: the within-group inclusive sum is
    ``raw - start[group]``. One global ``cumsum`` in the input dtype: at each group's first piece the
    previous group's total is subtracted so the running value stays small, and the running value just
    before each group (``start``) is subtracted exactly, so float32 stays accurate to ~1e-6 whatever
    the image size.
    """
    totals = pieces.group_sum(values)  # [G, TW]
    first = pieces.group_first
    prev = totals.index_select(0, pieces.group_nonempty[:-1])  # totals of the previous non-empty group
    raw = values.index_add(0, first[1:], prev, alpha=-1.0)
    raw.cumsum_(0)
    start = values.new_zeros(pieces.n_groups, values.shape[1])
    start.index_copy_(0, pieces.group_nonempty, raw.index_select(0, first) - values.index_select(0, first))
    return raw, start, totals


def _dx(xc, pieces: "_Pieces") -> torch.Tensor:
    """x - xc for every slot [Kp, TW]."""
    return (pieces.x0 - xc.index_select(0, pieces.ivl)[:, None]) + pieces.lanes


def _alpha(xc, amp, q, pieces: "_Pieces") -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-slot alpha [Kp, TW] (0 for skipped slots) and dx = x - xc [Kp, TW].

    Lanes right of the image edge are rendered too and cropped by the caller (pixels are independent).
    """
    dx = _dx(xc, pieces)
    amp_p = amp.index_select(0, pieces.ivl)[:, None]
    alpha = torch.addcmul(q.index_select(0, pieces.ivl)[:, None], amp_p, dx * dx, value=-1.0)  # q - amp dx^2
    alpha.exp_().clamp_max_(MAX_ALPHA)
    alpha.mul_(alpha >= ALPHA_THRESHOLD)
    return alpha, dx


def _scatter(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """[K] values summed into [size] by index (1-D index_add is fast on CPU and GPU)."""
    return values.new_zeros(size).index_add_(0, index, values)


class _Composite(torch.autograd.Function):
    """Front-to-back compositing of one band. See the module docstring."""

    @staticmethod
    def forward(ctx, xc, amp, q, feats, pieces: _Pieces):
        # xc, amp, q: [R] interval parameters; feats: [Ns, D] per-Gaussian features (rgb + depth)
        d = feats.shape[1]
        alpha, dx = _alpha(xc, amp, q, pieces)
        one_minus = torch.neg(alpha).add_(1.0)
        log_one_minus = torch.log(one_minus)  # [Kp, TW]
        log_t_incl, start, _ = _segmented_cumsum(log_one_minus, pieces)
        log_t_incl.sub_(start.index_select(0, pieces.group))
        keep = log_t_incl > math.log(T_EPS)
        alpha.mul_(keep)
        trans = torch.sub(log_t_incl, log_one_minus, out=dx).exp_()  # transmittance before the pair
        weight = alpha * trans  # [Kp, TW]

        feats_t = feats.t().contiguous().index_select(1, pieces.gauss)  # [D, Kp]
        buf = log_t_incl  # reuse
        cols = []
        for c in range(d):
            torch.mul(weight, feats_t[c][:, None], out=buf)
            cols.append(pieces.group_sum(buf))
        out = torch.stack(cols, -1)  # [G, TW, D]
        t_final = pieces.group_sum(log_one_minus.mul_(keep)).exp_()  # [G, TW]
        ctx.save_for_backward(xc, amp, feats, alpha, one_minus, trans, feats_t, t_final)
        ctx.pieces = pieces
        return out, t_final

    @staticmethod
    def backward(ctx, g_out, g_tfinal):
        xc, amp, feats, alpha, one_minus, trans, feats_t, t_final = ctx.saved_tensors
        pieces: _Pieces = ctx.pieces
        d = feats.shape[1]
        weight = alpha * trans
        s = torch.zeros_like(alpha)  # [Kp, TW] sum_c dL/dout_c * feat_c
        g_feats = feats.new_zeros(feats.shape)
        for c in range(d):
            g_out_c = g_out[:, :, c]
            if not bool(g_out_c.any()):  # e.g. no loss on depth: skip the channel
                continue
            g_c = g_out_c.contiguous().index_select(0, pieces.group)  # [Kp, TW]
            s.addcmul_(g_c, feats_t[c][:, None])
            g_feats[:, c] = _scatter(_lane_sum(g_c.mul_(weight)), pieces.gauss, pieces.n_gauss)

        ws = weight.mul_(s)
        raw, start, totals = _segmented_cumsum(ws, pieces)
        # sum of w s over the later pairs of the lane, plus the final-transmittance term
        tail = start.add_(totals).add_(g_tfinal * t_final)
        behind = tail.index_select(0, pieces.group).sub_(raw)
        # g_alpha = T s - (behind + g_Tfinal T_final) / (1 - alpha); g_e = g_alpha * dalpha/de.
        # one_minus is 1 - alpha before the early-stop mask; dropped pairs have alpha = 0 below anyway
        g_e = behind.div_(one_minus).neg_().addcmul_(trans, s)
        g_e.mul_(alpha).mul_(alpha < MAX_ALPHA)  # alpha = 0 for skipped and dropped pairs

        dx = _dx(xc, pieces)
        g_q = _scatter(_lane_sum(g_e), pieces.ivl, pieces.n_ivl)
        g_e.mul_(dx)
        g_xc = 2.0 * amp * _scatter(_lane_sum(g_e), pieces.ivl, pieces.n_ivl)
        g_amp = -_scatter(_lane_sum(g_e.mul_(dx)), pieces.ivl, pieces.n_ivl)
        return g_xc, g_amp, g_q, g_feats, None


@torch.no_grad()
def _row_intervals(
    mx: torch.Tensor,  # [Ns] projected means x (detached)
    my: torch.Tensor,  # [Ns]
    conics: torch.Tensor,  # [Ns, 3]
    cov_yy: torch.Tensor,  # [Ns] dilated 2D covariance yy
    log_level: torch.Tensor,  # [Ns] log(opacity / ALPHA_THRESHOLD) >= 0
    width: int,
    height: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row intervals of each Gaussian's alpha >= 1/255 ellipse, slightly widened (the exact alpha test
    is done per pixel later). Returns (gauss [R], row [R], x_lo [R], x_hi [R]) in Gaussian order."""
    dev = mx.device
    half_h = torch.sqrt(2.0 * log_level * cov_yy) * 1.0001 + 1e-3
    y_lo = torch.ceil(my - half_h - 0.5).clamp_min(0)
    y_hi = torch.floor(my + half_h - 0.5).clamp_max(height - 1)
    n_rows = (y_hi - y_lo + 1).clamp_min(0).long()
    gauss = torch.repeat_interleave(torch.arange(mx.numel(), device=dev), n_rows)
    starts = torch.cumsum(n_rows, 0) - n_rows
    row = y_lo.long().index_select(0, gauss) + (torch.arange(gauss.numel(), device=dev) - starts.index_select(0, gauss))

    a, b, c = conics.index_select(0, gauss).unbind(-1)
    dy = row.to(mx.dtype) + 0.5 - my.index_select(0, gauss)
    xc = mx.index_select(0, gauss) - b * dy / a
    rhs = 2.0 * log_level.index_select(0, gauss) - dy * dy * (c - b * b / a)  # a (x - xc)^2 <= rhs
    half_w = torch.sqrt(rhs.clamp_min(0) / a) * 1.0001 + 1e-3
    x_lo = torch.ceil(xc - half_w - 0.5).clamp_min(0)
    x_hi = torch.floor(xc + half_w - 0.5).clamp_max(width - 1)
    keep = (x_hi >= x_lo) & (rhs > -1e-3)
    idx = torch.nonzero(keep).squeeze(1)
    return gauss.index_select(0, idx), row.index_select(0, idx), x_lo.long()[idx], x_hi.long()[idx]


@torch.no_grad()
def _build_pieces(
    ivl_gauss: torch.Tensor,  # [Rb] compact Gaussian index, in depth order
    ivl_row: torch.Tensor,  # [Rb] row relative to the band start
    tx_lo: torch.Tensor,  # [Rb] first tile column
    n_pieces: torch.Tensor,  # [Rb] tile columns touched
    band_rows: int,
    n_tx: int,
    n_gauss: int,
    cfg: TorchRasterConfig,
    use_csr: bool,
    dtype: torch.dtype,
) -> _Pieces:
    dev = ivl_gauss.device
    tw = cfg.tile_width
    r_b = ivl_gauss.numel()
    ivl_gen = torch.repeat_interleave(torch.arange(r_b, device=dev), n_pieces)  # [Kp] generation order
    starts = torch.cumsum(n_pieces, 0) - n_pieces
    tx = tx_lo.index_select(0, ivl_gen) + (torch.arange(ivl_gen.numel(), device=dev) - starts.index_select(0, ivl_gen))
    group_gen = ivl_row.index_select(0, ivl_gen) * n_tx + tx
    n_groups = band_rows * n_tx
    small = n_groups < 2**31
    key = group_gen.to(torch.int32) if small else group_gen
    group, order = torch.sort(key, stable=True)  # pieces were generated front to back
    ivl = ivl_gen.index_select(0, order)
    gauss = ivl_gauss.index_select(0, ivl)
    counts = torch.bincount(group, minlength=n_groups)
    group_nonempty = torch.nonzero(counts).squeeze(1)
    group_first = (torch.cumsum(counts, 0) - counts).index_select(0, group_nonempty)
    x0 = torch.remainder(group, n_tx).mul_(tw).to(dtype).add_(0.5)[:, None]
    lanes = torch.arange(tw, device=dev, dtype=dtype)[None, :]
    group = group.long() if small else group
    group_sum = _SegmentSum(group, n_groups, use_csr)
    return _Pieces(ivl, gauss, group, group_first, group_nonempty, x0, lanes, n_groups, r_b, n_gauss, group_sum)


def _split_bands(rows_cost: torch.Tensor, max_cost: int) -> List[Tuple[int, int]]:
    """Split rows [0, H) into consecutive bands whose summed cost stays <= max_cost (>= 1 row each)."""
    costs = rows_cost.tolist()
    bands, start, acc = [], 0, 0
    for y, cost in enumerate(costs):
        if acc > 0 and acc + cost > max_cost:
            bands.append((start, y))
            start, acc = y, 0
        acc += cost
    bands.append((start, len(costs)))
    return bands


def _render_one_camera(
    means, quats, scales, opacities, sh, viewmat, K, width, height, sh_degree, near_plane, far_plane, cfg,
    antialiased=False,
):
    dev, dtype = means.device, means.dtype
    tw = cfg.tile_width
    use_csr = cfg.use_csr if cfg.use_csr is not None else dev.type == "cpu"
    covars = quat_scale_to_covar(quats, scales)
    proj = project_gaussians(
        means, covars, viewmat[None], K[None], width, height, near_plane=near_plane, far_plane=far_plane
    )
    if antialiased:
        opacities = opacities * antialias_compensation(proj.covars2d[0])
    with torch.no_grad():
        ok = proj.valid[0] & (opacities >= ALPHA_THRESHOLD)
        cand = torch.nonzero(ok).squeeze(1)
        sel = cand.index_select(0, torch.argsort(proj.depths[0].index_select(0, cand), stable=True))
    n_sel = sel.numel()

    means2d = proj.means2d[0].index_select(0, sel)  # [Ns, 2]
    conics = proj.conics[0].index_select(0, sel)  # [Ns, 3]
    depths = proj.depths[0].index_select(0, sel)  # [Ns]
    log_op = torch.log(opacities.index_select(0, sel))  # [Ns]
    cam_center = camera_centers(viewmat[None])[0]
    colors = sh_to_rgb(sh_degree, means.index_select(0, sel) - cam_center, sh.index_select(0, sel))  # [Ns, 3]
    feats = torch.cat([colors, depths[:, None]], 1)  # [Ns, 4]

    n_tx = (width + tw - 1) // tw
    with torch.no_grad():
        ivl_gauss, ivl_row, x_lo, x_hi = _row_intervals(
            means2d[:, 0].detach(),
            means2d[:, 1].detach(),
            conics.detach(),
            proj.covars2d[0, :, 2].index_select(0, sel).detach(),
            (log_op.detach() - LOG_ALPHA_THRESHOLD).clamp_min(0),
            width,
            height,
        )
        tx_lo = torch.div(x_lo, tw, rounding_mode="floor")
        n_pieces = torch.div(x_hi, tw, rounding_mode="floor") - tx_lo + 1
        row_cost = torch.zeros(height, dtype=torch.long, device=dev).index_add_(0, ivl_row, n_pieces) * tw

    # differentiable interval parameters: sigma(x) = amp (x - xc)^2 + B, q = log(opacity) - B
    a, b, c = conics.index_select(0, ivl_gauss).unbind(-1)
    dy = ivl_row.to(dtype) + 0.5 - means2d[:, 1].index_select(0, ivl_gauss)
    b_over_a = b / a
    xc = means2d[:, 0].index_select(0, ivl_gauss) - b_over_a * dy
    amp = 0.5 * a
    q = log_op.index_select(0, ivl_gauss) - 0.5 * dy * dy * (c - b * b_over_a)

    out_rows, tf_rows = [], []
    drawn = False
    for y0, y1 in _split_bands(row_cost, cfg.max_slots_per_chunk):
        with torch.no_grad():
            in_band = torch.nonzero((ivl_row >= y0) & (ivl_row < y1)).squeeze(1)
        band_rows = y1 - y0
        if in_band.numel() == 0:
            out_rows.append(feats.new_zeros(band_rows, n_tx * tw, 4))
            tf_rows.append(feats.new_ones(band_rows, n_tx * tw))
            continue
        pieces = _build_pieces(
            ivl_gauss.index_select(0, in_band),
            ivl_row.index_select(0, in_band) - y0,
            tx_lo.index_select(0, in_band),
            n_pieces.index_select(0, in_band),
            band_rows,
            n_tx,
            n_sel,
            cfg,
            use_csr,
            dtype,
        )
        drawn = True
        out, t_final = _Composite.apply(
            xc.index_select(0, in_band), amp.index_select(0, in_band), q.index_select(0, in_band), feats, pieces
        )
        out_rows.append(out.reshape(band_rows, n_tx * tw, 4))
        tf_rows.append(t_final.reshape(band_rows, n_tx * tw))
    out = torch.cat(out_rows, 0)[:, :width]  # [H, W, 4]
    t_final = torch.cat(tf_rows, 0)[:, :width, None]  # [H, W, 1]
    if not drawn and torch.is_grad_enabled():
        # nothing visible: keep the outputs attached to the inputs so that backward() still works
        zero = sum(t.sum() for t in (means, quats, scales, opacities, sh)) * 0.0
        out = out + zero
    return out, t_final


def finish_camera(
    out: torch.Tensor,  # [H, W, 4] sum_i w_i (rgb_i, z_i)
    t_final: torch.Tensor,  # [H, W, 1] final transmittance
    background: Optional[torch.Tensor] = None,  # [3]; None = black
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One camera's composite -> rgb [H, W, 3] (background added once, weighted by T_final),
    alpha = 1 - T_final [H, W, 1], expected depth sum w_i z_i / alpha [H, W, 1] (0 where nothing drew)."""
    alpha = 1.0 - t_final
    rgb = out[..., :3]
    if background is not None:
        rgb = rgb + t_final * background
    return rgb, alpha, out[..., 3:4] / alpha.clamp_min(1e-10)


def rasterize_torch(
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
    config: Optional[TorchRasterConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render C views. Returns rgb [C, H, W, 3], alpha [C, H, W, 1], expected depth [C, H, W, 1]
    (sum w_i z_i / alpha, gsplat "ED"). ``rgb = sum_i w_i c_i + (1 - alpha) * background``."""
    cfg = config or TorchRasterConfig()
    rgbs, alphas, depths = [], [], []
    for cam in range(viewmats.shape[0]):
        out, t_final = _render_one_camera(
            means, quats, scales, opacities, sh, viewmats[cam], Ks[cam], width, height,
            sh_degree, near_plane, far_plane, cfg, antialiased,
        )
        rgb, alpha, depth = finish_camera(out, t_final, None if backgrounds is None else backgrounds[cam])
        rgbs.append(rgb)
        alphas.append(alpha)
        depths.append(depth)
    return torch.stack(rgbs), torch.stack(alphas), torch.stack(depths)
