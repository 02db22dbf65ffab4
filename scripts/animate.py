#!/usr/bin/env python
"""Animate a reconstructed head with FLAME expressions and poses.

    python scripts/animate.py --splats out/splats.ply --rig out/rig.npz --flame_params seq/ --output_dir anim/

Without --flame_params a built-in demo plays (expression sweep, jaw open, head turn). The camera is
view --camera of a subject folder (--data_root/--sample_id or --subject_dir), an orbit around the head
(--orbit), or a frontal default. Writes animation.mp4 (GIF when imageio-ffmpeg is missing),
summary.json and, with --save_ply, frames/NNNNN.ply.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splats", type=Path, required=True, help="reconstruction PLY")
    ap.add_argument("--rig", type=Path, default=None, help="rig.npz (default: rig.npz beside the PLY)")
    ap.add_argument("--flame_params", type=Path, default=None, help="folder of VHAP flame_param/*.npz (default: demo)")
    ap.add_argument("--max_frames", type=int, default=None, help="use at most this many driving frames")
    ap.add_argument("--demo_on_source", action="store_true", help="play the demo on top of the source frame's pose/expression")
    ap.add_argument("--output_dir", type=Path, required=True)
    ap.add_argument("--mode", choices=("blendshapes", "mesh"), default="blendshapes", help="'mesh' needs --flame_model")
    ap.add_argument("--flame_model", type=Path, default=None, help="FLAME file for --mode mesh")
    ap.add_argument("--data_root", type=Path, default=None, help="folder of subjects (for cameras)")
    ap.add_argument("--sample_id", type=str, default=None)
    ap.add_argument("--subject_dir", type=Path, default=None)
    ap.add_argument("--camera", type=int, default=8, help="camera index in the subject folder (8 = near-frontal)")
    ap.add_argument("--orbit", type=float, default=0.0, help="orbit ±this many degrees over the sequence (0 = fixed camera)")
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--image_scale", type=float, default=1.0, help="render at this fraction of the camera resolution")
    ap.add_argument("--backend", choices=("auto", "gsplat", "torch"), default="auto")
    ap.add_argument("--save_ply", action="store_true", help="also write frames/NNNNN.ply")
    args = ap.parse_args(argv)

    import torch

    from fastavatar.animate import AnimateConfig, DemoConfig, demo_sequence, load_flame_sequence, load_rig, render_sequence
    from fastavatar.animate.sequence import resolve_cameras
    from fastavatar.io.ply import load_ply
    from fastavatar.io.atomic import atomic_write_json

    splats = load_ply(args.splats)
    rig = load_rig(args.rig or args.splats.with_name("rig.npz"), num_gaussians=splats["means"].shape[0])
    if args.flame_params is not None:
        frames = load_flame_sequence(args.flame_params, args.max_frames)
    else:
        frames = demo_sequence(DemoConfig(fps=args.fps, num_expr=rig.num_expr),
                               base=rig.source if args.demo_on_source else None)
        frames = frames[: args.max_frames] if args.max_frames else frames
    model = None
    if args.mode == "mesh":
        from fastavatar.flame import load_flame_model

        model = load_flame_model(args.flame_model)

    subject_dir = args.subject_dir or (args.data_root / args.sample_id if args.data_root and args.sample_id else None)
    c2ws, K, width, height = resolve_cameras(subject_dir, args.camera, rig.rest["means"].mean(0), len(frames), args.orbit)

    cfg = AnimateConfig(mode=args.mode, fps=args.fps, backend=args.backend, save_ply=args.save_ply,
                        image_scale=args.image_scale)
    summary = render_sequence(frames, rig.to(torch.float32), c2ws, K, width, height, args.output_dir, cfg, model=model)
    summary.update({"binding_mode": rig.binding_mode, "rest_mode": rig.rest_mode,
                    "driving": str(args.flame_params) if args.flame_params else "demo"})
    atomic_write_json(args.output_dir / "summary.json", summary)
    print(f"wrote {summary['video']} ({summary['num_frames']} frames; drive {summary['drive_ms_per_frame']:.2f} ms/frame, "
          f"render {summary['render_ms_per_frame']:.1f} ms/frame)")
    return 0


if __name__ == "__main__":
    from fastavatar.animate.rig import run_rig_script

    raise SystemExit(run_rig_script(main, ValueError))
