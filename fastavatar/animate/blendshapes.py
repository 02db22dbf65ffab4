"""Build a rig from a reconstruction + FLAME, and drive it (mesh rigging and Gaussian blendshapes).

Two ways to animate (spec: gaussian-blendshapes.md §9):

(a) **Mesh rigging** (:func:`mesh_rig_splats`, the exact reference): evaluate FLAME for the frame
    and place every Gaussian in its triangle's frame on that mesh. Needs the FLAME model.
(b) **Analytic Gaussian blendshapes** (:func:`evaluate_rig`, no FLAME file needed at run time):
    on the rest mesh (identity shape, expression 0, pose 0) we precompute, per expression basis k,
    the change of every Gaussian's mean, rotation and log-scale when FLAME's expression k is set to 1
    (mesh rigging on that mesh, a secant). The rotation change is stored as a rotation vector
    ``Δr_k = log(q_k ⊗ q_rest^-1)`` (quaternions wxyz, sign-canonicalised before the log).
    Per frame: ``x = x_rest + Σ ψ_k Δx_k + P(θ)·posedirs_g``, ``q = exp(Σ ψ_k Δr_k) ⊗ q_rest``,
    ``l = l_rest + Σ ψ_k Δl_k``, then LBS with per-Gaussian weights (barycentric mean of its
    triangle's vertex weights) and joint transforms whose rest joints include the expression
    (as in FLAME). Rotation: the weighted blend of the joints' quaternions (sign-canonical, left
    unnormalised: activation normalises), applied to q. SH bands 1..3 are rotated by the
    Gaussian's rotation relative to rest (exact real-SH rotation, :func:`binding.rotate_sh`).

    Why rotation vectors and not GaussianBlendshapes' ``normalize(q_rest + Σ ψ_k Δq_k)``: the
    quaternion-linear blend is exact only at ψ = e_k and degrades fast away from it (measured on a
    large-motion version of the test model: 0.19 rad rotation error vs mesh rigging at a random ψ
    and 2.5 rad at 3ψ), while rotation vectors extrapolate along the basis' own rotation axis and cost
    the same per frame (one exp map per Gaussian).

Rest splats (``rest_mode``): "mesh" = the reconstruction moved from the source mesh (the tracked
frame it was reconstructed in) to the rest mesh through its binding; "source" (default) = the rest
splats for which (b) driven with the source frame's parameters returns the reconstruction exactly
(:func:`source_exact_rest`); they differ by the blendshape linearisation error at the source frame.

(c) **Learned Gaussian blendshapes** (``rig.kind == "learned"``, :mod:`fastavatar.animate.learn`):
    the same per-frame maths with per-axis log-scale deltas and two more blended attributes,
    ``c = c_rest + Σ ψ_k Δc_k`` (SH DC colour) and ``o = o_rest + Σ ψ_k Δo_k`` (opacity logit).
    Both paths below evaluate either kind.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from fastavatar.animate.binding import Binding, bind_splats, place_splats, rotate_sh
from fastavatar.animate.rig import SOURCE_KEYS, Rig
from fastavatar.flame.model import FlameModel, flame_forward, full_pose_matrices, lbs_transforms, pose_feature
from fastavatar.core.rotations import (
    matrix_to_quat,
    quat_conjugate,
    quat_multiply,
    quat_to_matrix,
    quat_to_rotvec,
    rotvec_to_quat,
)
from fastavatar.core.splats import Splats

POSE_KEYS = ("rotation", "neck_pose", "jaw_pose", "eyes_pose", "translation")
POSE_WIDTHS = {"rotation": 3, "neck_pose": 3, "jaw_pose": 3, "eyes_pose": 6, "translation": 3}


def binding_from_rig(rig: Rig, dtype=torch.float64) -> Binding:
    """The rig's binding (local coordinates) as a :class:`Binding` in ``dtype``."""
    return Binding(
        triangle_ids=rig.triangle_ids, barycentrics=rig.barycentrics.to(dtype), local_means=rig.local_means.to(dtype),
        local_quats=rig.local_quats.to(dtype), local_log_scales=rig.local_log_scales.to(dtype),
        local_shN=rig.local_shN.to(dtype), mode=rig.binding_mode, index_max_error=rig.index_max_error,
    )


