"""Bind Gaussians to FLAME triangles: triangle frames, local coordinates, SH rotation.

Triangle frame (our definition, GaussianAvatars-like): for a triangle (v0, v1, v2)
- rotation ``R = [e1, e2, n]`` (columns) with ``e1 = normalize(v1 - v0)``,
  ``n = normalize((v1 - v0) x (v2 - v0))``, ``e2 = n x e1`` (right-handed, orthonormal);
- scale ``s`` = mean length of the three edges (one isotropic number per triangle);
- origin ``o = sum_j b_j v_j``, the Gaussian's barycentric anchor on the triangle
  (the centroid, b = 1/3, when Gaussian i is anchored at triangle i's centre).

A Gaussian (mean x, quaternion q, log-scales l, SH bands 1..3 f) is stored in its triangle's frame as
``x_loc = R^T (x - o) / s``, ``q_loc = quat(R)^-1 ⊗ q``, ``l_loc = l - log s``, ``f_loc = D(R^T) f``,
and placed on any other mesh by the inverse with that mesh's (R', s', o').
``D(R)`` rotates real SH coefficients so that colour(d) after = colour(R^T d) before (exact, bands 1-3).

Quaternions are w x y z (``fastavatar.core.splats``); canonical sign is w >= 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from fastavatar.core.rotations import canonical_sign, matrix_to_quat, quat_conjugate, quat_multiply
from fastavatar.core.sh import sh_basis, sh_terms
from fastavatar.core.splats import Splats

# --------------------------------------------------------------------------------------------
# Real SH rotation (bands 1..3, the 3DGS basis)
# --------------------------------------------------------------------------------------------

_SH_BANDS = ((0, 3), (3, 8), (8, 15))  # slices of shN for l = 1, 2, 3


def sh_basis_rest(dirs: torch.Tensor) -> torch.Tensor:
    """[..., 3] directions -> [..., 15] real SH bands 1..3 (:func:`fastavatar.core.sh.sh_basis` without band 0)."""
    return sh_basis(3, dirs)[..., 1:]


_SH_SAMPLE_CACHE = {}
_SH_NUM_SAMPLES = 16  # sample directions for fitting the rotation matrices (>= 7 needed for band 3)


def _sh_samples(dtype, device) -> Tuple[torch.Tensor, list]:
    """Fixed well-spread sample directions [M,3] and per-band pseudo-inverses of their SH values."""
    key = (dtype, str(device))
    if key not in _SH_SAMPLE_CACHE:
        m = _SH_NUM_SAMPLES
        i = np.arange(m) + 0.5
        phi = np.arccos(1 - 2 * i / m)
        theta = np.pi * (1 + 5 ** 0.5) * i
        dirs = np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], -1)
        dirs_t = torch.as_tensor(dirs, dtype=torch.float64)
        basis = sh_basis_rest(dirs_t)  # [M, 15]
        pinvs = [torch.linalg.pinv(basis[:, a:b]).to(dtype=dtype, device=device) for a, b in _SH_BANDS]
        _SH_SAMPLE_CACHE[key] = (dirs_t.to(dtype=dtype, device=device), pinvs)
    return _SH_SAMPLE_CACHE[key]


def sh_rotation_matrices(rot: torch.Tensor) -> list:
    """Per-band SH rotation matrices for rotations [N,3,3], component-major: [3,3,N], [5,5,N], [7,7,N].

    ``D_l`` satisfies ``Y_l(R^T d) = Y_l(d) D_l`` (row vectors), so coefficients rotate as
    ``f' = D_l f`` and the rotated lobe's colour in direction d equals the old one at R^T d.
    Band l is rotation-invariant, so fitting on M >= 2l+1 generic directions is exact:
    ``D_l = pinv(Y_l(S)) Y_l(R^T S)``. Both products are single GEMMs over all Gaussians, and
    everything is laid out component-major so the element-wise work is on contiguous vectors.
    """
    dirs, pinvs = _sh_samples(rot.dtype, rot.device)
    n, m = rot.shape[0], dirs.shape[0]
    rotated = (dirs @ rot.permute(1, 2, 0).reshape(3, 3 * n)).view(m, 3, n)  # (R^T s)_k = sum_i s_i R_ik
    x, y, z = rotated[:, 0], rotated[:, 1], rotated[:, 2]  # each [M, N], contiguous rows
    basis = _sh_basis_soa(x, y, z)  # [15, M, N]
    mats = []
    for pinv, (a, b) in zip(pinvs, _SH_BANDS):
        width = b - a
        band = basis[a:b].permute(1, 0, 2).reshape(m, width * n)  # [M, j*N]
        mats.append((pinv @ band).view(width, width, n))  # D[i, j, n]
    return mats


def _sh_basis_soa(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Bands 1..3 for component arrays (unit directions) -> [15, ...], component-major."""
    return torch.stack(sh_terms(3, x, y, z)[1:], dim=0)


