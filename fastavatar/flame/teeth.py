"""Teeth extension of FLAME in the VHAP layout (what we could rebuild from the description).

VHAP (the tracker of the sample data) appends 120 teeth vertices and 168 teeth faces to FLAME:
5023 + 120 = 5143 vertices (the ``static_offset`` rows) and 9976 + 168 = 10144 faces (the
FastAvatar points). The published facts we rely on (see the project spec):
- teeth vertices have zero expression basis, zero pose correctives and zero joint-regressor weight;
- upper teeth are skinned 100% to the neck joint, lower teeth 100% to the jaw joint;
- 120 = 2 sets (upper, lower) x 4 rows x 15 columns, 168 = 2 sets x 3 row-strips x 14 quads x 2.

The exact vertex placement depends on VHAP's lip-ring vertex ids (from its FLAME region masks)
and its offsets, which are not in this repository. :func:`add_teeth` builds the same *topology*
and skinning from two lip rings the caller supplies (15 FLAME vertex ids each, left to right),
with our own geometry (a curved plate behind the lips). Centroids of the 168 teeth faces will
therefore not equal VHAP's bit for bit; :mod:`fastavatar.flame.points` reports the FLAME part and
the teeth part of the error separately, and the rig binds teeth Gaussians to their nearest
triangle when the index check fails. To reproduce VHAP exactly, export VHAP's extended model
(v_template, shapedirs, posedirs, J_regressor, weights, faces) to our ``.npz`` layout
(:meth:`FlameModel.save_npz` keys) and load that instead of the pickle.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from fastavatar.flame.model import FlameModel

TEETH_ROWS = 4  # rows per set: lip-side edge, lip-side root, back root, back edge
TEETH_COLUMNS = 15  # vertices per row (length of each lip ring)


def teeth_faces(start: int, columns: int = TEETH_COLUMNS, rows: int = TEETH_ROWS) -> torch.Tensor:
    """Faces [(rows-1)*(columns-1)*2, 3] of one row-major grid of vertices starting at ``start``."""
    faces = []
    for r in range(rows - 1):
        for c in range(columns - 1):
            a = start + r * columns + c
            b, d = a + 1, a + columns
            faces.append((a, d, b))
            faces.append((b, d, d + 1))
    return torch.tensor(faces, dtype=torch.int64)


def add_teeth(
    model: FlameModel,
    upper_ring: Sequence[int],
    lower_ring: Sequence[int],
    *,
    depth_factor: float = 2.5,  # how far behind the lips the front of the teeth sits, in lip gaps
    height_factor: float = 1.0,  # tooth height, in lip gaps
    thickness_factor: float = 0.5,  # front-to-back thickness, in lip gaps
) -> FlameModel:
    """Return ``model`` with 2 x 60 teeth vertices and 2 x 84 teeth faces appended (VHAP layout)."""
    if model.num_teeth_vertices:
        raise ValueError(f"{model.source}: model already has {model.num_teeth_vertices} teeth vertices")
    upper = torch.as_tensor(list(upper_ring), dtype=torch.int64)
    lower = torch.as_tensor(list(lower_ring), dtype=torch.int64)
    if upper.numel() != lower.numel() or upper.numel() < 2:
        raise ValueError(f"lip rings must have the same length >= 2 (got {upper.numel()} and {lower.numel()})")
    cols = upper.numel()
    v_up, v_lo = model.v_template[upper], model.v_template[lower]  # [C, 3]
    gap = (v_up - v_lo).norm(dim=-1).mean()
    middle = (v_up + v_lo) / 2
    middle[:, 1] = middle[:, 1].mean()
    unit_y = torch.tensor([0.0, 1.0, 0.0], dtype=middle.dtype)
    unit_z = torch.tensor([0.0, 0.0, 1.0], dtype=middle.dtype)
    front = middle - unit_z * gap * depth_factor
    back = front - unit_z * gap * thickness_factor
    h = unit_y * gap * height_factor
    edge = unit_y * gap * 0.1
    upper_rows = [front + edge, front + edge + h, back + edge + h, back + edge]
    lower_rows = [front - edge, front - edge - h, back - edge - h, back - edge]
    new_vertices = torch.cat([torch.cat(upper_rows), torch.cat(lower_rows)])  # [8C, 3]

    n_old = model.num_vertices
    n_set = TEETH_ROWS * cols
    faces = torch.cat([model.faces, teeth_faces(n_old, cols), teeth_faces(n_old + n_set, cols)])
    ring_for_vertex = torch.cat([upper.repeat(TEETH_ROWS), lower.repeat(TEETH_ROWS)])  # [8C]

    num_new = new_vertices.shape[0]
    zeros3 = lambda k: torch.zeros(num_new, 3, k, dtype=model.v_template.dtype)  # noqa: E731
    weights = torch.zeros(num_new, model.num_joints, dtype=model.lbs_weights.dtype)
    weights[:n_set, 1] = 1.0  # upper teeth -> neck
    weights[n_set:, 2] = 1.0  # lower teeth -> jaw
    posedirs = model.posedirs.reshape(model.posedirs.shape[0], n_old, 3)
    posedirs = torch.cat([posedirs, torch.zeros(posedirs.shape[0], num_new, 3, dtype=posedirs.dtype)], dim=1)
    return replace(
        model,
        v_template=torch.cat([model.v_template, new_vertices]),
        shapedirs=torch.cat([model.shapedirs, model.shapedirs[ring_for_vertex]]),  # identity follows the lips
        exprdirs=torch.cat([model.exprdirs, zeros3(model.num_expr)]),
        posedirs=posedirs.reshape(posedirs.shape[0], -1),
        J_regressor=torch.cat([model.J_regressor, torch.zeros(model.num_joints, num_new, dtype=model.J_regressor.dtype)], 1),
        lbs_weights=torch.cat([model.lbs_weights, weights]),
        faces=faces,
        num_teeth_vertices=num_new,
        num_teeth_faces=faces.shape[0] - model.num_faces,
    )
