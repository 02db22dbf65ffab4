"""The 468 face-mesh landmarks expressed on our Gaussian template, without the FLAME model file.

Gaussian *i* sits at the centre of FLAME(+teeth) triangle *i*, but the triangle connectivity
itself lives in the licence-gated FLAME file, so landmarks are anchored to the **Gaussian
points** instead: landmark *l* = barycentric combination of three nearby points
``(i, j, k)`` plus an offset along the normal of the triangle they span::

    X_l = a P_i + b P_j + c P_k + d n_ijk,      a + b + c = 1,  n = unit normal of (P_i, P_j, P_k)

Any point set in the template's order (a subject's points3D, the decoder template's means, the
tracker's points) then carries the landmarks. The coefficients were measured on the bundled
calibrated subjects: landmarks detected in all 16 views, triangulated (DLT with a RANSAC over
view pairs), expressed per subject, averaged across subjects (``build_template_landmarks``).
The file ``assets/template_landmarks.npz`` holds them with a version key;
``scripts/build_template_landmarks.py`` regenerates it.

Conventions: cameras as :mod:`fastavatar.core.cameras` (OpenCV c2w, pixel K, pixel centres at
+0.5); landmark image coordinates as :mod:`fastavatar.face.landmarks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from fastavatar.face.landmarks import ASSETS_DIR, NUM_LANDMARKS

TEMPLATE_LANDMARKS_FILE = ASSETS_DIR / "template_landmarks.npz"
TEMPLATE_LANDMARKS_VERSION = 1
"""Bump when the file's meaning changes (loaders refuse other versions)."""


@dataclass
class TemplateLandmarks:
    """Landmarks anchored to template points (see module docstring)."""

    indices: np.ndarray  # [L, 3] int64 point indices (i, j, k)
    barycentric: np.ndarray  # [L, 3] float64 (a, b, c), rows sum to 1
    offset: np.ndarray  # [L] float64 signed distance along the triangle normal (metres)
    stable: np.ndarray  # [L] bool: interior landmarks whose triangulation was consistent (used for PnP)
    residual_px: np.ndarray  # [L] float64 median reprojection error when built (full-resolution pixels)
    num_points: int  # size of the point set the indices refer to (10144)

    def apply(self, points):
        """[N,3] points (numpy or torch, same order as the template) -> [L,3] landmark positions."""
        try:
            import torch

            if isinstance(points, torch.Tensor):
                idx = torch.as_tensor(self.indices, device=points.device)
                tri = points[idx]  # [L, 3, 3]
                bary = torch.as_tensor(self.barycentric, dtype=points.dtype, device=points.device)
                off = torch.as_tensor(self.offset, dtype=points.dtype, device=points.device)
                normal = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
                normal = normal / normal.norm(dim=1, keepdim=True).clamp_min(1e-12)
                return (bary[:, :, None] * tri).sum(1) + off[:, None] * normal
        except ImportError:  # pragma: no cover - torch is a hard dependency
            pass
        pts = np.asarray(points, dtype=np.float64)
        tri = pts[self.indices]
        return (self.barycentric[:, :, None] * tri).sum(1) + self.offset[:, None] * _normals(tri)

    def save(self, path: Path, meta: Optional[Dict[str, object]] = None) -> None:
        from fastavatar.io.atomic import atomic_write_bytes

        import io
        import json

        buf = io.BytesIO()
        np.savez(buf, version=np.int64(TEMPLATE_LANDMARKS_VERSION), indices=self.indices.astype(np.int64),
                 barycentric=self.barycentric, offset=self.offset, stable=self.stable,
                 residual_px=self.residual_px, num_points=np.int64(self.num_points),
                 meta=np.array(json.dumps(meta or {}, sort_keys=True)))
        atomic_write_bytes(Path(path), buf.getvalue())


def load_template_landmarks(path: Optional[Path] = None) -> TemplateLandmarks:
    """Read the shipped (or a rebuilt) landmark file; one-line errors for a missing or foreign file."""
    path = Path(path) if path is not None else TEMPLATE_LANDMARKS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: template landmark file missing (regenerate it with "
                                "python scripts/build_template_landmarks.py)")
    with np.load(path, allow_pickle=False) as z:
        version = int(z["version"]) if "version" in z else -1
        if version != TEMPLATE_LANDMARKS_VERSION:
            raise ValueError(f"{path}: template landmarks version {version}, this code reads version "
                             f"{TEMPLATE_LANDMARKS_VERSION} (regenerate with scripts/build_template_landmarks.py)")
        return TemplateLandmarks(indices=z["indices"], barycentric=z["barycentric"], offset=z["offset"],
                                 stable=z["stable"].astype(bool), residual_px=z["residual_px"],
                                 num_points=int(z["num_points"]))


