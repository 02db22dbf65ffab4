"""The animation rig: a versioned ``rig.npz`` sidecar next to a standard ``splats.ply``.

The PLY stays a plain world-space 3DGS file (the reconstruction as fitted, in the source
frame's pose). Everything needed to animate it lives in ``rig.npz`` (float32 unless noted):

- ``format`` = "fastavatar-rig", ``version`` = :data:`RIG_VERSION`, ``num_gaussians`` N,
  ``num_expr`` K, ``binding_mode`` ("index" | "nearest"), ``index_max_error`` (metres),
  ``rest_mode`` ("source": rest splats chosen so the blendshape rig reproduces the PLY exactly at
  the source frame; "mesh": rest = the Gaussians placed on the rest mesh through the binding)
- binding: ``triangle_ids`` [N] int64, ``barycentrics`` [N,3], ``local_means`` [N,3],
  ``local_quats`` [N,4], ``local_log_scales`` [N,3], ``local_shN`` [N,15,3] (triangle frame)
- rest splats (expression 0, pose 0 FLAME mesh): ``rest_<key>`` for the six splat keys
- ``kind`` ("analytic": deltas derived from FLAME's mesh by :func:`fastavatar.animate.build_rig`;
  "learned": trained on a video by ``scripts/train_blendshapes.py``), ``flame_scale`` (the head is
  ``flame_scale`` x FLAME; 1 for tracked subjects, the fitted scale otherwise), ``num_teeth_faces``
  (trailing teeth triangles of the mesh, VHAP: 168)
- blendshapes: ``expr_dmeans`` [K,N,3], ``expr_drotvecs`` [K,N,3] (rotation vectors, world frame,
  left-multiplied onto the rest rotation), ``expr_dlog_scales`` [K,N] (isotropic, analytic) or
  [K,N,3] (per axis, learned); learned rigs also ``expr_dsh0`` [K,N,3] (SH DC colour) and
  ``expr_dopacities`` [K,N] (opacity logits)
- pose correctives ``pose_dmeans`` [(J-1)*9,N,3], skinning ``skin_weights`` [N,J]
- joints: ``rest_joints`` [J,3], ``joint_exprdirs`` [K,J,3], ``parents`` [J] int64
- FLAME identity: ``shape`` [S], ``static_offset`` [V,3]; source frame parameters ``source_<key>``
  (rotation, neck_pose, jaw_pose, eyes_pose, translation, expr); mesh ``faces`` [F,3] int64.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, Optional, Type, Union

import numpy as np
import torch

from fastavatar import NUM_TEMPLATE_GAUSSIANS
from fastavatar.core.splats import SPLAT_KEYS, Splats
from fastavatar.io.atomic import atomic_path

RIG_FORMAT = "fastavatar-rig"
RIG_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: analytic only, no kind / flame_scale / num_teeth_faces
RIG_KINDS = ("analytic", "learned")
SOURCE_KEYS = ("rotation", "neck_pose", "jaw_pose", "eyes_pose", "translation", "expr")


class RigError(ValueError):
    """A rig file that cannot be used (wrong format, version or size)."""


@dataclass
class Rig:
    """In-memory rig (see module docstring for the meaning and shape of every field)."""

    binding_mode: str
    index_max_error: float
    triangle_ids: torch.Tensor  # [N]
    barycentrics: torch.Tensor  # [N, 3]
    local_means: torch.Tensor  # [N, 3]
    local_quats: torch.Tensor  # [N, 4]
    local_log_scales: torch.Tensor  # [N, 3]
    local_shN: torch.Tensor  # [N, 15, 3]
    rest: Splats  # rest-pose splats
    expr_dmeans: torch.Tensor  # [K, N, 3]
    expr_drotvecs: torch.Tensor  # [K, N, 3]
    expr_dlog_scales: torch.Tensor  # [K, N]
    pose_dmeans: torch.Tensor  # [P, N, 3]
    skin_weights: torch.Tensor  # [N, J]
    rest_joints: torch.Tensor  # [J, 3]
    joint_exprdirs: torch.Tensor  # [K, J, 3]
    parents: torch.Tensor  # [J]
    shape: torch.Tensor  # [S]
    static_offset: torch.Tensor  # [V, 3]
    faces: torch.Tensor  # [F, 3]
    source: Dict[str, torch.Tensor] = field(default_factory=dict)  # source-frame VHAP params, [1, d]
    rest_mode: str = "mesh"  # "mesh": rest = binding on the rest mesh; "source": exact round trip at the source frame
    kind: str = "analytic"  # "analytic" (FLAME-derived deltas) or "learned" (trained on a video)
    flame_scale: float = 1.0  # the head is flame_scale x FLAME (a fitted global scale); mesh rigging scales the model
    num_teeth_faces: int = 0  # trailing teeth triangles of faces (VHAP: 168), rigid in a learned rig
    expr_dsh0: Optional[torch.Tensor] = None  # [K, N, 3] learned SH DC colour deltas (None: none)
    expr_dopacities: Optional[torch.Tensor] = None  # [K, N] learned opacity-logit deltas (None: none)

    @property
    def num_gaussians(self) -> int:
        return int(self.triangle_ids.shape[0])

    @property
    def num_expr(self) -> int:
        return int(self.expr_dmeans.shape[0])

    @property
    def num_joints(self) -> int:
        return int(self.parents.shape[0])

    def truncated(self, num_expr: int) -> "Rig":
        """A view keeping the first ``num_expr`` expression bases."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("expr_dmeans", "expr_drotvecs", "expr_dlog_scales", "joint_exprdirs", "expr_dsh0", "expr_dopacities"):
            if kw[name] is not None:
                kw[name] = kw[name][:num_expr]
        return Rig(**kw)

    def to(self, dtype=torch.float32, device=None) -> "Rig":
        kw = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                value = value.to(dtype=dtype, device=device)
            elif isinstance(value, torch.Tensor):
                value = value.to(device=device)
            elif isinstance(value, dict):
                value = {k: v.to(dtype=dtype, device=device) for k, v in value.items()}
            kw[f.name] = value
        return Rig(**kw)


