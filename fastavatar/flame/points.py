"""Triangle centres of the FLAME(+teeth) mesh, and the check against a subject's points3D.

FastAvatar's 10144 anchor points are the per-triangle centroids of VHAP's FLAME+teeth mesh in
the tracked timestep-0 pose (9976 FLAME faces, then 168 teeth faces). :func:`compare_centres`
measures how well a FLAME model with the subject's tracked parameters reproduces them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from fastavatar import NUM_TEMPLATE_GAUSSIANS
from fastavatar.flame.model import FlameModel, flame_forward, params_from_npz


def triangle_centres(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Vertices [..., V, 3], faces [F, 3] -> centroids [..., F, 3]."""
    return vertices[..., faces, :].mean(dim=-2)


def flame_centres(model: FlameModel, params: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Triangle centres [F, 3] of FLAME evaluated with VHAP parameters (batch of one)."""
    out = flame_forward(model, **{k: v for k, v in params.items()})
    return triangle_centres(out.vertices[0], model.faces)


@dataclass
class CentreReport:
    num_points: int  # points in the subject's points3D
    num_faces: int  # faces of the model
    num_compared: int  # min of the two
    max_error: float  # metres, over the compared indices
    max_error_flame: float  # metres, over FLAME faces (excluding teeth)
    max_error_teeth: Optional[float]  # metres, over teeth faces (None if the model has none)
    mean_error: float  # metres

    def matches(self, tol: float = 1e-5) -> bool:
        return self.num_points == self.num_faces and self.max_error <= tol

    def summary(self) -> str:
        teeth = "n/a" if self.max_error_teeth is None else f"{self.max_error_teeth:.3e}"
        return (
            f"{self.num_compared} of {self.num_points} points vs {self.num_faces} faces: max error "
            f"{self.max_error:.3e} m (FLAME faces {self.max_error_flame:.3e}, teeth {teeth}), mean {self.mean_error:.3e} m"
        )


def compare_centres(model: FlameModel, params: Dict[str, torch.Tensor], points: torch.Tensor) -> CentreReport:
    """Index-wise distance between FLAME triangle centres and ``points`` [P, 3]."""
    centres = flame_centres(model, params)
    n = min(centres.shape[0], points.shape[0])
    err = (centres[:n] - points[:n].to(centres)).norm(dim=-1)
    n_flame = min(n, model.num_faces - model.num_teeth_faces)
    teeth = err[n_flame:]
    return CentreReport(
        num_points=int(points.shape[0]),
        num_faces=model.num_faces,
        num_compared=n,
        max_error=float(err.max()),
        max_error_flame=float(err[:n_flame].max()),
        max_error_teeth=float(teeth.max()) if model.num_teeth_faces and teeth.numel() else None,
        mean_error=float(err.mean()),
    )


def check_subject(model: FlameModel, subject_dir: Union[str, Path], frame: str = "00000") -> CentreReport:
    """Compare FLAME centres (frame ``frame``'s tracked parameters) with ``sparse/0/points3D``."""
    from fastavatar.data import SubjectParser

    parser = SubjectParser(subject_dir)
    path = Path(subject_dir) / "flame_param" / f"{frame}.npz"
    if parser.flame_param_path is not None and frame == "00000":
        path = Path(parser.flame_param_path)
    return compare_centres(model, params_from_npz(path), parser.points.double())


def points_from_flame_file(
    flame_model: Union[str, Path, None, FlameModel],
    flame_param_path: Union[str, Path],
    fallback_points: Optional[torch.Tensor] = None,  # [P, 3] used for indices the model has no face for
    expected: Optional[int] = NUM_TEMPLATE_GAUSSIANS,
) -> torch.Tensor:
    """FastAvatar anchor points [P, 3] float32 from our FLAME forward (guided inference, "flame" points).

    ``flame_model`` is a path (None = the default location) or a loaded :class:`FlameModel`;
    ``flame_param_path`` a VHAP ``flame_param/*.npz``. A model without VHAP's teeth has 9976 faces,
    fewer than the 10144 points FastAvatar expects: the missing trailing points are taken from
    ``fallback_points`` (e.g. the subject's points3D) if given, otherwise a one-line error is raised.
    """
    from fastavatar.flame.model import load_flame_model

    model = flame_model if isinstance(flame_model, FlameModel) else load_flame_model(flame_model)
    centres = flame_centres(model, params_from_npz(flame_param_path)).float()
    if expected is None or centres.shape[0] == expected:
        return centres
    if centres.shape[0] > expected:
        raise ValueError(f"{model.source}: {centres.shape[0]} faces but {expected} points expected")
    if fallback_points is None or fallback_points.shape[0] < expected:
        raise ValueError(
            f"{model.source}: FLAME has {centres.shape[0]} faces, FastAvatar needs {expected} (FLAME + VHAP teeth); "
            f"use a teeth-extended model (.npz, see fastavatar.flame.teeth) or pass fallback points"
        )
    return torch.cat([centres, fallback_points[centres.shape[0]:expected].to(centres)])


def main(argv=None) -> int:
    """``python -m fastavatar.flame.points --flame_model F --subject_dir data/nersemble/306``."""
    import argparse

    from fastavatar.flame.model import FlameModelMissing, load_flame_model

    ap = argparse.ArgumentParser(description="Compare FLAME triangle centres with a subject's points3D.")
    ap.add_argument("--flame_model", type=Path, default=None, help="FLAME pkl/npz (default pretrained_weights/flame/flame2023.pkl)")
    ap.add_argument("--subject_dir", type=Path, required=True)
    ap.add_argument("--frame", default="00000", help="flame_param frame name")
    args = ap.parse_args(argv)
    try:
        model = load_flame_model(args.flame_model)
    except FlameModelMissing as exc:
        print(f"error: {exc}")
        return 2
    report = check_subject(model, args.subject_dir, args.frame)
    print(report.summary())
    return 0 if report.matches() else 1


if __name__ == "__main__":
    raise SystemExit(main())