def rotate_sh(shn: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate SH bands 1..3 [N, K, 3] (K = 3, 8 or 15) by rotations [N, 3, 3]."""
    if shn.shape[1] == 0:
        return shn
    mats = sh_rotation_matrices(rot.to(shn.dtype))
    coeffs = shn.permute(1, 2, 0)  # [K, 3, N]
    out = []
    for mat, (a, b) in zip(mats, _SH_BANDS):
        if a >= shn.shape[1]:
            break
        out.append((mat[:, :, None, :] * coeffs[None, a:b]).sum(1))  # [i, 3, N]
    return torch.cat(out, dim=0).permute(2, 0, 1)


# --------------------------------------------------------------------------------------------
# Triangle frames and nearest triangles
# --------------------------------------------------------------------------------------------


def triangle_frames(vertices: torch.Tensor, faces: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Vertices [..., V, 3], faces [F, 3] -> rotations [..., F, 3, 3] (columns e1, e2, n), scales [..., F]."""
    tri = vertices[..., faces, :]  # [..., F, 3, 3]
    a, b, c = tri[..., 0, :], tri[..., 1, :], tri[..., 2, :]
    e1 = F.normalize(b - a, dim=-1)
    n = F.normalize(torch.linalg.cross(b - a, c - a, dim=-1), dim=-1)
    e2 = torch.linalg.cross(n, e1, dim=-1)
    rot = torch.stack([e1, e2, n], dim=-1)
    scale = ((b - a).norm(dim=-1) + (c - b).norm(dim=-1) + (a - c).norm(dim=-1)) / 3.0
    return rot, scale


def closest_point_barycentrics(points: torch.Tensor, tri: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Closest point on triangles: points [P,3], tri [P,3,3] -> (barycentrics [P,3], distance [P])."""
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    ab, ac, ap = b - a, c - a, points - a
    d00, d01, d11 = (ab * ab).sum(-1), (ab * ac).sum(-1), (ac * ac).sum(-1)
    d20, d21 = (ap * ab).sum(-1), (ap * ac).sum(-1)
    denom = (d00 * d11 - d01 * d01).clamp_min(1e-30)
    v = (d11 * d20 - d01 * d21) / denom
    w = (d00 * d21 - d01 * d20) / denom
    bary = torch.stack([1 - v - w, v, w], dim=-1)
    inside = (bary >= 0).all(dim=-1)
    # Outside: best of the three edges (clamped segment projections).
    best_bary, best_dist = bary.clone(), torch.full_like(v, float("inf"))
    for i, j in ((0, 1), (1, 2), (2, 0)):
        p0, p1 = tri[:, i], tri[:, j]
        seg = p1 - p0
        t = (((points - p0) * seg).sum(-1) / (seg * seg).sum(-1).clamp_min(1e-30)).clamp(0, 1)
        dist = (p0 + t[:, None] * seg - points).norm(dim=-1)
        edge_bary = torch.zeros_like(bary)
        edge_bary[:, i] = 1 - t
        edge_bary[:, j] = t
        better = dist < best_dist
        best_dist = torch.where(better, dist, best_dist)
        best_bary = torch.where(better[:, None], edge_bary, best_bary)
    bary = torch.where(inside[:, None], bary, best_bary)
    closest = (bary[:, :, None] * tri).sum(1)
    return bary, (closest - points).norm(dim=-1)


def nearest_triangles(points: torch.Tensor, vertices: torch.Tensor, faces: torch.Tensor, k: int = 16):
    """Nearest triangle of each point [P,3] on a mesh (exact among the k nearest centroids).

    Returns (triangle ids [P] int64, barycentrics [P,3], distances [P]).
    """
    from scipy.spatial import cKDTree

    centres = vertices[faces].mean(1)
    k = min(k, faces.shape[0])
    _, cand = cKDTree(centres.detach().cpu().numpy()).query(points.detach().cpu().numpy(), k=k)
    cand = torch.as_tensor(np.asarray(cand).reshape(points.shape[0], k), dtype=torch.int64)
    p = points[:, None].expand(-1, k, 3).reshape(-1, 3)
    bary, dist = closest_point_barycentrics(p, vertices[faces[cand.reshape(-1)]])
    dist = dist.reshape(-1, k)
    best = dist.argmin(dim=1)
    rows = torch.arange(points.shape[0])
    return cand[rows, best], bary.reshape(-1, k, 3)[rows, best], dist[rows, best]


# --------------------------------------------------------------------------------------------
# Binding
# --------------------------------------------------------------------------------------------


@dataclass
class Binding:
    """Gaussian -> triangle binding with local coordinates (N Gaussians)."""

    triangle_ids: torch.Tensor  # [N] int64 triangle of each Gaussian
    barycentrics: torch.Tensor  # [N, 3] anchor on the triangle (1/3 each for centroids)
    local_means: torch.Tensor  # [N, 3] mean in the triangle frame, in units of the triangle scale
    local_quats: torch.Tensor  # [N, 4] wxyz rotation relative to the triangle frame
    local_log_scales: torch.Tensor  # [N, 3] log-scale minus log triangle scale
    local_shN: torch.Tensor  # [N, K, 3] SH bands 1..3 expressed in the triangle frame
    mode: str  # "index" (Gaussian i <-> triangle i centroid), "index+nearest" or "nearest" (see bind_splats)
    index_max_error: float  # max |centroid_i - anchor_i| over i < min(N, F) (metres; inf without anchors)

    @property
    def num_gaussians(self) -> int:
        return int(self.triangle_ids.shape[0])


def anchor_frames(vertices: torch.Tensor, faces: torch.Tensor, triangle_ids: torch.Tensor, barycentrics: torch.Tensor):
    """Per-Gaussian frames on a mesh: vertices [..., V, 3] -> (R [...,N,3,3], s [...,N], o [...,N,3])."""
    rot, scale = triangle_frames(vertices, faces[triangle_ids])
    tri = vertices[..., faces[triangle_ids], :]  # [..., N, 3, 3]
    origin = (barycentrics.to(tri)[..., :, :, None] * tri).sum(-2)
    return rot, scale, origin


def check_index_binding(anchors: torch.Tensor, vertices: torch.Tensor, faces: torch.Tensor) -> float:
    """Max distance between anchor i [N,3] and the centroid of triangle i, over i < min(N, F)."""
    m = min(anchors.shape[0], faces.shape[0])
    centres = vertices[faces[:m]].mean(1)
    return float((centres - anchors[:m].to(centres)).norm(dim=-1).max())


def bind_splats(
    splats: Splats,
    vertices: torch.Tensor,  # [V, 3] source mesh (the pose the splats were reconstructed in)
    faces: torch.Tensor,  # [F, 3]
    anchors: Optional[torch.Tensor] = None,  # [N, 3] anchor points (the subject's points3D)
    tol: float = 1e-5,
) -> Binding:
    """Bind each Gaussian to a triangle of the source mesh and store its local coordinates.

    Modes (stored in :attr:`Binding.mode`):
    - "index": triangle i's centroid equals anchor i for every i (within ``tol``), so Gaussian i is
      bound to triangle i at its centroid (FastAvatar's construction, N == F).
    - "index+nearest": the first F anchors match (e.g. a FLAME model without VHAP's teeth and
      N = 10144 > F = 9976); the remaining Gaussians are bound to their nearest triangle.
    - "nearest": no index match (or no anchors); every Gaussian is bound to the triangle closest
      to its mean, at the closest point (barycentrics stored).
    """
    dtype = vertices.dtype
    means = splats["means"].detach().to(dtype)
    n, f = means.shape[0], faces.shape[0]
    err = check_index_binding(anchors, vertices, faces) if anchors is not None else float("inf")
    if anchors is not None and anchors.shape[0] != n:
        raise ValueError(f"{anchors.shape[0]} anchor points for {n} Gaussians")
    matched = min(n, f) if err <= tol else 0
    tri_ids = torch.arange(n, dtype=torch.int64).clamp_max(f - 1)
    bary = torch.full((n, 3), 1.0 / 3.0, dtype=dtype)
    if matched < n:
        ids, b, _ = nearest_triangles(means[matched:], vertices, faces)
        tri_ids[matched:], bary[matched:] = ids, b
    mode = "index" if matched == n else ("index+nearest" if matched else "nearest")
    rot, scale, origin = anchor_frames(vertices, faces, tri_ids, bary)
    rot_t = rot.transpose(-1, -2)
    local_means = (rot_t @ (means - origin)[..., None])[..., 0] / scale[:, None]
    local_quats = quat_multiply(quat_conjugate(matrix_to_quat(rot)), splats["quats"].detach().to(dtype))
    local_log_scales = splats["scales"].detach().to(dtype) - torch.log(scale)[:, None]
    local_shn = rotate_sh(splats["shN"].detach().to(dtype), rot_t)
    return Binding(tri_ids, bary, local_means, canonical_sign(local_quats), local_log_scales, local_shn, mode, err)


def place_splats(binding: Binding, base: Splats, vertices: torch.Tensor, faces: torch.Tensor,
                 rotate_colours: bool = True) -> Splats:
    """Put bound Gaussians on a mesh (vertices [V, 3]); opacities and sh0 come from ``base``."""
    rot, scale, origin = anchor_frames(vertices, faces, binding.triangle_ids, binding.barycentrics)
    dtype = base["means"].dtype
    means = origin + scale[:, None] * (rot @ binding.local_means.to(rot)[..., None])[..., 0]
    quats = canonical_sign(quat_multiply(matrix_to_quat(rot), binding.local_quats.to(rot)))
    out = dict(base)
    out["means"] = means.to(dtype)
    out["quats"] = quats.to(dtype)
    out["scales"] = (binding.local_log_scales.to(rot) + torch.log(scale)[:, None]).to(dtype)
    if rotate_colours:
        out["shN"] = rotate_sh(binding.local_shN.to(rot), rot).to(dtype)
    return out