def build_rig(
    model: FlameModel,
    splats: Splats,
    source_params: Dict[str, torch.Tensor],
    *,
    anchors: Optional[torch.Tensor] = None,  # [N, 3] the subject's points3D (for the index binding check)
    num_expr: Optional[int] = None,  # expression bases to precompute (default: all of the model's)
    tol: float = 1e-5,  # index-binding tolerance, metres
    rest_mode: str = "source",  # "source" (exact round trip, see source_exact_rest) or "mesh"
) -> Rig:
    """Bind ``splats`` (reconstructed in the pose of ``source_params``) and precompute blendshapes."""
    model = model.to(dtype=torch.float64)
    k = model.num_expr if num_expr is None else min(num_expr, model.num_expr)
    f64 = {key: torch.as_tensor(v, dtype=torch.float64) for key, v in source_params.items()}
    shape = f64.get("shape", torch.zeros(1, model.num_shape, dtype=torch.float64)).reshape(1, -1)
    offset = f64.get("static_offset", torch.zeros(1, model.num_vertices, 3, dtype=torch.float64))
    offset = offset.reshape(1, -1, 3)[:, : model.num_vertices]
    identity = {"shape": shape, "static_offset": offset}

    src = flame_forward(model, **f64) if f64 else flame_forward(model)
    binding = bind_splats(splats, src.vertices[0], model.faces, anchors=anchors, tol=tol)

    rest_out = flame_forward(model, **identity)
    rest_vertices = rest_out.vertices[0]
    rest = place_splats(binding, {key: v.detach().to(torch.float64) for key, v in splats.items()}, rest_vertices, model.faces)

    # Expression blendshapes: mesh rigging on FLAME with expr = e_k (k < K), identity kept.
    basis = flame_forward(model, expr=torch.eye(k, dtype=torch.float64), batch_size=k,
                          shape=shape.expand(k, -1), static_offset=offset.expand(k, -1, -1))
    rest_q = rest["quats"]
    rest_q_inv = quat_conjugate(F.normalize(rest_q, dim=-1))
    d_means, d_rots, d_logs = [], [], []
    for i in range(k):
        moved = place_splats(binding, rest, basis.vertices[i], model.faces, rotate_colours=False)
        d_means.append(moved["means"] - rest["means"])
        d_rots.append(quat_to_rotvec(quat_multiply(F.normalize(moved["quats"], dim=-1), rest_q_inv)))
        d_logs.append(moved["scales"][:, 0] - rest["scales"][:, 0])

    faces = model.faces[binding.triangle_ids]  # [N, 3]
    bary = binding.barycentrics.to(torch.float64)
    posedirs = model.posedirs.reshape(model.posedirs.shape[0], model.num_vertices, 3)
    pose_dmeans = (posedirs[:, faces] * bary[None, :, :, None]).sum(2)  # [P, N, 3]
    skin = (model.lbs_weights[faces] * bary[:, :, None]).sum(1)  # [N, J]
    joint_exprdirs = torch.einsum("jv,vck->kjc", model.J_regressor, model.exprdirs[..., :k])

    source = {key: f64[key].reshape(1, -1) for key in SOURCE_KEYS if key in f64}
    if rest_mode not in ("source", "mesh"):
        raise ValueError(f"rest_mode must be 'source' or 'mesh', got {rest_mode!r}")
    rig = Rig(
        binding_mode=binding.mode,
        index_max_error=binding.index_max_error,
        triangle_ids=binding.triangle_ids,
        barycentrics=binding.barycentrics,
        local_means=binding.local_means,
        local_quats=binding.local_quats,
        local_log_scales=binding.local_log_scales,
        local_shN=binding.local_shN,
        rest=rest,
        expr_dmeans=torch.stack(d_means),
        expr_drotvecs=torch.stack(d_rots),
        expr_dlog_scales=torch.stack(d_logs),
        pose_dmeans=pose_dmeans,
        skin_weights=skin,
        rest_joints=rest_out.rest_joints[0],
        joint_exprdirs=joint_exprdirs,
        parents=model.parents.clone(),
        shape=shape[0],
        static_offset=offset[0],
        faces=model.faces.clone(),
        source=source,
        rest_mode="mesh",
        num_teeth_faces=model.num_teeth_faces,
    )
    if rest_mode == "source":
        rig.rest = source_exact_rest(rig, splats)
        rig.rest_mode = "source"
    return rig


