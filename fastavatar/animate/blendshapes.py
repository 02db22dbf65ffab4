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


def _frame_terms(rig: Rig, params: Dict[str, torch.Tensor]):
    """Per-frame quantities that do not depend on the rest splats.

    Returns (delta means [N,3], expression rotation quats [N,4], delta log-scales [N], blended LBS minus identity [N,3,4],
    skinning quaternions [N,4], translation [3]).
    """
    like = rig.rest["means"]
    n, k = rig.num_gaussians, rig.num_expr
    psi = _expr_vector(params, k, like)  # [K]
    rot_mats = full_pose_matrices(*(_frame_value(params, key, POSE_WIDTHS[key], like) for key in POSE_KEYS[:4]))
    d_means = (psi @ rig.expr_dmeans.reshape(k, n * 3) + pose_feature(rot_mats)[0] @ rig.pose_dmeans.reshape(-1, n * 3))
    d_quats = rotvec_to_quat((psi @ rig.expr_drotvecs.reshape(k, n * 3)).reshape(n, 3))
    d_logs = psi @ rig.expr_dlog_scales
    joints = rig.rest_joints + torch.einsum("k,kjc->jc", psi, rig.joint_exprdirs)
    transforms = lbs_transforms(rot_mats, joints[None], rig.parents)[0]  # [J, 4, 4]
    eye = torch.eye(4, dtype=like.dtype, device=like.device)[:3]
    blended = (rig.skin_weights @ (transforms[:, :3, :] - eye).reshape(-1, 12)).reshape(n, 3, 4)  # sum_j w_j (A_j - I)
    joint_q = matrix_to_quat(transforms[:, :3, :3])  # [J, 4], w >= 0
    skin_q = F.normalize(rig.skin_weights @ joint_q, dim=-1)  # [N, 4]
    trans = _frame_value(params, "translation", 3, like)[0]
    return d_means.reshape(n, 3), d_quats, d_logs, blended, skin_q, trans


# --------------------------------------------------------------------------------------------
# Fast per-frame evaluation (the runtime path; same maths as _frame_terms, fewer and fused ops)
# --------------------------------------------------------------------------------------------

# quaternion products as 4x4 matrices: a ⊗ b = L(a) b = R(b) a  (wxyz)
_L_IDX = (0, 1, 2, 3, 1, 0, 3, 2, 2, 3, 0, 1, 3, 2, 1, 0)
_L_SIGN = (1, -1, -1, -1, 1, 1, -1, 1, 1, 1, 1, -1, 1, -1, 1, 1)
_R_IDX = (0, 1, 2, 3, 1, 0, 3, 2, 2, 3, 0, 1, 3, 2, 1, 0)
_R_SIGN = (1, -1, -1, -1, 1, 1, 1, -1, 1, -1, 1, 1, 1, 1, -1, 1)


class _Runtime:
    """Packed, component-major ("structure of arrays", [C, N]) tensors for :func:`evaluate_rig`.

    Component-major layout makes every per-Gaussian op a contiguous vector op, which is several
    times faster on CPU than [N, C] with small trailing dims. Cached on the rig object.
    """

    def __init__(self, rig: Rig):
        n, k = rig.num_gaussians, rig.num_expr
        like = rig.rest["means"]
        self.key = (id(rig.rest["means"]), id(rig.rest["quats"]), id(rig.expr_dmeans), like.dtype, like.device)
        # [K, 7*N]: rows of 3 mean deltas, 3 rotation-vector deltas, 1 log-scale delta, each over N
        expr = torch.cat([rig.expr_dmeans, rig.expr_drotvecs, rig.expr_dlog_scales[..., None]], dim=-1)  # [K, N, 7]
        self.expr = expr.transpose(1, 2).reshape(k, 7 * n).to(like).contiguous()
        self.pose = rig.pose_dmeans.transpose(1, 2).reshape(-1, 3 * n).to(like).contiguous()  # [P, 3*N]
        self.weights_t = rig.skin_weights.t().to(like).contiguous()  # [J, N]
        self.rest_means_t = rig.rest["means"].t().contiguous()  # [3, N]
        q = F.normalize(rig.rest["quats"], dim=-1)
        idx = torch.tensor(_R_IDX, device=like.device)
        sign = torch.tensor(_R_SIGN, dtype=like.dtype, device=like.device)
        self.right_rest = (q[:, idx] * sign).t().reshape(4, 4, n).contiguous()  # R(q_rest)[i, j, n]
        self.rest_joints = rig.rest_joints.detach().cpu().double().numpy()
        self.joint_exprdirs = rig.joint_exprdirs.detach().cpu().double().numpy().reshape(k, -1)
        self.parents = [int(p) for p in rig.parents]
        self.num_expr = k


