"""Rig a reconstruction (``scripts/build_rig.py``): with a tracked subject's FLAME, or by fitting FLAME.

Two sources of the FLAME head a reconstruction is bound to, chosen by the flags (never silently):

- **tracked**: ``--sample_id`` (under ``--data_root``) or ``--subject_dir``: that subject's VHAP
  parameters (``flame_param/00000.npz``, or ``--flame_param``) and its points3D for the index-binding
  check; ``--flame_param`` alone: those parameters, nearest-triangle binding.
- **fit** (no subject, no ``--flame_param``): FLAME shape, pose, global scale and rigid transform
  are fitted to the Gaussian means (:mod:`fastavatar.flame.fit`, one Gaussian per triangle), the
  rig is built on the scaled FLAME (``flame_scale`` is stored in the rig) with index binding at
  the fitted triangle centres. The residual is printed, with a warning when it is large.

Contradictory flags (a subject and ``--fit``, ``--sample_id`` with ``--subject_dir``, fit options
without fitting, ...) raise :class:`RigBuildError` with one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import torch

from fastavatar.config import option
from fastavatar.flame.fit import FlameFitConfig

FIT_OPTIONS = ("fit_num_shape", "fit_num_expr", "fit_iterations", "fit_noise_std", "fit_teeth_weight", "fit_warn_rms")


class RigBuildError(ValueError):
    """A contradictory or incomplete combination of build_rig flags (one line)."""


@dataclass
class BuildRigConfig:
    splats: Optional[Path] = option(None, "reconstruction PLY (standard 3DGS layout)")
    output: Optional[Path] = option(None, "rig path (default: rig.npz beside the PLY)")
    flame_model: Optional[Path] = option(None, "FLAME pkl/npz (default pretrained_weights/flame/flame2023.pkl)")
    data_root: Optional[Path] = option(None, "folder of subject folders, with --sample_id (default data/nersemble)")
    sample_id: Optional[str] = option(None, "tracked subject under --data_root whose FLAME parameters to use")
    subject_dir: Optional[Path] = option(None, "tracked subject folder (instead of --data_root/--sample_id)")
    flame_param: Optional[Path] = option(None, "source-frame VHAP npz (default: the subject's flame_param/00000.npz)")
    fit: bool = option(False, "fit FLAME to the Gaussian means (the default when no subject or --flame_param is given)")
    num_expr: int = option(100, "expression bases to precompute")
    rest_mode: Literal["source", "mesh"] = option("source", "see fastavatar.animate.blendshapes")
    tol: float = option(1e-5, "index-binding tolerance (metres)")
    fit_num_shape: Optional[int] = option(None, "fit: identity coefficients fitted (default 100)")
    fit_num_expr: Optional[int] = option(None, "fit: expression coefficients fitted (default 50)")
    fit_iterations: Optional[int] = option(None, "fit: L-BFGS iterations (default 200)")
    fit_noise_std: Optional[float] = option(None, "fit: expected Gaussian-to-centre distance, metres (default 0.002)")
    fit_teeth_weight: Optional[float] = option(None, "fit: data weight of teeth faces (default 0: reported only)")
    fit_warn_rms: Optional[float] = option(None, "fit: warn above this RMS residual, metres of FLAME (default 0.005)")


def resolve_mode(cfg: BuildRigConfig) -> Literal["tracked", "fit"]:
    """Which FLAME head to bind to; contradictions raise :class:`RigBuildError`."""
    if cfg.splats is None:
        raise RigBuildError("--splats is required (the reconstruction PLY to rig)")
    if cfg.sample_id is not None and cfg.subject_dir is not None:
        raise RigBuildError("give --sample_id (with --data_root) or --subject_dir, not both")
    if cfg.data_root is not None and cfg.sample_id is None:
        raise RigBuildError("--data_root needs --sample_id (the subject folder under it)")
    tracked = cfg.sample_id is not None or cfg.subject_dir is not None or cfg.flame_param is not None
    fit_flags = [name for name in FIT_OPTIONS if getattr(cfg, name) is not None]
    if tracked and cfg.fit:
        raise RigBuildError("--fit fits FLAME to the head; --sample_id/--subject_dir/--flame_param use tracked "
                            "FLAME parameters: pick one")
    if tracked and fit_flags:
        raise RigBuildError(f"--{fit_flags[0]} only applies when fitting (no --sample_id/--subject_dir/--flame_param)")
    return "tracked" if tracked else "fit"


def fit_config(cfg: BuildRigConfig) -> FlameFitConfig:
    fit = FlameFitConfig()
    for name in FIT_OPTIONS:
        value = getattr(cfg, name)
        if value is not None:
            setattr(fit, name[len("fit_"):], value)
    return fit


def build_rig_command(cfg: BuildRigConfig, log: Callable[[str], None] = print):
    """Rig ``cfg.splats`` and write the rig file; returns (rig, output path)."""
    from fastavatar.animate.blendshapes import build_rig
    from fastavatar.animate.rig import save_rig
    from fastavatar.flame import load_flame_model, params_from_npz
    from fastavatar.io.ply import load_ply

    mode = resolve_mode(cfg)
    model = load_flame_model(cfg.flame_model)
    splats = load_ply(cfg.splats)
    means = splats["means"].double()
    if mode == "tracked":
        anchors = None
        subject_dir = cfg.subject_dir
        if cfg.sample_id is not None:
            data_root = cfg.data_root or Path("data/nersemble")
            subject_dir = data_root / cfg.sample_id
            if cfg.data_root is None:
                log(f"subject folder: {subject_dir} (--data_root defaults to data/nersemble)")
        param_path = cfg.flame_param
        if subject_dir is not None:
            from fastavatar.data import SubjectParser
            from fastavatar.flame.points import compare_centres

            parser = SubjectParser(subject_dir, expected_points=None)
            param_path = param_path or parser.flame_param_path
            if param_path is None:
                raise RigBuildError(f"{subject_dir}: no flame_param/*.npz; pass --flame_param")
            anchors = parser.points.double()
            log(f"FLAME centres vs {subject_dir}/sparse/0/points3D: "
                f"{compare_centres(model, params_from_npz(param_path), anchors).summary()}")
            if anchors.shape[0] != means.shape[0]:
                log(f"note: {anchors.shape[0]} points3D but {means.shape[0]} Gaussians; binding by nearest triangle")
                anchors = None
        else:
            log(f"FLAME parameters from {param_path}; no subject points3D, so binding by nearest triangle")
        params = params_from_npz(param_path)
        rig = build_rig(model, splats, params, anchors=anchors, num_expr=cfg.num_expr, tol=cfg.tol,
                        rest_mode=cfg.rest_mode)
    else:
        from fastavatar.flame.fit import fit_flame_to_means, scale_flame_model

        log("no tracked subject given: fitting FLAME (shape, pose, scale, rigid transform) to the Gaussian means")
        fcfg = fit_config(cfg)
        fit = fit_flame_to_means(model, means, fcfg)
        log(fit.summary())
        if fit.large(fcfg):
            log(f"warning: large fit residual ({fit.rms_model_units * 1e3:.1f} mm in FLAME units > "
                f"{fcfg.warn_rms * 1e3:.1f} mm): this head may not follow FLAME's triangle layout")
        n_faces = fit.centres.shape[0]
        anchors = torch.cat([fit.centres, means[n_faces:]]) if means.shape[0] > n_faces else fit.centres[: means.shape[0]]
        rig = build_rig(scale_flame_model(model, fit.scale), splats, fit.params, anchors=anchors,
                        num_expr=cfg.num_expr, tol=cfg.tol, rest_mode=cfg.rest_mode)
        rig.flame_scale = fit.scale
    output = cfg.output or cfg.splats.with_name("rig.npz")
    save_rig(output, rig)
    log(f"binding: {rig.binding_mode} (index check max error {rig.index_max_error:.3e} m, tol {cfg.tol:g}); "
        f"{rig.num_gaussians} Gaussians, {rig.num_expr} expression bases, rest={rig.rest_mode}")
    log(f"wrote {output}")
    return rig, output
