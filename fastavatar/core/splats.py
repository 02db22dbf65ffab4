"""Splats: a named dict of raw (pre-activation) Gaussian parameters.

Conventions (owned here, used everywhere):
- ``means``     [N, 3]  world position, metres (FLAME/VHAP world frame).
- ``quats``     [N, 4]  rotation quaternion, **w x y z** order, not necessarily
                        normalised (normalised at activation; sign is irrelevant,
                        canonical sign is w >= 0 when we write one).
- ``scales``    [N, 3]  **log** of the per-axis standard deviation.
- ``opacities`` [N]     **logit** of opacity.
- ``sh0``       [N, 1, 3] SH DC coefficient per RGB channel (band 0).
- ``shN``       [N, 15, 3] SH bands 1..3 (coefficient-major in memory: [N, K, 3]).
                        In the PLY file they are stored channel-major
                        (f_rest_0..14 = R, 15..29 = G, 30..44 = B), see ``fastavatar.io.ply``.
Colour = SH(dirs) + 0.5, clamped at 0 (the 3DGS/gsplat convention).

Activation happens in one place: :func:`activate`.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

Splats = Dict[str, torch.Tensor]

SPLAT_KEYS = ("means", "quats", "scales", "opacities", "sh0", "shN")
SH_REST_COEFFS = 15  # SH degree 3: (3+1)^2 - 1


def validate_splats(splats: Splats, where: str = "splats") -> int:
    """Check keys and shapes; return N. Raises ValueError with a one-line message."""
    missing = [k for k in SPLAT_KEYS if k not in splats]
    if missing:
        raise ValueError(f"{where}: missing splat keys {missing}")
    n = splats["means"].shape[0]
    expected = {
        "means": (n, 3),
        "quats": (n, 4),
        "scales": (n, 3),
        "opacities": (n,),
        "sh0": (n, 1, 3),
    }
    for key, shape in expected.items():
        if tuple(splats[key].shape) != shape:
            raise ValueError(f"{where}: {key} has shape {tuple(splats[key].shape)}, expected {shape}")
    shn = splats["shN"]
    if shn.dim() != 3 or shn.shape[0] != n or shn.shape[2] != 3:
        raise ValueError(f"{where}: shN has shape {tuple(shn.shape)}, expected ({n}, K, 3)")
    return n


def activate(splats: Splats) -> Dict[str, torch.Tensor]:
    """Raw parameters -> renderer inputs.

    Returns a dict with ``means [N,3]``, ``quats [N,4]`` (unit, wxyz),
    ``scales [N,3]`` (exp, metres), ``opacities [N]`` (sigmoid, 0..1) and
    ``sh [N,K+1,3]`` (sh0 and shN concatenated).
    """
    return {
        "means": splats["means"],
        "quats": F.normalize(splats["quats"], dim=-1),
        "scales": torch.exp(splats["scales"]),
        "opacities": torch.sigmoid(splats["opacities"]),
        "sh": torch.cat([splats["sh0"], splats["shN"]], dim=1),
    }


def rgb_to_sh0(rgb: torch.Tensor) -> torch.Tensor:
    """[..., 3] colour in 0..1 -> SH DC coefficient (inverse of SH0 * C0 + 0.5)."""
    return (rgb - 0.5) / 0.28209479177387814


def sh0_to_rgb(sh0: torch.Tensor) -> torch.Tensor:
    """SH DC coefficient -> view-independent colour in 0..1 (before clamping)."""
    return sh0 * 0.28209479177387814 + 0.5


def detach_splats(splats: Splats) -> Splats:
    """A copy of ``splats`` with every tensor detached (and cloned)."""
    return {k: v.detach().clone() for k, v in splats.items()}


def canonical_quats(quats: torch.Tensor) -> torch.Tensor:
    """Normalise [N,4] wxyz quaternions and flip signs so that w >= 0."""
    q = F.normalize(quats, dim=-1)
    return torch.where(q[:, :1] < 0, -q, q)