_TENSOR_FIELDS = (
    "triangle_ids", "barycentrics", "local_means", "local_quats", "local_log_scales", "local_shN",
    "expr_dmeans", "expr_drotvecs", "expr_dlog_scales", "pose_dmeans", "skin_weights",
    "rest_joints", "joint_exprdirs", "parents", "shape", "static_offset", "faces",
)
_INT_FIELDS = ("triangle_ids", "parents", "faces")
_OPTIONAL_FIELDS = ("expr_dsh0", "expr_dopacities")


def save_rig(path: Union[str, Path], rig: Rig) -> None:
    """Write ``rig`` to ``path`` (atomic, compressed npz)."""
    arrays = {
        "format": np.array(RIG_FORMAT),
        "version": np.int64(RIG_VERSION),
        "num_gaussians": np.int64(rig.num_gaussians),
        "num_expr": np.int64(rig.num_expr),
        "binding_mode": np.array(rig.binding_mode),
        "rest_mode": np.array(rig.rest_mode),
        "index_max_error": np.float64(rig.index_max_error),
        "kind": np.array(rig.kind),
        "flame_scale": np.float64(rig.flame_scale),
        "num_teeth_faces": np.int64(rig.num_teeth_faces),
    }
    if rig.kind not in RIG_KINDS:
        raise RigError(f"rig kind must be one of {RIG_KINDS}, got {rig.kind!r}")
    for name in _OPTIONAL_FIELDS:
        if getattr(rig, name) is not None:
            arrays[name] = getattr(rig, name).detach().cpu().numpy().astype(np.float32)
    for name in _TENSOR_FIELDS:
        t = getattr(rig, name).detach().cpu()
        arrays[name] = t.numpy().astype(np.int64 if name in _INT_FIELDS else np.float32)
    for key in SPLAT_KEYS:
        arrays[f"rest_{key}"] = rig.rest[key].detach().cpu().numpy().astype(np.float32)
    for key, value in rig.source.items():
        arrays[f"source_{key}"] = value.detach().cpu().numpy().astype(np.float32)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)


