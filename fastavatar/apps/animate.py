"""``scripts/animate.py``: drive a reconstructed head with FLAME parameters (or the built-in demo)
and write a video (:func:`fastavatar.animate.render_sequence`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from fastavatar.animate import AnimateConfig, DemoSequenceConfig, demo_sequence, load_flame_sequence, load_rig, render_sequence
from fastavatar.animate.rig import run_rig_script
from fastavatar.animate.sequence import resolve_cameras
from fastavatar.config import option, parse_config
from fastavatar.io.atomic import atomic_write_json
from fastavatar.io.ply import load_ply


@dataclass(kw_only=True)
class AnimateCommandConfig:
    splats: Path = option(help="reconstruction PLY")
    output_dir: Path = option(help="output folder (video, summary.json, frames/ with --save_ply)")
    rig: Optional[Path] = option(None, "rig.npz (default: rig.npz beside the PLY)")
    flame_params: Optional[Path] = option(None, "folder of VHAP flame_param/*.npz (default: the built-in demo)")
    max_frames: Optional[int] = option(None, "use at most this many driving frames")
    demo_on_source: bool = option(False, "play the demo on top of the source frame's pose/expression")
    flame_model: Optional[Path] = option(None, "FLAME file for --mode mesh")
    data_root: Optional[Path] = option(None, "folder of subjects (for cameras, with --sample_id)")
    sample_id: Optional[str] = option(None, "subject folder name under --data_root")
    subject_dir: Optional[Path] = option(None, "subject folder whose camera is used")
    camera: int = option(8, "camera index in the subject folder (8 = near-frontal)")
    orbit: float = option(0.0, "orbit ±this many degrees over the sequence (0 = fixed camera)")
    animate: AnimateConfig = option(AnimateConfig(), "how frames are driven and rendered")


def animate(cfg: AnimateCommandConfig) -> dict:
    """Load the PLY and rig, build the frames and cameras, render; returns (and writes) the summary."""
    splats = load_ply(cfg.splats)
    rig = load_rig(cfg.rig or cfg.splats.with_name("rig.npz"), num_gaussians=splats["means"].shape[0])
    from fastavatar.animate.compare import is_tracked_sequence

    if cfg.flame_params is not None and is_tracked_sequence(cfg.flame_params):
        return _animate_tracked_sequence(cfg, rig)
    if cfg.flame_params is not None:
        frames = load_flame_sequence(cfg.flame_params, cfg.max_frames)
    else:
        frames = demo_sequence(DemoSequenceConfig(fps=cfg.animate.fps, num_expr=rig.num_expr),
                               base=rig.source if cfg.demo_on_source else None)
        frames = frames[: cfg.max_frames] if cfg.max_frames else frames
    model = None
    if cfg.animate.mode == "mesh":
        from fastavatar.flame import load_flame_model

        model = load_flame_model(cfg.flame_model)
    subject_dir = cfg.subject_dir or (cfg.data_root / cfg.sample_id if cfg.data_root and cfg.sample_id else None)
    c2ws, K, width, height = resolve_cameras(subject_dir, cfg.camera, rig.rest["means"].mean(0), len(frames), cfg.orbit)
    summary = render_sequence(frames, rig.to(torch.float32), c2ws, K, width, height, cfg.output_dir, cfg.animate,
                              model=model)
    summary.update({"binding_mode": rig.binding_mode, "rest_mode": rig.rest_mode,
                    "driving": str(cfg.flame_params) if cfg.flame_params else "demo"})
    atomic_write_json(cfg.output_dir / "summary.json", summary)
    print(f"wrote {summary['video']} ({summary['num_frames']} frames; drive {summary['drive_ms_per_frame']:.2f} ms/frame, "
          f"render {summary['render_ms_per_frame']:.1f} ms/frame)")
    return summary


def _animate_tracked_sequence(cfg: AnimateCommandConfig, rig) -> dict:
    """--flame_params is a tracked sequence (frames, masks, cameras): drive with its parameters, render
    from its cameras and score against its frames (:func:`fastavatar.animate.compare.compare_with_sequence`)."""
    from fastavatar.animate.compare import CompareConfig, compare_with_sequence
    from fastavatar.data.monocular import load_monocular_sequence

    if cfg.animate.mode != "blendshapes" or cfg.subject_dir or cfg.sample_id or cfg.orbit:
        raise ValueError("--flame_params is a tracked sequence: its own cameras are used, so --subject_dir, "
                         "--sample_id, --orbit and --mode mesh do not apply")
    sequence = load_monocular_sequence(cfg.flame_params, max_frames=cfg.max_frames)
    compare = compare_with_sequence(rig.to(torch.float32), sequence, cfg.output_dir, CompareConfig(
        image_scale=cfg.animate.image_scale, background=tuple(cfg.animate.background), render_backend=cfg.animate.render_backend,
        fps=cfg.animate.fps))
    summary = {"num_frames": compare["num_frames"], "video": compare["video"], "compare": compare,
               "driving": str(cfg.flame_params), "binding_mode": rig.binding_mode, "rest_mode": rig.rest_mode,
               "rig_kind": rig.kind}
    atomic_write_json(cfg.output_dir / "summary.json", summary)
    lpips = compare["mean_lpips"]
    print(f"wrote {compare['video']} and {compare['per_frame']} ({compare['num_frames']} frames; mean PSNR "
          f"{compare['mean_psnr']:.2f} dB, SSIM {compare['mean_ssim']:.4f}, LPIPS "
          f"{'n/a' if lpips is None else f'{lpips:.4f}'})")
    return summary


def animate_main(argv: Optional[Sequence[str]] = None, description: str = "") -> int:
    """CLI of ``scripts/animate.py``; errors are one line on stderr (exit code 2)."""
    def run() -> int:
        animate(parse_config(AnimateCommandConfig, argv, description=description))
        return 0

    return run_rig_script(run, ValueError)