# ---------------------------------------------------------------------------------------------- geometry
def _normals(tri: np.ndarray) -> np.ndarray:
    """[L,3,3] triangles -> [L,3] unit normals."""
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


def projection_matrices(c2w: np.ndarray, Ks: np.ndarray) -> np.ndarray:
    """[V,4,4] OpenCV c2w + [V,3,3] K -> [V,3,4] pixel projection matrices K [R|t] (w2c)."""
    w2c = np.linalg.inv(np.asarray(c2w, dtype=np.float64))
    return np.asarray(Ks, dtype=np.float64) @ w2c[:, :3, :4]


def project(P: np.ndarray, X: np.ndarray) -> np.ndarray:
    """[V,3,4] projections, [L,3] points -> [V,L,2] continuous pixel coordinates."""
    Xh = np.concatenate([X, np.ones((X.shape[0], 1))], axis=1)
    x = np.einsum("vij,lj->vli", P, Xh)
    return x[..., :2] / x[..., 2:3]


def triangulate_dlt(P: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Linear triangulation of one point: P [V,3,4], uv [V,2] (V >= 2) -> X [3]."""
    rows = np.concatenate([uv[:, 0:1] * P[:, 2] - P[:, 0], uv[:, 1:2] * P[:, 2] - P[:, 1]], axis=0)
    _, _, vt = np.linalg.svd(rows)
    X = vt[-1]
    return X[:3] / X[3]


def triangulate_robust(P: np.ndarray, uv: np.ndarray, valid: np.ndarray, threshold_px: float):
    """RANSAC over view pairs, then DLT over the inliers, for every landmark.

    Args:
        P: [V,3,4] projections. uv: [V,L,2] detections. valid: [V,L] bool (view detected a face).
        threshold_px: inlier reprojection threshold.
    Returns:
        X [L,3], inliers [V,L] bool, residual [V,L] px (NaN where invalid).
    """
    V, L = uv.shape[:2]
    X = np.zeros((L, 3))
    inliers = np.zeros((V, L), dtype=bool)
    pairs = [(a, b) for a in range(V) for b in range(a + 1, V)]
    for lm in range(L):
        views = np.flatnonzero(valid[:, lm])
        best, best_err = None, np.inf
        for a, b in pairs:
            if not (valid[a, lm] and valid[b, lm]):
                continue
            cand = triangulate_dlt(P[[a, b]], uv[[a, b], lm])
            err = np.linalg.norm(project(P[views], cand[None])[:, 0] - uv[views, lm], axis=1)
            inl = err < threshold_px
            score = (inl.sum(), -np.median(err))
            if best is None or score > best_err:
                best, best_err = views[inl], score
        use = best if best is not None and len(best) >= 2 else views
        X[lm] = triangulate_dlt(P[use], uv[use, lm])
        inliers[use, lm] = True
    residual = np.linalg.norm(project(P, X) - uv, axis=2)
    residual[~valid] = np.nan
    return X, inliers, residual


def anchor_landmarks(X: np.ndarray, points: np.ndarray, candidates: int = 10) -> np.ndarray:
    """Pick an anchor triangle (i, j, k) of points for each landmark X [L,3] on points [N,3].

    i is the nearest point; (j, k) among the ``candidates`` nearest maximise the triangle's
    smallest angle, among pairs whose triangle contains the landmark's projection (barycentrics
    >= -0.25), so the anchor is well conditioned. Returns [L,3] int64."""
    dist = np.linalg.norm(X[:, None, :] - points[None, :, :], axis=2)  # [L, N] (468 x 10144: small)
    near = np.argsort(dist, axis=1)[:, :candidates]
    out = np.zeros((len(X), 3), dtype=np.int64)
    for lm in range(len(X)):
        i = near[lm, 0]
        best, best_q = (i, near[lm, 1], near[lm, 2]), -np.inf
        for a in range(1, candidates):
            for b in range(a + 1, candidates):
                tri = points[[i, near[lm, a], near[lm, b]]]
                q = _min_angle(tri)
                bary, _ = barycentric_and_offset(X[lm:lm + 1], tri[None])
                if bary.min() < -0.25:
                    q -= 10.0  # outside: only if nothing contains it
                if q > best_q:
                    best, best_q = (i, near[lm, a], near[lm, b]), q
        out[lm] = best
    return out


def _min_angle(tri: np.ndarray) -> float:
    angles = []
    for k in range(3):
        u = tri[(k + 1) % 3] - tri[k]
        v = tri[(k + 2) % 3] - tri[k]
        cos = float(u @ v / max(np.linalg.norm(u) * np.linalg.norm(v), 1e-12))
        angles.append(np.arccos(np.clip(cos, -1.0, 1.0)))
    return float(min(angles))


def barycentric_and_offset(X: np.ndarray, tri: np.ndarray):
    """X [L,3], triangles [L,3,3] -> barycentrics [L,3] of X's projection on each plane, normal offset [L]."""
    n = _normals(tri)
    d = np.einsum("li,li->l", X - tri[:, 0], n)
    proj = X - d[:, None] * n
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    r = proj - tri[:, 0]
    g11, g12, g22 = (e1 * e1).sum(1), (e1 * e2).sum(1), (e2 * e2).sum(1)
    r1, r2 = (r * e1).sum(1), (r * e2).sum(1)
    det = np.maximum(g11 * g22 - g12 * g12, 1e-18)
    b = (g22 * r1 - g12 * r2) / det
    c = (g11 * r2 - g12 * r1) / det
    return np.stack([1.0 - b - c, b, c], axis=1), d