def load_rig(path: Union[str, Path], num_gaussians: int = None) -> Rig:
    """Read a rig; check format, version and (optionally) the Gaussian count against the splats.

    Raises :class:`RigError` with a one-line message on any mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rig file not found: {path} (build one with scripts/build_rig.py)")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    if str(arrays.get("format", "")) != RIG_FORMAT:
        raise RigError(f"{path}: not a fastavatar rig (format {arrays.get('format', 'missing')!s})")
    version = int(arrays.get("version", -1))
    if version not in READABLE_VERSIONS:
        raise RigError(f"{path}: rig format version {version}, this code reads versions {READABLE_VERSIONS}; "
                       f"rebuild it with scripts/build_rig.py")
    n = int(arrays["num_gaussians"])
    if num_gaussians is not None and n != num_gaussians:
        raise RigError(f"{path}: rig is for {n} Gaussians but the splats have {num_gaussians}; rebuild it for this PLY")
    kw = {name: torch.from_numpy(arrays[name]) for name in _TENSOR_FIELDS}
    kw.update({name: torch.from_numpy(arrays[name]) for name in _OPTIONAL_FIELDS if name in arrays})
    kind = str(arrays.get("kind", "analytic"))
    if kind not in RIG_KINDS:
        raise RigError(f"{path}: unknown rig kind {kind!r} (expected one of {RIG_KINDS})")
    rest = {key: torch.from_numpy(arrays[f"rest_{key}"]) for key in SPLAT_KEYS}
    source = {key: torch.from_numpy(arrays[f"source_{key}"]) for key in SOURCE_KEYS if f"source_{key}" in arrays}
    bad = [name for name in ("local_means", "expr_dmeans", "skin_weights") if kw[name].shape[-2 if name != "skin_weights" else 0] != n]
    if bad or rest["means"].shape[0] != n:
        raise RigError(f"{path}: corrupt rig, arrays {bad or ['rest_means']} disagree with num_gaussians={n}")
    return Rig(
        binding_mode=str(arrays["binding_mode"]),
        rest_mode=str(arrays["rest_mode"]),
        index_max_error=float(arrays["index_max_error"]),
        rest=rest,
        source=source,
        kind=kind,
        flame_scale=float(arrays.get("flame_scale", 1.0)),
        num_teeth_faces=int(arrays.get("num_teeth_faces", 0)),
        **kw,
    )


def random_rig(num_gaussians: int = NUM_TEMPLATE_GAUSSIANS, num_expr: int = 100, seed: int = 0,
               means: torch.Tensor = None, learned: bool = False) -> Rig:
    """A full-size rig with random (plausibly scaled) content, for benchmarks; no FLAME file needed.

    ``means`` [N,3] optionally places the rest Gaussians (e.g. a subject's points3D); ``learned``
    adds per-axis log-scale, colour and opacity deltas (the layout of a trained rig).
    """
    g = torch.Generator().manual_seed(seed)
    n, k, j = num_gaussians, num_expr, 5
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if means is None:
        means = r(n, 3) * torch.tensor([0.07, 0.1, 0.08])
    weights = torch.softmax(r(n, j) * 2, dim=-1)
    rest = {
        "means": means.float(),
        "quats": torch.nn.functional.normalize(r(n, 4), dim=-1),
        "scales": torch.full((n, 3), -5.5) + r(n, 3) * 0.3,
        "opacities": torch.full((n,), 2.0),
        "sh0": r(n, 1, 3) * 0.5,
        "shN": r(n, 15, 3) * 0.05,
    }
    rig = Rig(
        binding_mode="index", index_max_error=0.0,
        triangle_ids=torch.arange(n), barycentrics=torch.full((n, 3), 1.0 / 3.0),
        local_means=r(n, 3) * 0.1, local_quats=rest["quats"].clone(), local_log_scales=rest["scales"].clone(),
        local_shN=rest["shN"].clone(), rest=rest,
        expr_dmeans=r(k, n, 3) * 1e-3, expr_drotvecs=r(k, n, 3) * 0.02, expr_dlog_scales=r(k, n) * 0.01,
        pose_dmeans=r(36, n, 3) * 1e-4, skin_weights=weights,
        rest_joints=torch.tensor([[0.0, 0.0, 0.0], [0.0, -0.1, -0.02], [0.0, -0.03, 0.05], [0.03, 0.03, 0.08], [-0.03, 0.03, 0.08]]),
        joint_exprdirs=r(k, j, 3) * 1e-4, parents=torch.tensor([-1, 0, 1, 1, 1]),
        shape=torch.zeros(300), static_offset=torch.zeros(5143, 3), faces=torch.zeros(n, 3, dtype=torch.int64),
        source={}, rest_mode="mesh",
        kind="learned" if learned else "analytic",
        expr_dsh0=r(k, n, 3) * 0.05 if learned else None,
        expr_dopacities=r(k, n) * 0.05 if learned else None,
    )
    if learned:
        rig.expr_dlog_scales = r(k, n, 3) * 0.01
    return rig


def run_rig_script(main: Callable[[], int], *more_errors: Type[Exception]) -> int:
    """Run a rig script's ``main`` (build_rig, animate, view) through :func:`fastavatar.cli.run_script`:
    a missing FLAME model, an unusable rig, a bad file or flag, or one of ``more_errors`` prints
    ``error: <message>`` on stderr and returns exit code 2 (Ctrl-C: 130)."""
    from fastavatar.cli import run_script
    from fastavatar.flame.model import FlameModelMissing

    code = run_script(lambda _argv: main(), extra_errors=(FlameModelMissing, RigError, *more_errors))
    return 2 if code == 1 else code
