"""EWA projection of 3D Gaussians to the image plane (pinhole, gsplat "classic" mode).

Conventions: ``viewmats`` are world-to-camera (OpenCV: x right, y down, z forward); ``Ks`` in pixels,
pixel (i, j) has its centre at (j + 0.5, i + 0.5). The projected 2D covariance gets ``eps2d`` (0.3 px^2)
added to its diagonal, as gsplat does; the Jacobian uses the camera-space mean clamped to 1.3x the
field of view, as gsplat and 3DGS do, so Gaussians far outside the image do not blow up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastavatar.core.rotations import quat_to_matrix

ALPHA_THRESHOLD = 1.0 / 255.0  # pairs with alpha below this are skipped (3DGS / gsplat)


def quat_scale_to_covar(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Sigma = R S S^T R^T. quats [N, 4] wxyz, scales [N, 3] (activated std devs) -> [N, 3, 3]."""
    m = quat_to_matrix(quats) * scales[..., None, :]  # [N, 3, 3] = R S
    return m @ m.transpose(-1, -2)


@dataclass
class Projected:
    """Per camera and Gaussian screen-space quantities. All [C, N, ...]."""

    means2d: torch.Tensor  # [C, N, 2] pixel coordinates of the projected mean
    covars2d: torch.Tensor  # [C, N, 3] dilated 2D covariance (xx, xy, yy)
    conics: torch.Tensor  # [C, N, 3] inverse dilated 2D covariance (a, b, c): sigma = a dx^2/2 + b dx dy + c dy^2/2
    depths: torch.Tensor  # [C, N] camera-space z
    valid: torch.Tensor  # [C, N] bool: near < z < far and a positive determinant


def project_gaussians(
    means: torch.Tensor,  # [N, 3]
    covars: torch.Tensor,  # [N, 3, 3]
    viewmats: torch.Tensor,  # [C, 4, 4] world-to-camera
    Ks: torch.Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
) -> Projected:
    """Project Gaussians into C pinhole cameras (differentiable; invalid entries stay finite)."""
    rot = viewmats[:, :3, :3]  # [C, 3, 3]
    trans = viewmats[:, :3, 3]  # [C, 3]
    means_c = torch.einsum("cij,nj->cni", rot, means) + trans[:, None, :]  # [C, N, 3]
    covars_c = torch.einsum("cij,njk,clk->cnil", rot, covars, rot)  # [C, N, 3, 3]

    tx, ty, tz = means_c.unbind(-1)  # [C, N]
    depth_ok = (tz > near_plane) & (tz < far_plane)
    tz_safe = torch.where(depth_ok, tz, torch.ones_like(tz))  # keeps gradients finite for culled ones

    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [C, 1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]  # [C, 1]
    lim_x_pos = (width - cx) / fx + 0.3 * (0.5 * width / fx)
    lim_x_neg = cx / fx + 0.3 * (0.5 * width / fx)
    lim_y_pos = (height - cy) / fy + 0.3 * (0.5 * height / fy)
    lim_y_neg = cy / fy + 0.3 * (0.5 * height / fy)
    inv_z = 1.0 / tz_safe
    u = tx * inv_z
    v = ty * inv_z
    u_clamped = torch.minimum(torch.maximum(u, -lim_x_neg), lim_x_pos)
    v_clamped = torch.minimum(torch.maximum(v, -lim_y_neg), lim_y_pos)

    # Jacobian rows J0 = (fx/z, 0, -fx u_c / z), J1 = (0, fy/z, -fy v_c / z)
    j00 = fx * inv_z
    j02 = -fx * u_clamped * inv_z
    j11 = fy * inv_z
    j12 = -fy * v_clamped * inv_z
    s = covars_c
    # cov2d = J S J^T, written out (J has two zeros)
    c00 = j00 * j00 * s[..., 0, 0] + 2 * j00 * j02 * s[..., 0, 2] + j02 * j02 * s[..., 2, 2]
    c11 = j11 * j11 * s[..., 1, 1] + 2 * j11 * j12 * s[..., 1, 2] + j12 * j12 * s[..., 2, 2]
    c01 = j00 * j11 * s[..., 0, 1] + j00 * j12 * s[..., 0, 2] + j02 * j11 * s[..., 2, 1] + j02 * j12 * s[..., 2, 2]
    c00 = c00 + eps2d
    c11 = c11 + eps2d
    det = c00 * c11 - c01 * c01
    det_ok = det > 0
    det = det.clamp_min(1e-10)
    conics = torch.stack([c11 / det, -c01 / det, c00 / det], dim=-1)  # [C, N, 3]
    means2d = torch.stack([fx * u + cx, fy * v + cy], dim=-1)  # [C, N, 2]
    return Projected(
        means2d=means2d,
        covars2d=torch.stack([c00, c01, c11], dim=-1),
        conics=conics,
        depths=tz,
        valid=depth_ok & det_ok,
    )


def antialias_compensation(covars2d: torch.Tensor, eps2d: float = 0.3) -> torch.Tensor:
    """gsplat's "antialiased" opacity factor ``sqrt(det(cov2d) / det(cov2d + eps2d I))``.

    covars2d [..., 3] is the DILATED (xx, xy, yy), so the undilated determinant is recovered by
    subtracting ``eps2d`` from the diagonal. Returns [...]. The ratio is floored at 1e-12 (the factor at
    1e-6) so that the square root keeps a finite gradient for degenerate Gaussians, which it makes invisible.
    """
    xx, xy, yy = covars2d.unbind(-1)
    det_blur = (xx * yy - xy * xy).clamp_min(1e-10)
    det_orig = (xx - eps2d) * (yy - eps2d) - xy * xy
    return torch.sqrt((det_orig / det_blur).clamp_min(1e-12))


def camera_centers(viewmats: torch.Tensor) -> torch.Tensor:
    """[C, 4, 4] world-to-camera -> [C, 3] camera centres in world space (-R^T t)."""
    rot = viewmats[:, :3, :3]
    trans = viewmats[:, :3, 3]
    return -(rot.transpose(-1, -2) @ trans[..., None])[..., 0]
