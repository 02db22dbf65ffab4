"""FLAME model: loading (pickle / npz) and forward with linear blend skinning.

Conventions (owned here):
- Joints: 0 global (root), 1 neck, 2 jaw, 3 left eye, 4 right eye (FLAME ``kintree_table``).
- Parameters follow VHAP's ``flame_param/*.npz``: ``rotation`` [B,3] (axis-angle, global joint),
  ``neck_pose`` [B,3], ``jaw_pose`` [B,3], ``eyes_pose`` [B,6] (left then right, axis-angle),
  ``translation`` [B,3] (added after skinning), ``shape`` [B,S], ``expr`` [B,E],
  ``static_offset`` [B,V,3] (per-vertex offset added to the template; VHAP writes 5143 rows =
  5023 FLAME vertices + 120 teeth vertices, extra rows are ignored for a teeth-less model).
  The offset is added before joint regression, so joints follow it (as VHAP's forward does, to
  our reading of the spec; checked indirectly by :mod:`fastavatar.flame.points` on real data).
- Pose correctives use the SMPL/FLAME feature ``(R_j - I)`` flattened row-major for the non-root
  joints j = 1..J-1 (36 values for FLAME), times ``posedirs`` [36, V*3].
- Units: metres; the model's own frame (VHAP world frame once tracked parameters are applied).

The FLAME file is licence-restricted and never bundled: the user puts FLAME 2023
(``flame2023.pkl``, the version VHAP tracks with) or FLAME 2020 (``generic_model.pkl``) at
``pretrained_weights/flame/flame2023.pkl`` or passes ``--flame_model``. Old pickles contain
chumpy arrays and scipy sparse matrices; :func:`load_flame_model` reads them without chumpy or
scipy, through the restricted unpickler (:mod:`fastavatar.io.unpickle`): those objects load as
inert stand-ins whose arrays are read back here, and nothing in the file can run code.
A ``.npz`` with the keys of :data:`NPZ_KEYS` is also accepted (this is the format the tests use,
and :meth:`FlameModel.save_npz` writes it, e.g. to cache a converted pickle or a teeth-extended model).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch

from fastavatar.core.cameras import axis_angle_to_matrix
from fastavatar.io.unpickle import StandInObject, load_npz, load_pickle_file

DEFAULT_FLAME_PATH = Path("pretrained_weights/flame/flame2023.pkl")
NPZ_KEYS = ("v_template", "shapedirs", "exprdirs", "posedirs", "J_regressor", "parents", "lbs_weights", "faces")
PARAM_KEYS = ("rotation", "neck_pose", "jaw_pose", "eyes_pose", "translation", "shape", "expr", "static_offset")


class FlameModelMissing(FileNotFoundError):
    """Raised when the (licence-restricted) FLAME model file is not present."""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _to_numpy(value, key: str, path) -> np.ndarray:
    """A FLAME entry as an array: numpy arrays as they are; chumpy ``Ch`` stand-ins by their
    value (``x``); scipy sparse stand-ins densified from their CSC/CSR/COO arrays."""
    if isinstance(value, StandInObject):
        state = value.state_dict()
        if value.module.split(".")[0] == "chumpy":
            for name in ("x", "a"):
                if name in state:
                    return _to_numpy(state[name], key, path)
            raise ValueError(f"{path}: FLAME entry {key!r} is a chumpy {value.name} without a value")
        if value.module.startswith("scipy.sparse"):
            return _sparse_to_dense(value.name, state, key, path)
        raise ValueError(f"{path}: FLAME entry {key!r} is a pickled {value.qualname} object, not an array")
    arr = np.asarray(value)
    if arr.dtype == object:
        raise ValueError(f"{path}: FLAME entry {key!r} holds Python objects, not numbers")
    return arr


def _sparse_to_dense(name: str, state: dict, key: str, path) -> np.ndarray:
    shape = state.get("_shape", state.get("shape"))
    try:
        shape = tuple(int(s) for s in shape)
        data = np.asarray(state["data"], dtype=np.float64)
        if name.startswith(("csc", "csr")):
            indices = np.asarray(state["indices"], dtype=np.int64)
            indptr = np.asarray(state["indptr"], dtype=np.int64)
            dense = np.zeros(shape if name.startswith("csr") else shape[::-1], dtype=np.float64)
            rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
            np.add.at(dense, (rows, indices), data)
            return dense if name.startswith("csr") else dense.T
        if name.startswith("coo"):
            dense = np.zeros(shape, dtype=np.float64)
            np.add.at(dense, (np.asarray(state["row"], dtype=np.int64), np.asarray(state["col"], dtype=np.int64)), data)
            return dense
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"{path}: FLAME entry {key!r}: unreadable sparse matrix ({type(exc).__name__}: {exc})") from None
    raise ValueError(f"{path}: FLAME entry {key!r}: sparse format {name} is not supported (csc, csr, coo are)")


@dataclass
class FlameModel:
    """FLAME tensors (float64 on CPU unless moved). V vertices, F faces, J joints."""

    v_template: torch.Tensor  # [V, 3] template vertices
    shapedirs: torch.Tensor  # [V, 3, S] identity basis
    exprdirs: torch.Tensor  # [V, 3, E] expression basis
    posedirs: torch.Tensor  # [(J-1)*9, V*3] pose-corrective basis
    J_regressor: torch.Tensor  # [J, V] joint regressor (dense)
    parents: torch.Tensor  # [J] int64 parent index, -1 for the root
    lbs_weights: torch.Tensor  # [V, J] skinning weights
    faces: torch.Tensor  # [F, 3] int64 triangle vertex ids
    num_teeth_vertices: int = 0  # trailing vertices added by a teeth extension (VHAP: 120)
    num_teeth_faces: int = 0  # trailing faces added by a teeth extension (VHAP: 168)
    source: str = ""  # file it was loaded from (for messages)

    @property
    def num_vertices(self) -> int:
        return int(self.v_template.shape[0])

    @property
    def num_faces(self) -> int:
        return int(self.faces.shape[0])

    @property
    def num_shape(self) -> int:
        return int(self.shapedirs.shape[-1])

    @property
    def num_expr(self) -> int:
        return int(self.exprdirs.shape[-1])

    @property
    def num_joints(self) -> int:
        return int(self.parents.shape[0])

    def to(self, device=None, dtype=None) -> "FlameModel":
        kw = {}
        for name in ("v_template", "shapedirs", "exprdirs", "posedirs", "J_regressor", "lbs_weights"):
            kw[name] = getattr(self, name).to(device=device, dtype=dtype)
        for name in ("parents", "faces"):
            kw[name] = getattr(self, name).to(device=device)
        return replace(self, **kw)

    def save_npz(self, path: Union[str, Path]) -> None:
        """Write the model in the ``.npz`` layout :func:`load_flame_model` reads."""
        from fastavatar.io.atomic import atomic_path

        arrays = {k: getattr(self, k).cpu().numpy() for k in NPZ_KEYS}
        arrays["num_teeth_vertices"] = np.int64(self.num_teeth_vertices)
        arrays["num_teeth_faces"] = np.int64(self.num_teeth_faces)
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, **arrays)

    def forward(self, **params) -> torch.Tensor:
        """Shorthand for :func:`flame_forward` (returns vertices [B, V, 3])."""
        return flame_forward(self, **params).vertices


def _from_arrays(arrays: Dict[str, np.ndarray], source: str, num_shape: int = 300) -> FlameModel:
    """Build a :class:`FlameModel` from official-pickle keys or our npz keys."""
    f64 = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64))  # noqa: E731
    if "exprdirs" in arrays:  # our npz layout
        model = FlameModel(
            v_template=f64(arrays["v_template"]),
            shapedirs=f64(arrays["shapedirs"]),
            exprdirs=f64(arrays["exprdirs"]),
            posedirs=f64(arrays["posedirs"]),
            J_regressor=f64(arrays["J_regressor"]),
            parents=torch.as_tensor(np.asarray(arrays["parents"], dtype=np.int64)),
            lbs_weights=f64(arrays["lbs_weights"]),
            faces=torch.as_tensor(np.asarray(arrays["faces"], dtype=np.int64)),
            num_teeth_vertices=int(arrays.get("num_teeth_vertices", 0)),
            num_teeth_faces=int(arrays.get("num_teeth_faces", 0)),
            source=source,
        )
    else:  # official FLAME pickle keys
        required = ("v_template", "shapedirs", "posedirs", "J_regressor", "kintree_table", "weights", "f")
        missing = [k for k in required if k not in arrays]
        if missing:
            raise ValueError(f"{source}: not a FLAME model file (missing keys {missing})")
        arr = lambda key: _to_numpy(arrays[key], key, source)  # noqa: E731
        v_template = arr("v_template")
        all_dirs = arr("shapedirs")  # [V, 3, S+E]
        num_vertices = v_template.shape[0]
        posedirs = arr("posedirs")  # [V, 3, 36]
        parents = arr("kintree_table")[0].astype(np.int64)
        parents[0] = -1  # the root's parent is stored as a huge uint
        model = FlameModel(
            v_template=f64(v_template),
            shapedirs=f64(all_dirs[:, :, :num_shape]),
            exprdirs=f64(all_dirs[:, :, num_shape:]),
            posedirs=f64(posedirs.reshape(num_vertices * 3, -1).T),
            J_regressor=f64(arr("J_regressor")),
            parents=torch.as_tensor(parents),
            lbs_weights=f64(arr("weights")),
            faces=torch.as_tensor(arr("f").astype(np.int64)),
            source=source,
        )
    _check_model(model)
    return model


def _check_model(m: FlameModel) -> None:
    v, j = m.num_vertices, m.num_joints
    checks = {
        "shapedirs": (m.shapedirs.shape[:2], (v, 3)),
        "exprdirs": (m.exprdirs.shape[:2], (v, 3)),
        "posedirs": (tuple(m.posedirs.shape), ((j - 1) * 9, v * 3)),
        "J_regressor": (tuple(m.J_regressor.shape), (j, v)),
        "lbs_weights": (tuple(m.lbs_weights.shape), (v, j)),
    }
    for name, (got, want) in checks.items():
        if tuple(got) != tuple(want):
            raise ValueError(f"{m.source}: FLAME {name} has shape {tuple(got)}, expected {tuple(want)}")
    if int(m.faces.max()) >= v:
        raise ValueError(f"{m.source}: FLAME faces index vertex {int(m.faces.max())} but there are {v}")


def load_flame_model(path: Union[str, Path, None] = None, *, num_shape: int = 300) -> FlameModel:
    """Load FLAME from a pickle (``generic_model.pkl`` / ``flame2023.pkl``) or our ``.npz``.

    ``num_shape`` splits the official stacked ``shapedirs`` into identity (first ``num_shape``)
    and expression (the rest); FLAME 2020/2023 use 300 + 100.
    Raises :class:`FlameModelMissing` with a one-line message when the file is absent.
    """
    path = Path(path) if path not in (None, "") else DEFAULT_FLAME_PATH
    if not path.is_file():
        raise FlameModelMissing(
            f"FLAME model not found at {path}: download FLAME 2023 (flame2023.pkl, licence from "
            f"https://flame.is.tue.mpg.de) and put it at {DEFAULT_FLAME_PATH} or pass --flame_model PATH"
        )
    try:
        arrays = load_npz(path) if path.suffix == ".npz" else load_pickle_file(path)
    except Exception as exc:  # noqa: BLE001 - a damaged or refused pickle raises many types; one line
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ValueError(f"{path}: cannot read FLAME model ({type(exc).__name__}: {first})") from None
    if not isinstance(arrays, dict):
        raise ValueError(f"{path}: FLAME file holds a {type(arrays).__name__}, expected a dict of arrays")
    try:
        return _from_arrays(arrays, str(path), num_shape=num_shape)
    except (IndexError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"{path}: not a usable FLAME model ({type(exc).__name__}: {exc})") from None


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@dataclass
class FlameOutput:
    vertices: torch.Tensor  # [B, V, 3] posed vertices (translation included)
    joints: torch.Tensor  # [B, J, 3] posed joint locations (translation included)
    rest_joints: torch.Tensor  # [B, J, 3] joints regressed from the shaped, unposed mesh
    transforms: torch.Tensor  # [B, J, 4, 4] per-joint LBS transforms (rest -> posed, no translation)
    shaped: torch.Tensor  # [B, V, 3] template + shape + expression + static offset (no pose)


def full_pose_matrices(rotation, neck_pose, jaw_pose, eyes_pose) -> torch.Tensor:
    """VHAP pose parameters -> per-joint rotations [B, 5, 3, 3]."""
    pose = torch.cat([rotation, neck_pose, jaw_pose, eyes_pose[..., :3], eyes_pose[..., 3:6]], dim=-1)
    return axis_angle_to_matrix(pose.reshape(pose.shape[0], 5, 3))


def pose_feature(rot_mats: torch.Tensor) -> torch.Tensor:
    """[B, J, 3, 3] -> [B, (J-1)*9] pose-corrective feature (R - I of non-root joints)."""
    eye = torch.eye(3, dtype=rot_mats.dtype, device=rot_mats.device)
    return (rot_mats[:, 1:] - eye).reshape(rot_mats.shape[0], -1)


def lbs_transforms(rot_mats: torch.Tensor, joints: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
    """Kinematic chain: rotations [B,J,3,3] about rest joints [B,J,3] -> LBS transforms [B,J,4,4].

    Transform j maps a rest-pose point to its posed position if fully skinned to joint j:
    ``A_j = G_j · translate(-J_j)`` with ``G_j`` the world transform of joint j. Computed as
    ``A_j = A_parent · [R_j | (I - R_j) J_j]``, which is the same matrix and is exactly the identity
    for zero pose (no round-off). Parents must precede children (true for FLAME).
    """
    bsz, num_joints = rot_mats.shape[:2]
    eye = torch.eye(3, dtype=rot_mats.dtype, device=rot_mats.device)
    local = torch.zeros(bsz, num_joints, 4, 4, dtype=rot_mats.dtype, device=rot_mats.device)
    local[..., :3, :3] = rot_mats
    local[..., :3, 3] = ((eye - rot_mats) @ joints[..., None])[..., 0]
    local[..., 3, 3] = 1.0
    chain = [local[:, 0]]
    for j in range(1, num_joints):
        chain.append(chain[int(parents[j])] @ local[:, j])
    return torch.stack(chain, dim=1)


def _batch(x: Optional[torch.Tensor], bsz: int, width: int, like: torch.Tensor) -> torch.Tensor:
    if x is None:
        return torch.zeros(bsz, width, dtype=like.dtype, device=like.device)
    x = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    x = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if x.shape[0] == 1 and bsz > 1:
        x = x.expand(bsz, -1)
    return x


def flame_forward(
    model: FlameModel,
    *,
    shape: Optional[torch.Tensor] = None,  # [B, S'] (S' < S: missing trailing coefficients are 0; S' > S: extra ignored)
    expr: Optional[torch.Tensor] = None,  # [B, E'] (same rule against E)
    rotation: Optional[torch.Tensor] = None,  # [B, 3]
    neck_pose: Optional[torch.Tensor] = None,  # [B, 3]
    jaw_pose: Optional[torch.Tensor] = None,  # [B, 3]
    eyes_pose: Optional[torch.Tensor] = None,  # [B, 6]
    translation: Optional[torch.Tensor] = None,  # [B, 3]
    static_offset: Optional[torch.Tensor] = None,  # [B, V', 3] V' >= V uses the first V rows
    batch_size: Optional[int] = None,
) -> FlameOutput:
    """FLAME with VHAP parameters; every parameter defaults to zero."""
    ref = model.v_template
    given = [p for p in (shape, expr, rotation, neck_pose, jaw_pose, eyes_pose, translation) if p is not None]
    if batch_size is None:
        batch_size = max([torch.as_tensor(p).reshape(-1, torch.as_tensor(p).shape[-1]).shape[0] for p in given] + [1])
    bsz = batch_size
    v = model.num_vertices

    shaped = ref.expand(bsz, v, 3).clone()
    if shape is not None:
        shape = _batch(shape, bsz, model.num_shape, ref)[:, : model.num_shape]
        shaped = shaped + torch.einsum("vck,bk->bvc", model.shapedirs[..., : shape.shape[1]], shape)
    if expr is not None:
        expr = _batch(expr, bsz, model.num_expr, ref)[:, : model.num_expr]
        shaped = shaped + torch.einsum("vck,bk->bvc", model.exprdirs[..., : expr.shape[1]], expr)
    if static_offset is not None:
        offset = torch.as_tensor(static_offset, dtype=ref.dtype, device=ref.device)
        offset = offset.reshape(-1, offset.shape[-2], 3)
        if offset.shape[1] < v:
            raise ValueError(f"static_offset has {offset.shape[1]} rows but the FLAME model has {v} vertices")
        shaped = shaped + offset[:, :v]

    rest_joints = torch.einsum("jv,bvc->bjc", model.J_regressor, shaped)
    rot_mats = full_pose_matrices(
        _batch(rotation, bsz, 3, ref), _batch(neck_pose, bsz, 3, ref),
        _batch(jaw_pose, bsz, 3, ref), _batch(eyes_pose, bsz, 6, ref),
    )
    posed = shaped + (pose_feature(rot_mats) @ model.posedirs).reshape(bsz, v, 3)
    transforms = lbs_transforms(rot_mats, rest_joints, model.parents)
    vertices = skin_points(posed, model.lbs_weights, transforms)
    joints = transforms[..., :3, :3] @ rest_joints[..., None]
    joints = joints[..., 0] + transforms[..., :3, 3]
    trans = _batch(translation, bsz, 3, ref)
    return FlameOutput(
        vertices=vertices + trans[:, None],
        joints=joints + trans[:, None],
        rest_joints=rest_joints,
        transforms=transforms,
        shaped=shaped,
    )


def skin_points(points: torch.Tensor, weights: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    """LBS: points [B,P,3], weights [P,J] (rows sum to 1), transforms [B,J,4,4] -> [B,P,3].

    Evaluated as ``x + sum_j w_j (A_j - I) x`` so that identity transforms return ``x`` exactly.
    """
    eye = torch.eye(4, dtype=transforms.dtype, device=transforms.device)[:3]
    blended = torch.einsum("pj,bjrc->bprc", weights, transforms[..., :3, :] - eye)  # [B, P, 3, 4]
    return points + (blended[..., :3] @ points[..., None])[..., 0] + blended[..., 3]


def params_from_npz(path: Union[str, Path], dtype=torch.float64) -> Dict[str, torch.Tensor]:
    """Read a VHAP ``flame_param/*.npz`` (or ``canonical_flame_param.npz``) into batched tensors.

    Returns keys of :data:`PARAM_KEYS` that are present, each with a leading batch dim of 1
    (``static_offset`` [1, V, 3]).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FLAME parameter file not found: {path}")
    out: Dict[str, torch.Tensor] = {}
    with np.load(path) as data:
        for key in PARAM_KEYS:
            if key not in data.files:
                continue
            arr = np.asarray(data[key], dtype=np.float64)
            if key == "static_offset":
                arr = arr.reshape(1, -1, 3)
            else:
                arr = arr.reshape(1, -1)
            out[key] = torch.as_tensor(arr, dtype=dtype)
    if "shape" not in out and "expr" not in out:
        raise ValueError(f"{path}: not a VHAP FLAME parameter file (keys {sorted(out)})")
    return out
