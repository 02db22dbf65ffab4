"""Fit FLAME to a reconstructed head's Gaussian means (no tracked dataset needed).

FastAvatar anchors Gaussian i at the centre of FLAME(+teeth) triangle i, so a reconstruction's
means are, up to its learned offsets, the triangle centres of *some* FLAME head. We recover that
head: identity ``shape``, the pose it was reconstructed in (``expr``, ``neck_pose``, ``jaw_pose``,
``eyes_pose``) and a similarity (global scale ``s``, FLAME's global ``rotation`` and a world
``translation``) by MAP least squares on the triangle centres, index by index:

    minimise  sum_i w_i |c_i(theta) - x_i|^2 / sigma^2 + |shape|^2 + |expr|^2 + |pose|^2 / sigma_pose^2

with ``c_i`` the centre of triangle i of ``s * FLAME(shape, expr, pose)`` (a FLAME head scaled by
``s`` about the world origin; LBS is scale-equivariant, so this is the FLAME model with every
length multiplied by ``s``, see :func:`scale_flame_model`) and ``x_i`` Gaussian i's mean. FLAME's
coefficients have unit prior variance, so the priors are the ones FLAME was built with.

Correspondence and teeth (as our FLAME forward, :mod:`fastavatar.flame.teeth`): the first
``F_flame`` Gaussians pair with FLAME's own faces. When the model carries VHAP-style teeth faces,
Gaussians ``F_flame..F-1`` pair with them but get weight ``teeth_weight`` (default 0: our teeth
are a re-creation of VHAP's, not bit-exact, so by default they are reported, not fitted). When
the model has no teeth and the head has more Gaussians than faces (10144 vs 9976), the extra
Gaussians are not used. The fit starts from a closed-form similarity (Umeyama) between the
template's centres and the means, then runs L-BFGS on everything (float64).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Dict, Optional

import torch

from fastavatar.flame.model import FlameModel, flame_forward

POSE_FIT_KEYS = ("neck_pose", "jaw_pose", "eyes_pose")


@dataclass
class FlameFitConfig:
    """Options of :func:`fit_flame_to_means`."""

    num_shape: int = 100  # identity coefficients fitted (FLAME has 300; the rest stay 0)
    num_expr: int = 50  # expression coefficients fitted (0 = neutral expression only)
    fit_pose: bool = True  # fit neck, jaw and eye rotations (else they stay 0)
    noise_std: float = 2e-3  # sigma: expected distance of a Gaussian from its triangle centre, metres
    pose_prior_std: float = 0.3  # radians, std of the prior on each pose angle
    teeth_weight: float = 0.0  # data weight of teeth faces (0: report only, see module doc)
    iterations: int = 200  # L-BFGS iterations of the full fit
    warn_rms: float = 5e-3  # warn when the RMS residual (FLAME units, i.e. divided by s) exceeds this, metres


@dataclass
class FlameFit:
    """Result of :func:`fit_flame_to_means`."""

    params: Dict[str, torch.Tensor]  # VHAP-style parameters for the scaled model, each [1, d] float64
    scale: float  # global scale s (world = s * FLAME units)
    num_fitted: int  # Gaussians used in the data term (weight > 0)
    rms: float  # RMS distance mean <-> fitted centre over the fitted Gaussians, world units
    median: float  # median of the same distances
    max: float  # max of the same distances
    rms_teeth: Optional[float]  # RMS over teeth faces (None when the model has none)
    residuals: torch.Tensor = field(repr=False)  # [min(N, F)] distance of every compared Gaussian
    centres: torch.Tensor = field(repr=False)  # [F, 3] fitted triangle centres (world)

    @property
    def rms_model_units(self) -> float:
        """RMS residual divided by the scale (metres of a life-size FLAME head)."""
        return self.rms / self.scale

    def summary(self) -> str:
        teeth = "" if self.rms_teeth is None else f", teeth RMS {self.rms_teeth * 1e3:.2f} mm (not fitted)"
        return (f"FLAME fit to {self.num_fitted} Gaussian means: scale {self.scale:.4f}, residual RMS "
                f"{self.rms * 1e3:.2f} mm, median {self.median * 1e3:.2f} mm, max {self.max * 1e3:.2f} mm{teeth}")

    def large(self, cfg: FlameFitConfig) -> bool:
        return self.rms_model_units > cfg.warn_rms


def scale_flame_model(model: FlameModel, scale: float) -> FlameModel:
    """FLAME with every length multiplied by ``scale``: ``FLAME_s(p) = s * FLAME(p)`` for any parameters
    (translation in the scaled model's units). Skinning weights, regressor and topology are unchanged."""
    if scale == 1.0:
        return model
    return replace(model, v_template=model.v_template * scale, shapedirs=model.shapedirs * scale,
                   exprdirs=model.exprdirs * scale, posedirs=model.posedirs * scale,
                   source=f"{model.source} (scaled x{scale:.6g})")


def umeyama(src: torch.Tensor, dst: torch.Tensor, weights: Optional[torch.Tensor] = None):
    """Similarity ``dst ~ s R src + t`` minimising the (weighted) squared error. src, dst [P, 3].

    Returns (s float, R [3, 3], t [3]).
    """
    w = torch.ones(src.shape[0], dtype=src.dtype) if weights is None else weights.to(src)
    w = w / w.sum()
    mu_s, mu_d = (w[:, None] * src).sum(0), (w[:, None] * dst).sum(0)
    a, b = src - mu_s, dst - mu_d
    cov = (w[:, None, None] * b[:, :, None] * a[:, None, :]).sum(0)  # [3, 3] sum w b a^T
    u, sig, vt = torch.linalg.svd(cov)
    d = torch.ones(3, dtype=src.dtype)
    if torch.det(u) * torch.det(vt) < 0:
        d[2] = -1.0
    rot = u @ torch.diag(d) @ vt
    var_s = (w * (a * a).sum(-1)).sum()
    s = float((sig * d).sum() / var_s)
    return s, rot, mu_d - s * rot @ mu_s


def _matrix_to_axis_angle(rot: torch.Tensor) -> torch.Tensor:
    from fastavatar.core.rotations import matrix_to_quat, quat_to_rotvec

    return quat_to_rotvec(matrix_to_quat(rot[None]))[0]


def _data_weights(model: FlameModel, n: int, cfg: FlameFitConfig) -> torch.Tensor:
    """Weight of each compared index i < min(n, F): 1 for FLAME faces, teeth_weight for teeth faces."""
    m = min(n, model.num_faces)
    w = torch.ones(m, dtype=torch.float64)
    w[model.num_faces - model.num_teeth_faces:] = cfg.teeth_weight
    return w


def fit_flame_to_means(model: FlameModel, means: torch.Tensor, cfg: FlameFitConfig = FlameFitConfig(),
                       verbose: bool = True) -> FlameFit:
    """Fit FLAME shape, pose and a similarity to Gaussian means [N, 3] (Gaussian i <-> triangle i).

    Raises ValueError (one line) when the head has fewer Gaussians than FLAME has faces without
    teeth (the index correspondence cannot hold). Warns (and says so in :meth:`FlameFit.summary`'s
    caller) when the RMS residual exceeds ``cfg.warn_rms``.
    """
    model = model.to(dtype=torch.float64)
    means = torch.as_tensor(means).detach().to(torch.float64)
    n, f_all = means.shape[0], model.num_faces
    f_flame = f_all - model.num_teeth_faces
    if n < f_flame:
        raise ValueError(f"the head has {n} Gaussians but FLAME ({model.source}) has {f_flame} faces: "
                         f"the one-Gaussian-per-triangle fit needs at least one Gaussian per face")
    m = min(n, f_all)
    weights = _data_weights(model, n, cfg)
    target = means[:m]
    faces = model.faces[:m]
    ks, ke = min(cfg.num_shape, model.num_shape), min(cfg.num_expr, model.num_expr)

    def centres(shape, expr, pose, rotation, translation_unit, log_s):
        out = flame_forward(model, shape=shape, expr=expr, rotation=rotation, translation=translation_unit,
                            **pose, batch_size=1)
        return torch.exp(log_s) * out.vertices[0][faces].mean(1)  # [m, 3] world

    # 1. closed-form similarity from the template's centres (neutral head)
    rest = flame_forward(model)
    rest_centres = rest.vertices[0][faces].mean(1)
    s0, rot0, t0 = umeyama(rest_centres, target, weights)
    root = rest.rest_joints[0, 0]
    # s R (y - J0) + s J0 + s tau = s R y + t0  =>  tau = (t0 - s (I - R) J0) / s  (unit-model translation)
    tau0 = (t0 - s0 * (torch.eye(3, dtype=torch.float64) - rot0) @ root) / s0

    z = lambda k: torch.zeros(1, k, dtype=torch.float64, requires_grad=True)  # noqa: E731
    shape, expr = z(ks), z(ke)
    # Rodrigues has a zero gradient at exactly 0 (its small-angle branch), so poses start a hair off it
    tiny = lambda k: torch.full((1, k), 1e-4, dtype=torch.float64, requires_grad=True)  # noqa: E731
    pose = {"neck_pose": tiny(3), "jaw_pose": tiny(3), "eyes_pose": tiny(6)} if cfg.fit_pose else \
        {"neck_pose": z(3), "jaw_pose": z(3), "eyes_pose": z(6)}
    rotation = _matrix_to_axis_angle(rot0).reshape(1, 3).clone().requires_grad_(True)
    translation = tau0.reshape(1, 3).clone().requires_grad_(True)
    log_s = torch.tensor(math.log(s0), dtype=torch.float64, requires_grad=True)

    sigma2 = cfg.noise_std ** 2

    def objective():
        r = centres(shape, expr, pose, rotation, translation, log_s) - target
        # residual measured in FLAME units (divide by s) so the prior balance does not depend on the scale
        data = (weights * (r * r).sum(-1)).sum() / (sigma2 * torch.exp(2 * log_s))
        prior = (shape * shape).sum() + (expr * expr).sum()
        if cfg.fit_pose:
            prior = prior + sum((p * p).sum() for p in pose.values()) / cfg.pose_prior_std ** 2
        return data + prior

    def run(variables, iterations):
        opt = torch.optim.LBFGS(variables, lr=1.0, max_iter=iterations, history_size=50,
                                tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = objective()
            loss.backward()
            return loss

        opt.step(closure)

    # 2. refine the similarity alone, then everything
    run([rotation, translation, log_s], 50)
    variables = [rotation, translation, log_s] + ([shape] if ks else []) + ([expr] if ke else [])
    if cfg.fit_pose:
        variables += list(pose.values())
    run(variables, cfg.iterations)

    with torch.no_grad():
        s = float(torch.exp(log_s))
        fitted = centres(shape, expr, pose, rotation, translation, log_s)
        dist = (fitted - target).norm(dim=-1)
        used = weights > 0
        teeth = dist[f_flame:] if model.num_teeth_faces and m > f_flame else None
        all_centres = fitted if m == f_all else None
        if all_centres is None:  # head with fewer Gaussians than teeth-extended faces
            out = flame_forward(model, shape=shape, expr=expr, rotation=rotation, translation=translation, **pose)
            all_centres = s * out.vertices[0][model.faces].mean(1)
    params = {
        "shape": shape.detach().clone(),
        "expr": expr.detach().clone(),
        "rotation": rotation.detach().clone(),
        "translation": (translation.detach() * s).clone(),  # world units: the scaled model's translation
        **{k: v.detach().clone() for k, v in pose.items()},
    }
    fit = FlameFit(
        params=params, scale=s, num_fitted=int(used.sum()),
        rms=float(dist[used].pow(2).mean().sqrt()), median=float(dist[used].median()), max=float(dist[used].max()),
        rms_teeth=None if teeth is None or teeth.numel() == 0 else float(teeth.pow(2).mean().sqrt()),
        residuals=dist, centres=all_centres,
    )
    if fit.large(cfg):
        warnings.warn(f"FLAME fit residual is large: RMS {fit.rms_model_units * 1e3:.1f} mm (in FLAME units) > "
                      f"{cfg.warn_rms * 1e3:.1f} mm; the head may not follow FLAME's one-Gaussian-per-triangle "
                      f"layout, and the rig will follow the fitted mesh only loosely", stacklevel=2)
    return fit