@dataclass
class SubjectLandmarkViews:
    """What the builder needs from one calibrated subject (kept free of the data package)."""

    subject_id: str
    points: np.ndarray  # [N,3] the subject's points3D (template order)
    c2w: np.ndarray  # [V,4,4] OpenCV
    Ks: np.ndarray  # [V,3,3] pixel intrinsics of the images the landmarks were detected in
    landmarks: np.ndarray  # [V,468,2] detected landmarks (NaN where no face)


def build_template_landmarks(subjects: Sequence[SubjectLandmarkViews], threshold_px: float = 12.0,
                             stable_quantile: float = 0.8) -> tuple:
    """Triangulate per subject, anchor on the mean point set, average coefficients across subjects.

    Returns (TemplateLandmarks, report dict). ``stable`` keeps landmarks whose median reprojection
    residual is within the ``stable_quantile`` of all, excluding the face contour (silhouette
    landmarks slide with the view, so they disagree between views by construction)."""
    tri_X: List[np.ndarray] = []
    residuals: List[np.ndarray] = []
    for s in subjects:
        P = projection_matrices(s.c2w, s.Ks)
        valid = np.isfinite(s.landmarks).all(axis=2)
        X, _, res = triangulate_robust(P, np.nan_to_num(s.landmarks), valid, threshold_px)
        tri_X.append(X)
        residuals.append(res)
    mean_points = np.mean([s.points for s in subjects], axis=0)
    mean_X = np.mean(tri_X, axis=0)
    indices = anchor_landmarks(mean_X, mean_points)
    bary_all, off_all = [], []
    for s, X in zip(subjects, tri_X):
        b, d = barycentric_and_offset(X, s.points[indices])
        bary_all.append(b)
        off_all.append(d)
    tl = TemplateLandmarks(indices=indices, barycentric=np.mean(bary_all, axis=0), offset=np.mean(off_all, axis=0),
                           stable=np.ones(NUM_LANDMARKS, dtype=bool), residual_px=np.zeros(NUM_LANDMARKS),
                           num_points=int(mean_points.shape[0]))
    # reprojection of the averaged anchors, per subject (what a user of the file gets)
    med = []
    per_subject = {}
    for s in subjects:
        P = projection_matrices(s.c2w, s.Ks)
        err = np.linalg.norm(project(P, tl.apply(s.points)) - s.landmarks, axis=2)  # [V, L]
        med.append(np.nanmedian(err, axis=0))
        per_subject[s.subject_id] = float(np.nanmedian(err))
    tl.residual_px = np.median(med, axis=0)
    contour = np.zeros(NUM_LANDMARKS, dtype=bool)
    contour[list(FACE_OVAL)] = True
    cut = np.quantile(tl.residual_px[~contour], stable_quantile)
    tl.stable = (~contour) & (tl.residual_px <= cut)
    report = {"median_reprojection_px": per_subject,
              "triangulation_median_px": {s.subject_id: float(np.nanmedian(r)) for s, r in zip(subjects, residuals)},
              "stable_landmarks": int(tl.stable.sum()), "stable_cut_px": float(cut),
              "cross_subject_offset_std_m": float(np.std(off_all, axis=0).mean())}
    return tl, report


FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148,
             176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
"""Face-mesh indices of the face contour (silhouette), the mesh's published outline loop."""