def _runtime(rig: Rig) -> _Runtime:
    rt = rig.__dict__.get("_runtime")
    like = rig.rest["means"]
    if rt is None or rt.key != (id(rig.rest["means"]), id(rig.rest["quats"]), id(rig.expr_dmeans), like.dtype, like.device):
        rt = _Runtime(rig)
        rig.__dict__["_runtime"] = rt
    return rt


def _np_param(params, key: str, width: int):
    import numpy as np

    value = params.get(key)
    out = np.zeros(width)
    if value is not None:
        v = np.asarray(torch.as_tensor(value).detach().cpu().double()).reshape(-1)[:width]
        out[: v.shape[0]] = v
    return out


def _joint_state(rt: _Runtime, params, psi_np):
    """Small joint maths in float64 numpy: pose feature [P], (A - I) rows [J, 12], joint quats [J, 16] as L(q)."""
    import numpy as np

    aa = np.concatenate([_np_param(params, "rotation", 3), _np_param(params, "neck_pose", 3),
                         _np_param(params, "jaw_pose", 3), _np_param(params, "eyes_pose", 6)]).reshape(5, 3)
    theta = np.linalg.norm(aa, axis=1)
    rots = np.tile(np.eye(3), (5, 1, 1))
    for j in np.nonzero(theta > 1e-12)[0]:
        x, y, z = aa[j] / theta[j]
        skew = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
        rots[j] = np.eye(3) + np.sin(theta[j]) * skew + (1 - np.cos(theta[j])) * (skew @ skew)
    joints = rt.rest_joints + (psi_np @ rt.joint_exprdirs).reshape(-1, 3)
    num_joints = len(rt.parents)
    chain = []
    for j in range(num_joints):
        local = np.eye(4)
        local[:3, :3] = rots[j]
        local[:3, 3] = (np.eye(3) - rots[j]) @ joints[j]
        chain.append(local if rt.parents[j] < 0 else chain[rt.parents[j]] @ local)
    transforms = np.stack(chain)
    a_minus_i = (transforms[:, :3, :] - np.eye(4)[:3]).reshape(num_joints, 12)
    quats = np.stack([_np_matrix_to_quat(t[:3, :3]) for t in transforms])  # [J, 4], w >= 0
    left = quats[:, list(_L_IDX)] * np.asarray(_L_SIGN, dtype=np.float64)  # [J, 16] = L(q_j)
    feature = (rots[1:] - np.eye(3)).reshape(-1)
    return feature, a_minus_i, left


def _np_matrix_to_quat(m):
    import numpy as np

    tr = m[0, 0] + m[1, 1] + m[2, 2]
    cands = np.array([1 + tr, 1 + m[0, 0] - m[1, 1] - m[2, 2], 1 - m[0, 0] + m[1, 1] - m[2, 2], 1 - m[0, 0] - m[1, 1] + m[2, 2]])
    i = int(np.argmax(cands))
    s = 2.0 * np.sqrt(max(cands[i], 1e-300))
    if i == 0:
        q = [s / 4, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif i == 1:
        q = [(m[2, 1] - m[1, 2]) / s, s / 4, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif i == 2:
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, s / 4, (m[1, 2] + m[2, 1]) / s]
    else:
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, s / 4]
    q = np.asarray(q)
    return -q if q[0] < 0 else q


