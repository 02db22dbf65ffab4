"""Real spherical harmonics up to degree 3 (the 3DGS / gsplat convention).

Colour of a Gaussian seen along ``dirs`` (mean - camera centre, any length):
``rgb = max(0, sum_k coeffs[k] * Y_k(dirs / |dirs|) + 0.5)``.
Coefficient order and signs follow the INRIA 3DGS ``eval_sh`` layout, which gsplat also uses.
"""

from __future__ import annotations

from typing import List

import torch

SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)


def num_sh_bases(degree: int) -> int:
    """Number of SH coefficients of a given degree: (degree + 1)^2."""
    return (degree + 1) ** 2


def sh_terms(degree: int, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> List[torch.Tensor]:
    """The (degree+1)^2 basis values, one tensor each, for unit-direction components x, y, z of any
    (equal) shape. :func:`sh_basis` stacks them last; SH rotation (``animate.binding``) stacks them
    first, component-major."""
    if not 0 <= degree <= 3:
        raise ValueError(f"sh_basis: degree must be 0..3, got {degree}")
    out = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        out += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        xy, yz, xz = x * y, y * z, x * z
        out += [
            SH_C2[0] * xy,
            SH_C2[1] * yz,
            SH_C2[2] * (2.0 * zz - xx - yy),
            SH_C2[3] * xz,
            SH_C2[4] * (xx - yy),
        ]
    if degree >= 3:
        r = 4.0 * zz - xx - yy
        out += [
            SH_C3[0] * y * (3.0 * xx - yy),
            SH_C3[1] * xy * z,
            SH_C3[2] * y * r,
            SH_C3[3] * z * (2.0 * zz - 3.0 * xx - 3.0 * yy),
            SH_C3[4] * x * r,
            SH_C3[5] * z * (xx - yy),
            SH_C3[6] * x * (xx - 3.0 * yy),
        ]
    return out


def sh_basis(degree: int, dirs: torch.Tensor) -> torch.Tensor:
    """[..., 3] directions (normalised here) -> [..., (degree+1)^2] SH basis values."""
    d = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.stack(sh_terms(degree, *d.unbind(-1)), dim=-1)


def eval_sh(degree: int, dirs: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Raw SH value (no +0.5, no clamp).

    Args:
        degree: 0..3; only the first (degree+1)^2 coefficients are used.
        dirs: [..., 3] view directions (need not be unit length).
        coeffs: [..., K, 3] with K >= (degree+1)^2.
    Returns:
        [..., 3]
    """
    k = num_sh_bases(degree)
    if coeffs.shape[-2] < k:
        raise ValueError(f"eval_sh: degree {degree} needs {k} coefficients, got {coeffs.shape[-2]}")
    basis = sh_basis(degree, dirs)  # [..., k]
    return (basis.unsqueeze(-1) * coeffs[..., :k, :]).sum(dim=-2)


def sh_to_rgb(degree: int, dirs: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Colour in the 3DGS convention: ``clamp_min(eval_sh + 0.5, 0)``. [..., 3]."""
    return torch.clamp_min(eval_sh(degree, dirs, coeffs) + 0.5, 0.0)