def _frame_value(params: Dict[str, torch.Tensor], key: str, width: int, like: torch.Tensor) -> torch.Tensor:
    value = params.get(key)
    if value is None:
        return torch.zeros(1, width, dtype=like.dtype, device=like.device)
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).reshape(1, -1)[:, :width]


def _expr_vector(params: Dict[str, torch.Tensor], k: int, like: torch.Tensor) -> torch.Tensor:
    expr = params.get("expr")
    out = torch.zeros(k, dtype=like.dtype, device=like.device)
    if expr is not None:
        e = torch.as_tensor(expr, dtype=like.dtype, device=like.device).reshape(-1)[:k]
        out[: e.shape[0]] = e
    return out


def _joint_terms(params: Dict[str, torch.Tensor], rest_joints: torch.Tensor, joint_exprdirs: torch.Tensor,
                 parents: torch.Tensor, num_expr: int, like: torch.Tensor):
    """The small per-frame joint maths, shared by both paths: (expression psi [K], pose feature [P],
    joint transforms [J,4,4]) in the dtype/device of ``like``."""
    psi = _expr_vector(params, num_expr, like)  # [K]
    rot_mats = full_pose_matrices(*(_frame_value(params, key, POSE_WIDTHS[key], like) for key in POSE_KEYS[:4]))
    joints = rest_joints + torch.einsum("k,kjc->jc", psi, joint_exprdirs)
    transforms = lbs_transforms(rot_mats, joints[None], parents)[0]  # [J, 4, 4]
    return psi, pose_feature(rot_mats)[0], transforms