def evaluate_rig(rig: Rig, params: Dict[str, torch.Tensor], *, rotate_colours: bool = True) -> Splats:
    """Blendshapes + LBS for one frame of VHAP parameters -> raw splats (dtype/device of the rig).

    ``params`` may hold any of rotation, neck_pose, jaw_pose, eyes_pose, translation, expr
    (missing ones are 0; expression coefficients beyond the rig's K are ignored). Returned
    quaternions are not normalised (the joint-quaternion blend is left unnormalised; activation
    normalises). Per frame this is two matrix-vector products over the packed deltas, one small
    matrix product for skinning, and a handful of element-wise ops.
    """
    import numpy as np

    rt = _runtime(rig)
    rest = rig.rest
    like = rest["means"]
    n, k = rig.num_gaussians, rt.num_expr
    psi_np = _np_param(params, "expr", k)
    feature, a_minus_i, left = _joint_state(rt, params, psi_np)
    psi = torch.as_tensor(psi_np, dtype=like.dtype).to(like.device)
    small = torch.as_tensor(np.concatenate([feature, a_minus_i.reshape(-1), left.reshape(-1), _np_param(params, "translation", 3)]),
                            dtype=like.dtype).to(like.device)
    p = feature.shape[0]
    feature_t, amat, lmat, trans = small[:p], small[p:p + a_minus_i.size], small[p + a_minus_i.size:-3], small[-3:]
    num_joints = a_minus_i.shape[0]

    blend = (psi @ rt.expr).view(7, n)  # component-major [7, N]
    means = rt.rest_means_t + blend[:3] + (feature_t @ rt.pose).view(3, n)  # [3, N]
    lbs = (amat.view(num_joints, 12).t() @ rt.weights_t).view(3, 4, n)  # sum_j w_j (A_j - I), [3, 4, N]
    means = means + (lbs[:, :3] * means[None]).sum(1) + lbs[:, 3] + trans[:, None]

    rv = blend[3:6]
    theta = (rv * rv).sum(0).sqrt()
    half = 0.5 * theta
    dq = torch.cat([torch.cos(half)[None], rv * (torch.sin(half) / theta.clamp_min(1e-20))[None]], dim=0)  # exp(rv), [4, N]
    q_expr = (rt.right_rest * dq[None]).sum(1)  # dq ⊗ q_rest, [4, N]
    skin_left = (lmat.view(num_joints, 16).t() @ rt.weights_t).view(4, 4, n)  # L(sum_j w_j q_j)
    quats = (skin_left * q_expr[None]).sum(1).t()  # [N, 4]
    means = means.t()
    scales = rest["scales"] + blend[6][:, None]

    out = {
        "means": means,
        "quats": quats,
        "scales": scales,
        "opacities": rest["opacities"],
        "sh0": rest["sh0"],
        "shN": rest["shN"],
    }
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
    lin = blended[..., :3] + torch.eye(3, dtype=like.dtype, device=like.device)
    means = torch.linalg.solve(lin, (src["means"] - blended[..., 3] - trans)[..., None])[..., 0] - d_means
    target = quat_multiply(quat_conjugate(skin_q), F.normalize(src["quats"], dim=-1))  # unit
    mesh_rest_q = F.normalize(rig.rest["quats"], dim=-1)
    target = torch.where((target * mesh_rest_q).sum(-1, keepdim=True) < 0, -target, target)
    quats = quat_multiply(quat_conjugate(d_quats), target)  # d_quats ⊗ quats == target
    out = {
        "means": means,
        "quats": quats,
        "scales": src["scales"] - d_logs[:, None],
        "opacities": src["opacities"],
        "sh0": src["sh0"],
        "shN": src["shN"],
    }
    if src["shN"].shape[1] > 0:
        rel = quat_multiply(quat_multiply(skin_q, target), quat_conjugate(F.normalize(quats, dim=-1)))
        out["shN"] = rotate_sh(src["shN"], quat_to_matrix(rel).transpose(-1, -2))
    return out


def mesh_rig_splats(model: FlameModel, rig: Rig, params: Dict[str, torch.Tensor], *,
                    rotate_colours: bool = True) -> Splats:
    """Reference animation: Gaussians follow their triangles on FLAME(identity, params)."""
    model = model.to(dtype=torch.float64)
    full = {key: torch.as_tensor(v, dtype=torch.float64).reshape(1, -1)
            for key, v in params.items() if key in SOURCE_KEYS}
    full["shape"] = rig.shape.to(torch.float64).reshape(1, -1)
    full["static_offset"] = rig.static_offset.to(torch.float64).reshape(1, -1, 3)
    vertices = flame_forward(model, **full).vertices[0]
    base = {key: v.to(torch.float64) for key, v in rig.rest.items()}
    out = place_splats(binding_from_rig(rig), base, vertices, model.faces, rotate_colours=rotate_colours)
    return {key: v.to(rig.rest["means"].dtype) for key, v in out.items()}


def source_params(rig: Rig) -> Dict[str, torch.Tensor]:
    """The source frame's VHAP parameters stored in the rig (drive with them to get the PLY back)."""
    return dict(rig.source)
