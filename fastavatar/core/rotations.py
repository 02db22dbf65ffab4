"""Quaternions, rotation vectors and rotation matrices (torch, batched over leading dims).

Quaternions are w x y z (``fastavatar.core.splats``); rotation matrices act on column vectors
(``x' = R x``); canonical sign is w >= 0. Used by the animation rig, the viewer, the tracker's
quaternion pose head and the rasterizer's covariances.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def quat_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product of [..., 4] wxyz quaternions (rotation b first, then a)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )


def quat_conjugate(q: torch.Tensor) -> torch.Tensor:
    return q * torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=q.dtype, device=q.device)


def canonical_sign(q: torch.Tensor) -> torch.Tensor:
    """Flip [..., 4] quaternions so that w >= 0 (no normalisation)."""
    return torch.where(q[..., :1] < 0, -q, q)


def rotvec_to_quat(r: torch.Tensor) -> torch.Tensor:
    """[..., 3] rotation vectors (axis * angle) -> [..., 4] unit wxyz (exp map; safe at 0)."""
    theta = r.norm(dim=-1, keepdim=True)
    small = theta < 1e-6
    safe = torch.where(small, torch.ones_like(theta), theta)
    k = torch.where(small, 0.5 - theta * theta / 48.0, torch.sin(0.5 * safe) / safe)
    return torch.cat([torch.cos(0.5 * theta), r * k], dim=-1)


def quat_to_rotvec(q: torch.Tensor) -> torch.Tensor:
    """[..., 4] wxyz (any norm, any sign) -> [..., 3] rotation vectors with angle in [0, pi] (log map)."""
    q = canonical_sign(F.normalize(q, dim=-1))
    w, v = q[..., :1], q[..., 1:]
    s = v.norm(dim=-1, keepdim=True)
    theta = 2.0 * torch.atan2(s, w)
    small = s < 1e-7
    k = torch.where(small, 2.0 / w.clamp_min(1e-12), theta / torch.where(small, torch.ones_like(s), s))
    return v * k


def quat_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """[..., 4] wxyz (any norm) -> [..., 3, 3] rotation."""
    w, x, y, z = F.normalize(q, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(q.shape[:-1] + (3, 3))


def matrix_to_quat(m: torch.Tensor) -> torch.Tensor:
    """[..., 3, 3] rotation -> [..., 4] unit wxyz with w >= 0 (numerically stable branch choice)."""
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    two_abs = torch.sqrt(
        torch.stack(
            [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1
        ).clamp_min(0.0)
    )  # [..., 4] = 2|q_i|
    cands = torch.stack(
        [
            torch.stack([two_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], -1),
            torch.stack([m21 - m12, two_abs[..., 1] ** 2, m10 + m01, m02 + m20], -1),
            torch.stack([m02 - m20, m10 + m01, two_abs[..., 2] ** 2, m12 + m21], -1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, two_abs[..., 3] ** 2], -1),
        ],
        dim=-2,
    ) / (2.0 * two_abs[..., :, None].clamp_min(1e-12))
    best = two_abs.argmax(dim=-1)
    q = torch.gather(cands, -2, best[..., None, None].expand(best.shape + (1, 4)))[..., 0, :]
    return canonical_sign(F.normalize(q, dim=-1))
