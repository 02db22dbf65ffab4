"""A dense reference rasterizer: every pixel x every depth-sorted Gaussian (tests and benchmarks only).

Projection and SH come from gsplat's pure-torch reference (``gsplat.cuda._torch_impl``, runs on
CPU, no CUDA build), so this also cross-checks :mod:`fastavatar.render.projection`. The
compositing is ours and follows gsplat's CUDA kernel literally (``antialiased``: opacities times gsplat's
own compensation factor from that projection): ``alpha = min(0.999, o exp(-sigma))``,
pairs with alpha < 1/255 skipped, transmittance as a running product, a pixel stops before the pair
that would take it to T <= 1e-4. Differentiable through autograd. Cost is pixels x Gaussians, so
pixels are processed in chunks of at most ``max_pairs`` pairs.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from fastavatar.render.projection import ALPHA_THRESHOLD
from fastavatar.render.rasterize_torch import MAX_ALPHA, T_EPS, finish_camera


def _composite_dense(
    pix: torch.Tensor,  # [P, 2] pixel centres
    means2d: torch.Tensor,  # [G, 2] depth-sorted
    conics: torch.Tensor,  # [G, 3]
    opacities: torch.Tensor,  # [G]
    feats: torch.Tensor,  # [G, D]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (sum_i w_i feats_i [P, D], final transmittance [P])."""
    delta = means2d[None, :, :] - pix[:, None, :]  # [P, G, 2]
    dx, dy = delta[..., 0], delta[..., 1]
    sigma = 0.5 * (conics[:, 0] * dx * dx + conics[:, 2] * dy * dy) + conics[:, 1] * dx * dy
    alpha = torch.clamp_max(opacities[None, :] * torch.exp(-sigma), MAX_ALPHA)
    alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_THRESHOLD), alpha, torch.zeros_like(alpha))
    with torch.no_grad():
        keep = torch.cumprod(1.0 - alpha, dim=1) > T_EPS  # next_T > 1e-4
    alpha = alpha * keep
    one_minus = 1.0 - alpha
    trans = torch.cumprod(torch.cat([torch.ones_like(one_minus[:, :1]), one_minus[:, :-1]], 1), 1)
    weight = alpha * trans  # [P, G]
    return weight @ feats, torch.prod(one_minus, dim=1)


def rasterize_reference(
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
    max_pairs: int = 1 << 22,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as :func:`fastavatar.render.rasterize_torch.rasterize_torch`."""
    from gsplat.cuda._torch_impl import (  # pure torch; never triggers the CUDA build
        _fully_fused_projection,
        _quat_scale_to_covar_preci,
        _spherical_harmonics,
    )

    covars, _ = _quat_scale_to_covar_preci(quats, scales, True, False, triu=False)
    campos = torch.inverse(viewmats)[:, :3, 3]  # [C, 3]
    k = (sh_degree + 1) ** 2
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=means.dtype, device=means.device),
        torch.arange(width, dtype=means.dtype, device=means.device),
        indexing="ij",
    )
    pix = torch.stack([xs, ys], -1).reshape(-1, 2) + 0.5  # [P, 2]
    rgbs, alphas, eds = [], [], []
    for cam in range(viewmats.shape[0]):
        with torch.no_grad():  # drop Gaussians outside (near, far) first: their projection is not finite
            z = means @ viewmats[cam, 2, :3] + viewmats[cam, 2, 3]
            idx = torch.nonzero((z > near_plane) & (z < far_plane)).squeeze(1)
        radii, means2d, depths, conics, comp = _fully_fused_projection(
            means[idx], covars[idx], viewmats[cam : cam + 1], Ks[cam : cam + 1], width, height,
            near_plane=near_plane, far_plane=far_plane, calc_compensations=antialiased,
        )
        opac = opacities[idx] * comp[0] if antialiased else opacities[idx]  # gsplat's antialiased mode
        means2d, depths, conics = means2d[0], depths[0], conics[0]
        with torch.no_grad():
            keep = torch.nonzero((radii[0] > 0).all(-1)).squeeze(1)
            keep = keep[torch.argsort(depths[keep], stable=True)]
        idx = idx[keep]
        means2d, depths, conics, opac = means2d[keep], depths[keep], conics[keep], opac[keep]
        dirs = means[idx] - campos[cam]
        colors = torch.clamp_min(_spherical_harmonics(sh_degree, dirs, sh[idx, :k]) + 0.5, 0.0)
        feats = torch.cat([colors, depths[:, None]], 1)  # [G, 4]
        chunk = max(1, max_pairs // max(1, idx.numel()))
        outs, tfs = [], []
        for p0 in range(0, pix.shape[0], chunk):
            o, t = _composite_dense(pix[p0 : p0 + chunk], means2d, conics, opac, feats)
            outs.append(o)
            tfs.append(t)
        out = torch.cat(outs, 0).reshape(height, width, 4)
        t_final = torch.cat(tfs, 0).reshape(height, width, 1)
        rgb, alpha, ed = finish_camera(out, t_final, None if backgrounds is None else backgrounds[cam])
        rgbs.append(rgb)
        alphas.append(alpha)
        eds.append(ed)
    return torch.stack(rgbs), torch.stack(alphas), torch.stack(eds)