def _blend_per_gaussian(psi: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """sum_k psi_k deltas_k: psi [K], deltas [K, N] or [K, N, C] -> [N, 1] or [N, C]."""
    out = torch.tensordot(psi, deltas, dims=1)
    return out[:, None] if out.dim() == 1 else out


def _frame_terms(rig: Rig, params: Dict[str, torch.Tensor]):
    """Per-frame quantities that do not depend on the rest splats (the reference path, [N, C] layout).

    Returns (delta means [N,3], expression rotation quats [N,4], delta log-scales [N,1|3], blended LBS minus identity [N,3,4],
    blended joint quaternions [N,4] (the skinning rotation, not normalised), translation [3]).
    """
    like = rig.rest["means"]
    n, k = rig.num_gaussians, rig.num_expr
    psi, feature, transforms = _joint_terms(params, rig.rest_joints, rig.joint_exprdirs, rig.parents, k, like)
    d_means = psi @ rig.expr_dmeans.reshape(k, n * 3) + feature @ rig.pose_dmeans.reshape(-1, n * 3)
    d_quats = rotvec_to_quat((psi @ rig.expr_drotvecs.reshape(k, n * 3)).reshape(n, 3))
    d_logs = _blend_per_gaussian(psi, rig.expr_dlog_scales)  # [N, 1] (isotropic) or [N, 3]
    eye = torch.eye(4, dtype=like.dtype, device=like.device)[:3]
    blended = (rig.skin_weights @ (transforms[:, :3, :] - eye).reshape(-1, 12)).reshape(n, 3, 4)  # sum_j w_j (A_j - I)
    joint_q = matrix_to_quat(transforms[:, :3, :3])  # [J, 4], w >= 0
    skin_q = rig.skin_weights @ joint_q  # [N, 4]
    trans = _frame_value(params, "translation", 3, like)[0]
    return d_means.reshape(n, 3), d_quats, d_logs, blended, skin_q, trans


def evaluate_rig_reference(rig: Rig, params: Dict[str, torch.Tensor], *, rotate_colours: bool = True) -> Splats:
    """The reference per-frame path: the formulas of the module doc written out in the [N, C]
    layout, differentiable in every rig tensor. :func:`evaluate_rig` is the fast path (same result,
    tested against this one)."""
    rest = rig.rest
    d_means, d_quats, d_logs, blended, skin_q, trans = _frame_terms(rig, params)
    means = rest["means"] + d_means
    means = means + (blended[..., :3] @ means[..., None])[..., 0] + blended[..., 3] + trans
    q_expr = quat_multiply(d_quats, F.normalize(rest["quats"], dim=-1))
    quats = quat_multiply(skin_q, q_expr)  # the joint-quaternion blend is left unnormalised
    out = {"means": means, "quats": quats, "scales": rest["scales"] + d_logs,
           "opacities": rest["opacities"], "sh0": rest["sh0"], "shN": rest["shN"]}
    if rig.expr_dsh0 is not None or rig.expr_dopacities is not None:  # a learned rig's appearance deltas
        psi = _expr_vector(params, rig.num_expr, rest["means"])
        if rig.expr_dsh0 is not None:
            out["sh0"] = rest["sh0"] + _blend_per_gaussian(psi, rig.expr_dsh0)[:, None]
        if rig.expr_dopacities is not None:
            out["opacities"] = rest["opacities"] + _blend_per_gaussian(psi, rig.expr_dopacities)[:, 0]
    if rotate_colours and rest["shN"].shape[1] > 0:
        rel = quat_multiply(quats, quat_conjugate(F.normalize(rest["quats"], dim=-1)))
        out["shN"] = rotate_sh(rest["shN"], quat_to_matrix(rel))
    return out


# --------------------------------------------------------------------------------------------
# Fast per-frame evaluation (the runtime path; the maths of evaluate_rig_reference, packed and fused)
# --------------------------------------------------------------------------------------------

# quaternion products as 4x4 matrices: a ⊗ b = L(a) b = R(b) a  (wxyz)
_L_IDX = (0, 1, 2, 3, 1, 0, 3, 2, 2, 3, 0, 1, 3, 2, 1, 0)
_L_SIGN = (1, -1, -1, -1, 1, 1, -1, 1, 1, 1, 1, -1, 1, -1, 1, 1)
_R_IDX = (0, 1, 2, 3, 1, 0, 3, 2, 2, 3, 0, 1, 3, 2, 1, 0)
_R_SIGN = (1, -1, -1, -1, 1, 1, 1, -1, 1, -1, 1, 1, 1, 1, -1, 1)


class PackedRig:
    """A rig packed for :func:`evaluate_rig`: component-major ("structure of arrays", [C, N]) tensors.

    Component-major layout makes every per-Gaussian op a contiguous vector op, which is several
    times faster on CPU than [N, C] with small trailing dims. Build it once per rig
    (:func:`pack_rig`) and drive it for every frame; it is a snapshot (pack again after changing the rig).
    """

    def __init__(self, rig: Rig):
        n, k = rig.num_gaussians, rig.num_expr
        like = rig.rest["means"]
        self.rig = rig
        # [K, R*N]: rows of 3 mean deltas, 3 rotation-vector deltas, 1 (isotropic) or 3 (per-axis) log-scale
        # deltas, and for a learned rig 3 SH-DC colour and 1 opacity delta, each over N
        dlog = rig.expr_dlog_scales if rig.expr_dlog_scales.dim() == 3 else rig.expr_dlog_scales[..., None]
        parts = [rig.expr_dmeans, rig.expr_drotvecs, dlog]
        self.num_log_rows = dlog.shape[-1]
        self.has_colour, self.has_opacity = rig.expr_dsh0 is not None, rig.expr_dopacities is not None
        if self.has_colour:
            parts.append(rig.expr_dsh0)
        if self.has_opacity:
            parts.append(rig.expr_dopacities[..., None])
        expr = torch.cat([p.to(like) for p in parts], dim=-1)  # [K, N, R]
        self.rows = expr.shape[-1]
        self.expr = expr.transpose(1, 2).reshape(k, self.rows * n).contiguous()
        self.pose = rig.pose_dmeans.transpose(1, 2).reshape(-1, 3 * n).to(like).contiguous()  # [P, 3*N]
        self.weights_t = rig.skin_weights.t().to(like).contiguous()  # [J, N]
        self.rest_means_t = rig.rest["means"].t().contiguous()  # [3, N]
        q = F.normalize(rig.rest["quats"], dim=-1)
        idx = torch.tensor(_R_IDX, device=like.device)
        sign = torch.tensor(_R_SIGN, dtype=like.dtype, device=like.device)
        self.right_rest = (q[:, idx] * sign).t().reshape(4, 4, n).contiguous()  # R(q_rest)[i, j, n]
        # the joint maths run on the CPU in float64 (a few 4x4 matrices per frame)
        self.rest_joints = rig.rest_joints.detach().cpu().double()
        self.joint_exprdirs = rig.joint_exprdirs.detach().cpu().double()
        self.parents = rig.parents.detach().cpu()
        self.left_idx = torch.tensor(_L_IDX)
        self.left_sign = torch.tensor(_L_SIGN, dtype=torch.float64)
        self.num_expr = k


def pack_rig(rig: Rig) -> PackedRig:
    """Pack ``rig`` for fast per-frame evaluation (see :class:`PackedRig`)."""
    return PackedRig(rig)


def evaluate_rig(rig, params: Dict[str, torch.Tensor], *, rotate_colours: bool = True) -> Splats:
    """Blendshapes + LBS for one frame of VHAP parameters -> raw splats (dtype/device of the rig).

    ``rig``: a :class:`PackedRig` (pack once, drive many frames) or a :class:`Rig` (packed for this
    call). ``params`` may hold any of rotation, neck_pose, jaw_pose, eyes_pose, translation, expr
    (missing ones are 0; expression coefficients beyond the rig's K are ignored). Returned
    quaternions are not normalised (the joint-quaternion blend is left unnormalised; activation
    normalises). Per frame this is two matrix-vector products over the packed deltas, one small
    matrix product for skinning, and a handful of element-wise ops.
    """
    rt = rig if isinstance(rig, PackedRig) else PackedRig(rig)
    rest = rt.rig.rest
    like = rest["means"]
    n = rt.rig.num_gaussians
    cpu = torch.zeros((), dtype=torch.float64)
    psi, feature, transforms = _joint_terms(params, rt.rest_joints, rt.joint_exprdirs, rt.parents, rt.num_expr, cpu)
    num_joints = transforms.shape[0]
    a_minus_i = (transforms[:, :3, :] - torch.eye(4, dtype=torch.float64)[:3]).reshape(num_joints, 12)
    left = matrix_to_quat(transforms[:, :3, :3])[:, rt.left_idx] * rt.left_sign  # [J, 16] = L(q_j)
    trans = _frame_value(params, "translation", 3, cpu)[0]
    small = torch.cat([psi, feature, a_minus_i.reshape(-1), left.reshape(-1), trans]).to(like)  # one transfer
    k, p = psi.shape[0], feature.shape[0]
    psi_t, feature_t = small[:k], small[k:k + p]
    amat = small[k + p:k + p + 12 * num_joints]
    lmat, trans_t = small[k + p + 12 * num_joints:-3], small[-3:]

    blend = (psi_t @ rt.expr).view(rt.rows, n)  # component-major [R, N]
    means = rt.rest_means_t + blend[:3] + (feature_t @ rt.pose).view(3, n)  # [3, N]
    lbs = (amat.view(num_joints, 12).t() @ rt.weights_t).view(3, 4, n)  # sum_j w_j (A_j - I), [3, 4, N]
    means = means + (lbs[:, :3] * means[None]).sum(1) + lbs[:, 3] + trans_t[:, None]

    rv = blend[3:6]
    theta = (rv * rv).sum(0).sqrt()
    half = 0.5 * theta
    dq = torch.cat([torch.cos(half)[None], rv * (torch.sin(half) / theta.clamp_min(1e-20))[None]], dim=0)  # exp(rv), [4, N]
    q_expr = (rt.right_rest * dq[None]).sum(1)  # dq ⊗ q_rest, [4, N]
    skin_left = (lmat.view(num_joints, 16).t() @ rt.weights_t).view(4, 4, n)  # L(sum_j w_j q_j)
    quats = (skin_left * q_expr[None]).sum(1).t()  # [N, 4]
    means = means.t()
    row = 6 + rt.num_log_rows
    scales = rest["scales"] + blend[6:row].t()

    out = {
        "means": means,
        "quats": quats,
        "scales": scales,
        "opacities": rest["opacities"],
        "sh0": rest["sh0"],
        "shN": rest["shN"],
    }
    if rt.has_colour:
        out["sh0"] = rest["sh0"] + blend[row:row + 3].t()[:, None]
        row += 3
    if rt.has_opacity:
        out["opacities"] = rest["opacities"] + blend[row]
    if rotate_colours and rest["shN"].shape[1] > 0:
        rel = quat_multiply(quats, quat_conjugate(F.normalize(rest["quats"], dim=-1)))
        out["shN"] = rotate_sh(rest["shN"], quat_to_matrix(rel))
    return out


def source_exact_rest(rig: Rig, splats: Splats) -> Splats:
    """Rest splats for which :func:`evaluate_rig` at the rig's source parameters returns ``splats``.

    Inverts the blend + LBS at the source frame (it is affine in the rest means, and the
    quaternion/log-scale blends are additive), so the round trip is exact and the neutral pose
    differs from the mesh-rigged neutral only by the blendshape linearisation error at the source.
    """
    like = rig.rest["means"]
    src = {key: v.detach().to(like) for key, v in splats.items()}
    d_means, d_quats, d_logs, blended, skin_q, trans = _frame_terms(rig, rig.source)
    skin_q = F.normalize(skin_q, dim=-1)
    lin = blended[..., :3] + torch.eye(3, dtype=like.dtype, device=like.device)
    means = torch.linalg.solve(lin, (src["means"] - blended[..., 3] - trans)[..., None])[..., 0] - d_means
    target = quat_multiply(quat_conjugate(skin_q), F.normalize(src["quats"], dim=-1))  # unit
    mesh_rest_q = F.normalize(rig.rest["quats"], dim=-1)
    target = torch.where((target * mesh_rest_q).sum(-1, keepdim=True) < 0, -target, target)
    quats = quat_multiply(quat_conjugate(d_quats), target)  # d_quats ⊗ quats == target
    out = {
        "means": means,
        "quats": quats,
        "scales": src["scales"] - d_logs,
        "opacities": src["opacities"],
        "sh0": src["sh0"],
        "shN": src["shN"],
    }
    psi = _expr_vector(rig.source, rig.num_expr, like)
    if rig.expr_dsh0 is not None:
        out["sh0"] = src["sh0"] - _blend_per_gaussian(psi, rig.expr_dsh0)[:, None]
    if rig.expr_dopacities is not None:
        out["opacities"] = src["opacities"] - _blend_per_gaussian(psi, rig.expr_dopacities)[:, 0]
    if src["shN"].shape[1] > 0:
        rel = quat_multiply(quat_multiply(skin_q, target), quat_conjugate(F.normalize(quats, dim=-1)))
        out["shN"] = rotate_sh(src["shN"], quat_to_matrix(rel).transpose(-1, -2))
    return out


def mesh_rig_splats(model: FlameModel, rig: Rig, params: Dict[str, torch.Tensor], *,
                    rotate_colours: bool = True) -> Splats:
    """Reference animation: Gaussians follow their triangles on FLAME(identity, params), the FLAME model
    scaled by the rig's ``flame_scale`` (fitted rigs). A learned rig's colour and opacity deltas are
    blended as in :func:`evaluate_rig` (geometry comes from the mesh alone)."""
    from fastavatar.flame.fit import scale_flame_model

    model = scale_flame_model(model.to(dtype=torch.float64), float(rig.flame_scale))
    full = {key: torch.as_tensor(v, dtype=torch.float64).reshape(1, -1)
            for key, v in params.items() if key in SOURCE_KEYS}
    full["shape"] = rig.shape.to(torch.float64).reshape(1, -1)
    full["static_offset"] = rig.static_offset.to(torch.float64).reshape(1, -1, 3)
    vertices = flame_forward(model, **full).vertices[0]
    base = {key: v.to(torch.float64) for key, v in rig.rest.items()}
    out = place_splats(binding_from_rig(rig), base, vertices, model.faces, rotate_colours=rotate_colours)
    psi = _expr_vector(params, rig.num_expr, base["means"])
    if rig.expr_dsh0 is not None:
        out["sh0"] = base["sh0"] + _blend_per_gaussian(psi, rig.expr_dsh0.to(torch.float64))[:, None]
    if rig.expr_dopacities is not None:
        out["opacities"] = base["opacities"] + _blend_per_gaussian(psi, rig.expr_dopacities.to(torch.float64))[:, 0]
    return {key: v.to(rig.rest["means"].dtype) for key, v in out.items()}
