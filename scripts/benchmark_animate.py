#!/usr/bin/env python
"""Benchmark animation: blendshape evaluation + skinning per frame, and rendering. Prints JSON.

    python scripts/benchmark_animate.py [--num_gaussians 10144] [--num_expr 50 100] [--output bench.json]

Uses a random full-size rig (no FLAME file needed). Timings are medians over --frames frames of a
random driving sequence. "drive" = blendshapes + LBS (positions, rotations, log-scales);
"drive_sh" additionally rotates SH bands 1..3 per Gaussian. Render = fastavatar.render at the sample
camera resolution, torch backend on CPU, and gsplat when a GPU is present.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _time_ms(fn, frames, warmup: int = 3) -> dict:
    """Median and minimum wall time in ms of ``fn`` over ``frames`` (the min is the least disturbed run)."""
    for params in frames[:warmup]:
        fn(params)
    times = []
    for params in frames:
        t0 = time.perf_counter()
        fn(params)
        times.append(1000.0 * (time.perf_counter() - t0))
    return {"median": statistics.median(times), "min": min(times)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num_gaussians", type=int, default=10144)
    ap.add_argument("--num_expr", type=int, nargs="+", default=[50, 100])
    ap.add_argument("--frames", type=int, default=100, help="driving frames timed per setting")
    ap.add_argument("--render_frames", type=int, default=3, help="frames rendered per backend")
    ap.add_argument("--width", type=int, default=550)
    ap.add_argument("--height", type=int, default=802)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--skip_render", action="store_true")
    ap.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    import torch

    from fastavatar.animate.blendshapes import evaluate_rig
    from fastavatar.animate.rig import random_rig
    from fastavatar.animate.sequence import default_camera

    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    result = {
        "num_gaussians": args.num_gaussians,
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],  # other processes on the machine distort CPU timings
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "target_drive_ms_cpu": 2.0,
        "drive": [],
        "render": [],
    }
    rig = None
    for k in args.num_expr:
        rig = random_rig(args.num_gaussians, k)
        frames = [{"expr": torch.randn(1, k, generator=g), "rotation": torch.randn(1, 3, generator=g) * 0.2,
                   "neck_pose": torch.randn(1, 3, generator=g) * 0.1, "jaw_pose": torch.rand(1, 3, generator=g) * 0.2,
                   "eyes_pose": torch.randn(1, 6, generator=g) * 0.05, "translation": torch.zeros(1, 3)}
                  for _ in range(args.frames)]
        with torch.no_grad():
            drive = _time_ms(lambda p: evaluate_rig(rig, p, rotate_colours=False), frames)
            drive_sh = _time_ms(lambda p: evaluate_rig(rig, p, rotate_colours=True), frames[: max(10, len(frames) // 5)])
            entry = {
                "num_expr": k,
                "device": "cpu",
                "drive_ms": drive["median"],
                "drive_ms_min": drive["min"],
                "drive_sh_ms": drive_sh["median"],
            }
            if torch.cuda.is_available():
                rig_gpu = rig.to(torch.float32, device="cuda")
                frames_gpu = [{key: v.cuda() for key, v in p.items()} for p in frames]

                def run(p):
                    evaluate_rig(rig_gpu, p, rotate_colours=False)
                    torch.cuda.synchronize()

                entry["drive_ms_cuda"] = _time_ms(run, frames_gpu)["median"]
        entry["meets_target_cpu"] = entry["drive_ms"] <= result["target_drive_ms_cpu"]
        result["drive"].append(entry)
        print(json.dumps(entry), file=sys.stderr)

    if not args.skip_render and rig is not None:
        from fastavatar.render import render_splats

        splats = evaluate_rig(rig, {})
        c2w, K, _, _ = default_camera(splats["means"].mean(0), width=args.width, height=args.height)
        backends = [("torch", "cpu")] + ([("gsplat", "cuda")] if torch.cuda.is_available() else [])
        for backend, device in backends:
            sp = {key: v.to(device) for key, v in splats.items()}
            c, kk = c2w.to(device), K.to(device)

            def render(_):
                with torch.no_grad():
                    render_splats(sp, c, kk, args.width, args.height, backend=backend)
                if device == "cuda":
                    torch.cuda.synchronize()

            try:
                ms = _time_ms(render, list(range(args.render_frames)), warmup=1)["median"]
                result["render"].append({"backend": backend, "device": device, "width": args.width,
                                         "height": args.height, "render_ms": ms})
            except Exception as exc:  # noqa: BLE001 - reported in the JSON
                result["render"].append({"backend": backend, "device": device, "error": f"{type(exc).__name__}: {exc}"})
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        from fastavatar.io.atomic import atomic_write_json

        atomic_write_json(args.output, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
