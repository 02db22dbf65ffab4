"""A tiny synthetic FLAME-like model for tests (no licensed data).

A UV sphere "head" (radius 10 cm) with 5 joints in FLAME order (global, neck, jaw, eyeL, eyeR),
3 shape and 3 expression bases (smooth fields), pose correctives for the 4 non-root joints,
a joint regressor (each joint = average of nearby vertices) and smooth skinning weights
(lower front -> jaw, front upper left/right -> eyes, bottom -> neck, rest -> global).
Saved either in our ``.npz`` layout or as an official-style pickle with chumpy arrays and a
scipy sparse regressor (to exercise the chumpy-free unpickler).
"""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

import numpy as np
import torch

from fastavatar.flame.model import FlameModel

NUM_SHAPE = 3
NUM_EXPR = 3


def sphere_mesh(rings: int = 10, segments: int = 16, radius: float = 0.1):
    """UV sphere: vertices [V,3] (float64), faces [F,3] (outward, counter-clockwise)."""
    verts = [(0.0, radius, 0.0)]
    for r in range(1, rings):
        theta = np.pi * r / rings
        for s in range(segments):
            phi = 2 * np.pi * s / segments
            verts.append((radius * np.sin(theta) * np.sin(phi), radius * np.cos(theta), radius * np.sin(theta) * np.cos(phi)))
    verts.append((0.0, -radius, 0.0))
    faces = []
    ring = lambda r, s: 1 + (r - 1) * segments + (s % segments)  # noqa: E731
    for s in range(segments):
        faces.append((0, ring(1, s), ring(1, s + 1)))
    for r in range(1, rings - 1):
        for s in range(segments):
            a, b, c, d = ring(r, s), ring(r, s + 1), ring(r + 1, s), ring(r + 1, s + 1)
            faces.append((a, c, b))
            faces.append((b, c, d))
    bottom = len(verts) - 1
    for s in range(segments):
        faces.append((ring(rings - 1, s), bottom, ring(rings - 1, s + 1)))
    v = np.asarray(verts, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    # orient outward
    tri = v[f]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    flip = (normal * tri.mean(1)).sum(-1) < 0
    f[flip] = f[flip][:, [0, 2, 1]]
    return v, f


def make_tiny_flame(seed: int = 0) -> FlameModel:
    rng = np.random.default_rng(seed)
    v, f = sphere_mesh()
    nv = v.shape[0]
    x, y, z = v[:, 0], v[:, 1], v[:, 2]
    # smooth bases: low-order polynomials of position (metres)
    feats = np.stack([x, y, z, x * y * 10, y * z * 10, x * z * 10, x * x * 10 - z * z * 10], -1)
    def field(k):
        coef = rng.normal(size=(feats.shape[1], 3, k)) * 0.05
        return np.einsum("vf,fck->vck", feats, coef)
    shapedirs = field(NUM_SHAPE)
    front_low = np.clip((z / 0.1) * (-y / 0.1) * 2, 0, 1)[:, None, None]
    exprdirs = field(NUM_EXPR) * (0.3 + front_low) * 0.3  # mostly moves the "mouth" region, ~5 mm per unit
    posedirs = np.transpose(field(36) * 0.05, (2, 0, 1)).reshape(36, nv * 3)  # smooth, ~ 0.3 mm per unit

    # joints: global centre, neck below, jaw low-front, eyes up-front left/right
    targets = np.array([[0, 0, 0], [0, -0.08, -0.01], [0, -0.04, 0.05], [0.03, 0.03, 0.08], [-0.03, 0.03, 0.08]])
    reg = np.zeros((5, nv))
    for j, t in enumerate(targets):
        d = np.linalg.norm(v - t, axis=1)
        idx = np.argsort(d)[:4]
        reg[j, idx] = 1.0 / 4
    reg[0] = 1.0 / nv  # centre of the sphere
    # skinning weights
    w = np.zeros((nv, 5))
    w[:, 0] = 1.0
    w[:, 1] = np.clip(-y / 0.1 - 0.3, 0, 1) * 2.0
    w[:, 2] = np.clip(z / 0.1, 0, 1) * np.clip(-y / 0.1 + 0.2, 0, 1) * 3.0
    w[:, 3] = np.clip(z / 0.1 - 0.4, 0, 1) * np.clip(x / 0.1, 0, 1) * np.clip(y / 0.1, 0, 1) * 4.0
    w[:, 4] = np.clip(z / 0.1 - 0.4, 0, 1) * np.clip(-x / 0.1, 0, 1) * np.clip(y / 0.1, 0, 1) * 4.0
    w /= w.sum(1, keepdims=True)
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    return FlameModel(
        v_template=t(v), shapedirs=t(shapedirs), exprdirs=t(exprdirs), posedirs=t(posedirs),
        J_regressor=t(reg), parents=torch.tensor([-1, 0, 1, 1, 1]), lbs_weights=t(w),
        faces=torch.as_tensor(f), source="tiny-synthetic",
    )


def save_tiny_flame_npz(path: Path, model: FlameModel = None) -> Path:
    (model or make_tiny_flame()).save_npz(path)
    return Path(path)


def save_tiny_flame_pickle(path: Path, model: FlameModel = None) -> Path:
    """Write an official-layout FLAME pickle: chumpy ``Ch`` arrays and a scipy sparse regressor."""
    import scipy.sparse

    model = model or make_tiny_flame()
    mod = types.ModuleType("chumpy.ch")

    class Ch:  # mimics chumpy.ch.Ch's pickled state: a dict holding the value under "x"
        def __init__(self, x):
            self.x = x

        def __getstate__(self):
            return {"x": self.x, "_dirty_vars": set()}

    Ch.__module__ = "chumpy.ch"
    Ch.__qualname__ = "Ch"
    mod.Ch = Ch
    sys.modules["chumpy"] = types.ModuleType("chumpy")
    sys.modules["chumpy.ch"] = mod
    try:
        nv = model.num_vertices
        payload = {
            "v_template": Ch(model.v_template.numpy()),
            "shapedirs": Ch(torch.cat([model.shapedirs, model.exprdirs], -1).numpy()),
            "posedirs": Ch(model.posedirs.numpy().T.reshape(nv, 3, -1)),
            "J_regressor": scipy.sparse.csc_matrix(model.J_regressor.numpy()),
            "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
            "weights": Ch(model.lbs_weights.numpy()),
            "f": model.faces.numpy().astype(np.uint32),
            "bs_style": "lbs",
        }
        with open(path, "wb") as fh:
            pickle.dump(payload, fh, protocol=2)
    finally:
        del sys.modules["chumpy.ch"], sys.modules["chumpy"]
    return Path(path)


def random_params(model: FlameModel, seed: int = 1, scale: float = 1.0) -> dict:
    """Random VHAP-style parameters (batch of one), moderate magnitudes."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return {
        "shape": r(1, model.num_shape),
        "expr": r(1, model.num_expr) * scale,
        "rotation": r(1, 3) * 0.1 * scale,
        "neck_pose": r(1, 3) * 0.1 * scale,
        "jaw_pose": torch.abs(r(1, 3)) * 0.1 * scale,
        "eyes_pose": r(1, 6) * 0.05 * scale,
        "translation": r(1, 3) * 0.01,
        "static_offset": r(1, model.num_vertices, 3) * 1e-3,
    }


def splats_on_mesh(vertices: torch.Tensor, faces: torch.Tensor, seed: int = 2, offset: float = 0.003) -> dict:
    """One Gaussian per triangle near its centroid (float32 raw splats, SH degree 3)."""
    g = torch.Generator().manual_seed(seed)
    centres = vertices[faces].mean(1).float()
    n = centres.shape[0]
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "means": centres + r(n, 3) * offset,
        "quats": r(n, 4),
        "scales": torch.log(torch.full((n, 3), 0.012)) + r(n, 3) * 0.2,
        "opacities": torch.full((n,), 2.0) + r(n) * 0.3,
        "sh0": r(n, 1, 3) * 0.5,
        "shN": r(n, 15, 3) * 0.15,
    }
