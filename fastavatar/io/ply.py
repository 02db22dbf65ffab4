"""Standard 3DGS PLY read/write (the INRIA / gsplat layout that SuperSplat and other viewers open).

File layout (binary little-endian, every property float32, in this order)::

    x y z  nx ny nz  f_dc_0..2  f_rest_0..44  opacity  scale_0..2  rot_0..3

Values are stored raw, exactly as in :mod:`fastavatar.core.splats`: log scales, logit opacity, wxyz
quaternion (we write it normalised with w >= 0), SH coefficients. ``f_rest`` is **channel-major**:
f_rest_0..14 are the R coefficients of bands 1..3, then 15 G, then 15 B, i.e. ``shN.permute(0, 2, 1)``.
Normals are written as zeros (viewers ignore them; the INRIA files carry them).

Writing is vectorised (a numpy structured array) and atomic. Reading goes through plyfile, so ASCII
PLYs and other property types (double, uchar, ...) are converted rather than misread; files that
lack required properties, have 0 vertices, NaN/Inf values or an ``f_rest`` count that is not an SH
degree 0-3 layout raise a one-line ``PlyFormatError`` naming the file. Anything non-standard
(rig, binding) goes into an ``.npz`` sidecar, never into extra PLY properties.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch

from fastavatar.core.splats import Splats, canonical_quats, validate_splats
from fastavatar.io.atomic import atomic_path

PathLike = Union[str, Path]


class PlyFormatError(ValueError):
    """A PLY file that is not a readable 3DGS splat file."""


def ply_property_names(sh_rest_coeffs: int = 15) -> list:
    """The exact INRIA column order for SH degree with ``sh_rest_coeffs`` rest coefficients."""
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    names += [f"f_rest_{i}" for i in range(3 * sh_rest_coeffs)]
    names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    return names


def splats_to_ply_array(splats: Splats) -> np.ndarray:
    """Raw splats -> [N, 62] float32 table in INRIA column order (rows with NaN/Inf kept)."""
    n = validate_splats(splats)
    with torch.no_grad():
        means = splats["means"].detach().float().cpu()
        quats = canonical_quats(splats["quats"].detach().float().cpu())
        sh0 = splats["sh0"].detach().float().cpu().reshape(n, 3)
        shn = splats["shN"].detach().float().cpu().permute(0, 2, 1).reshape(n, -1)
        columns = [
            means,
            torch.zeros(n, 3),
            sh0,
            shn,
            splats["opacities"].detach().float().cpu().reshape(n, 1),
            splats["scales"].detach().float().cpu(),
            quats,
        ]
        return torch.cat(columns, dim=1).numpy()


def save_ply(path: PathLike, splats: Splats) -> int:
    """Write ``splats`` as a binary little-endian INRIA 3DGS PLY, atomically.

    Rows with any NaN/Inf are dropped with a warning saying how many. Returns rows written.
    """
    table = splats_to_ply_array(splats)
    finite = np.isfinite(table).all(axis=1)
    dropped = int((~finite).sum())
    if dropped:
        warnings.warn(f"{path}: dropped {dropped} of {len(table)} Gaussians with NaN/Inf values", stacklevel=2)
        table = table[finite]
    names = ply_property_names((table.shape[1] - 17) // 3)
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(table)}"]
    header += [f"property float {name}" for name in names]
    header += ["end_header"]
    payload = ("\n".join(header) + "\n").encode("ascii") + np.ascontiguousarray(table, dtype="<f4").tobytes()
    with atomic_path(path, suffix=".ply") as tmp:
        tmp.write_bytes(payload)
    return len(table)


def load_ply(path: PathLike, device: Union[str, torch.device] = "cpu") -> Splats:
    """Read a 3DGS PLY (binary or ASCII, any numeric property types) into raw splats.

    Returns ``means [N,3], quats [N,4], scales [N,3], opacities [N], sh0 [N,1,3], shN [N,K,3]``
    (K = 0 when the file has no ``f_rest_*``), all float32.
    """
    from plyfile import PlyData

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: PLY file not found")
    try:
        ply = PlyData.read(str(path))
    except Exception as exc:  # plyfile raises several types for broken headers/bodies
        raise PlyFormatError(f"{path}: not a readable PLY file ({type(exc).__name__}: {exc})") from None
    if "vertex" not in ply:
        raise PlyFormatError(f"{path}: no 'vertex' element (compressed SuperSplat PLYs are not supported)")
    vertex = ply["vertex"].data
    available = set(vertex.dtype.names or ())

    def columns(names):
        missing = [n for n in names if n not in available]
        if missing:
            raise PlyFormatError(f"{path}: missing vertex properties {missing[:6]}")
        return np.stack([np.asarray(vertex[n], dtype=np.float32) for n in names], axis=1)

    n = len(vertex)
    if n == 0:
        raise PlyFormatError(f"{path}: 0 vertices (an empty splat file)")
    rest = sorted((p for p in available if p.startswith("f_rest_")), key=lambda p: int(p.split("_")[-1]))
    if len(rest) not in (0, 9, 24, 45):
        raise PlyFormatError(f"{path}: {len(rest)} f_rest_* properties; SH degrees 0-3 have 0, 9, 24 or 45")
    k = len(rest) // 3
    shn = columns(rest).reshape(n, 3, k).transpose(0, 2, 1) if k else np.zeros((n, 0, 3), np.float32)
    splats = {
        "means": columns(["x", "y", "z"]),
        "quats": columns([f"rot_{i}" for i in range(4)]),
        "scales": columns([f"scale_{i}" for i in range(3)]),
        "opacities": columns(["opacity"])[:, 0],
        "sh0": columns([f"f_dc_{i}" for i in range(3)]).reshape(n, 1, 3),
        "shN": np.ascontiguousarray(shn),
    }
    finite = np.ones(n, dtype=bool)
    for value in splats.values():
        finite &= np.isfinite(value.reshape(n, -1)).all(axis=1)
    bad = int((~finite).sum())
    if bad:
        first = int(np.flatnonzero(~finite)[0])
        raise PlyFormatError(f"{path}: {bad} of {n} Gaussians have NaN/Inf values (first: vertex {first})")
    return {key: torch.from_numpy(np.ascontiguousarray(value)).to(device) for key, value in splats.items()}
