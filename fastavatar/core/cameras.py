"""Camera conventions and helpers.

Conventions (owned here):
- Poses are **camera-to-world** (``c2w``) 4x4 matrices in the **OpenCV** convention:
  camera x right, y down, z forward (looking along +z). ``viewmat``/``w2c`` is its inverse.
  COLMAP stores w2c in this same convention; VHAP/NeRF ``transforms.json`` stores c2w in the
  OpenGL convention (y up, z backward), converted by :func:`opengl_to_opencv_c2w`.
- Intrinsics ``K`` = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] in pixels, with the pixel
  centre of pixel (i, j) at (j + 0.5, i + 0.5) (the gsplat/3DGS convention).
- Units: metres (the FLAME/VHAP world frame).
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

_OPENGL_TO_OPENCV = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))


def c2w_to_w2c(c2w: torch.Tensor) -> torch.Tensor:
    """[..., 4, 4] camera-to-world -> world-to-camera (rigid inverse, exact)."""
    rot = c2w[..., :3, :3]
    trans = c2w[..., :3, 3:]
    rot_t = rot.transpose(-1, -2)
    w2c = torch.zeros_like(c2w)
    w2c[..., :3, :3] = rot_t
    w2c[..., :3, 3:] = -rot_t @ trans
    w2c[..., 3, 3] = 1.0
    return w2c


def project_points(X: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """[L,3] world points -> [L,2] continuous pixel coords (OpenCV camera)."""
    w2c = c2w_to_w2c(c2w)
    x = X @ w2c[:3, :3].T + w2c[:3, 3]
    uv = x[:, :2] / x[:, 2:3].clamp_min(1e-6)
    return uv @ K[:2, :2].T + K[:2, 2]


def opengl_to_opencv_c2w(c2w_gl: torch.Tensor) -> torch.Tensor:
    """Flip the camera y and z axes: [..., 4, 4] OpenGL c2w -> OpenCV c2w."""
    return c2w_gl @ _OPENGL_TO_OPENCV.to(c2w_gl)


def scale_intrinsics(K: torch.Tensor, scale: float) -> torch.Tensor:
    """Intrinsics of an image resized by ``scale`` (e.g. 0.5), pixel-centre correct.

    With pixel centres at +0.5, resizing maps u -> u * s exactly for fx, fy, cx, cy.
    """
    K = K.clone()
    K[..., 0, :] *= scale
    K[..., 1, :] *= scale
    return K


def scaled_size(width: int, height: int, scale: float) -> Tuple[int, int]:
    """Image size after resizing by ``scale`` (rounded to the nearest pixel)."""
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


def look_at_c2w(eye: torch.Tensor, target: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """OpenCV c2w [4,4] for a camera at ``eye`` looking at ``target``; ``up`` is world-up."""
    forward = target - eye
    forward = forward / forward.norm()
    right = torch.linalg.cross(forward, up)
    if right.norm() < 1e-8:  # looking straight along up: pick any perpendicular
        right = torch.linalg.cross(forward, torch.tensor([1.0, 0.0, 0.0], dtype=eye.dtype))
    right = right / right.norm()
    down = torch.linalg.cross(forward, right)
    c2w = torch.eye(4, dtype=eye.dtype)
    c2w[:3, 0] = right
    c2w[:3, 1] = down
    c2w[:3, 2] = forward
    c2w[:3, 3] = eye
    return c2w


def orbit_cameras(
    reference_c2w: torch.Tensor,
    target: torch.Tensor,
    num_views: int,
    max_azimuth_deg: float = 180.0,
) -> torch.Tensor:
    """A ring of c2w [V,4,4] around ``target`` at the reference camera's distance and height.

    The ring is centred on the reference camera and sweeps ``±max_azimuth_deg`` about the
    reference camera's up axis (``-y`` of the OpenCV camera), so the first view of a
    360-degree ring is the reference view itself.
    """
    eye0 = reference_c2w[:3, 3]
    up = -reference_c2w[:3, 1]
    offset = eye0 - target
    poses = []
    for i in range(num_views):
        if max_azimuth_deg >= 180.0:
            angle = 2.0 * math.pi * i / num_views
        else:
            frac = i / max(num_views - 1, 1)
            angle = math.radians(-max_azimuth_deg + 2.0 * max_azimuth_deg * frac)
        rot = axis_angle_to_matrix(up * angle)
        poses.append(look_at_c2w(target + rot @ offset, target, up))
    return torch.stack(poses)


def axis_angle_to_matrix(axis_angle: torch.Tensor) -> torch.Tensor:
    """Rodrigues: [..., 3] axis-angle -> [..., 3, 3] rotation matrix (differentiable)."""
    angle = axis_angle.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    axis = axis_angle / angle
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    skew = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(axis.shape[:-1] + (3, 3))
    sin = torch.sin(angle)[..., None]
    cos = torch.cos(angle)[..., None]
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device).expand_as(skew)
    small = (axis_angle.norm(dim=-1) < 1e-12)[..., None, None]
    rot = eye + sin * skew + (1.0 - cos) * (skew @ skew)
    return torch.where(small, eye, rot)
