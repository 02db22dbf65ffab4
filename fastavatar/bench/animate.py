"""Animation speed (``scripts/benchmark_animate.py``), as JSON.

- ``drive``: blendshapes + LBS per frame (positions, rotations, log-scales; ``drive_sh`` adds the
  SH-band rotation), for analytic and learned rigs (learned = also colour and opacity deltas).
- ``frame``: blend + skin + render one frame, end to end, per backend (our numba and torch
  rasterizers on the CPU; gsplat on CUDA when present), with frames per second next to GaussianBlendshapes' 370 fps
  (paper: its C++/CUDA viewer, animation + rendering, RTX-class GPU; spec §7).
- ``train_step``: seconds per training iteration of learned blendshapes (forward, render, loss,
  backward, Adam step) at ``train_width`` x ``train_height``.

Full-size random rigs stand in for real ones (no FLAME file needed); medians over the timed runs.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from fastavatar import NUM_TEMPLATE_GAUSSIANS
from fastavatar.config import option

PAPER_FPS = 370.0  # GaussianBlendshapes (SIGGRAPH 2024): animation + rendering in its CUDA viewer


@dataclass
class AnimateBenchConfig:
    num_gaussians: int = option(NUM_TEMPLATE_GAUSSIANS, "Gaussians of the rig")
    num_expr: List[int] = option([50, 100], "expression bases timed for driving")
    frames: int = option(100, "driving frames timed per setting")
    render_frames: int = option(5, "end-to-end frames timed per backend")
    width: int = option(550, "render width (the sample camera's)")
    height: int = option(802, "render height")
    train_steps: int = option(5, "training iterations timed per device")
    train_width: int = option(256, "training render width")
    train_height: int = option(256, "training render height")
    threads: int = option(0, "torch CPU threads (0 = torch's default)")
    skip_render: bool = option(False, "time driving only")
    skip_train: bool = option(False, "do not time training iterations")
    output: Optional[str] = option(None, "also write the JSON here")


def _time_ms(fn: Callable, items, warmup: int = 2) -> Dict[str, float]:
    """Median and minimum wall time in ms of ``fn(item)`` over ``items`` (after ``warmup`` untimed calls)."""
    for item in list(items)[:warmup]:
        fn(item)
    times = []
    for item in items:
        t0 = time.perf_counter()
        fn(item)
        times.append(1000.0 * (time.perf_counter() - t0))
    return {"median": statistics.median(times), "min": min(times)}


def _frames(k: int, n: int, device, seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = {"expr": torch.randn(1, k, generator=g), "rotation": torch.randn(1, 3, generator=g) * 0.2,
             "neck_pose": torch.randn(1, 3, generator=g) * 0.1, "jaw_pose": torch.rand(1, 3, generator=g) * 0.2,
             "eyes_pose": torch.randn(1, 6, generator=g) * 0.05, "translation": torch.zeros(1, 3)}
        out.append({key: v.to(device) for key, v in p.items()})
    return out


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _devices() -> List[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _render_backends() -> List[tuple]:
    """(backend, device) pairs timed: our compiled (numba) and torch rasterizers on the CPU, gsplat on CUDA."""
    return [("numba", "cpu"), ("torch", "cpu")] + ([("gsplat", "cuda")] if torch.cuda.is_available() else [])


def bench_drive(cfg: AnimateBenchConfig) -> List[dict]:
    from fastavatar.animate.blendshapes import evaluate_rig, pack_rig
    from fastavatar.animate.rig import random_rig

    rows = []
    for k in cfg.num_expr:
        for kind in ("analytic", "learned"):
            rig = random_rig(cfg.num_gaussians, k, learned=kind == "learned")
            for device in _devices():
                r = pack_rig(rig.to(torch.float32, device=device))  # packed once, driven every frame
                frames = _frames(k, cfg.frames, device)

                def drive(p, sh=False):
                    evaluate_rig(r, p, rotate_colours=sh)
                    _sync(device)

                with torch.no_grad():
                    t = _time_ms(drive, frames)
                    t_sh = _time_ms(lambda p: drive(p, True), frames[: max(10, len(frames) // 5)])
                rows.append({"num_expr": k, "rig": kind, "device": device, "drive_ms": t["median"],
                             "drive_ms_min": t["min"], "drive_sh_ms": t_sh["median"]})
    return rows


def bench_frame(cfg: AnimateBenchConfig) -> List[dict]:
    """Blend + skin + render one frame end to end (a learned rig with K = the first of ``num_expr`` bases)."""
    from fastavatar.animate.blendshapes import evaluate_rig, pack_rig
    from fastavatar.animate.rig import random_rig
    from fastavatar.animate.sequence import default_camera
    from fastavatar.render import render_splats

    k = cfg.num_expr[0]
    rig = random_rig(cfg.num_gaussians, k, learned=True)
    rows = []
    for backend, device in _render_backends():
        r = pack_rig(rig.to(torch.float32, device=device))
        c2w, K, _, _ = default_camera(r.rig.rest["means"].mean(0).cpu(), width=cfg.width, height=cfg.height)
        c2w, K = c2w.to(device), K.to(device)
        frames = _frames(k, cfg.render_frames, device, seed=1)

        def frame(p):
            with torch.no_grad():
                render_splats(evaluate_rig(r, p), c2w, K, cfg.width, cfg.height, backend=backend)
            _sync(device)

        try:
            t = _time_ms(frame, frames, warmup=1)
            rows.append({"backend": backend, "device": device, "num_expr": k, "width": cfg.width, "height": cfg.height,
                         "frame_ms": t["median"], "fps": 1000.0 / t["median"], "paper_fps": PAPER_FPS,
                         "fraction_of_paper_fps": 1000.0 / t["median"] / PAPER_FPS})
        except Exception as exc:  # noqa: BLE001 - reported in the JSON
            rows.append({"backend": backend, "device": device, "error": f"{type(exc).__name__}: {exc}"})
    return rows


def bench_train_step(cfg: AnimateBenchConfig) -> List[dict]:
    """Seconds per learned-blendshape training iteration (the trainer's step, random full-size rig and target)."""
    from fastavatar.animate.learn import BlendshapeModel, BlendshapeModelConfig, photometric_terms
    from fastavatar.animate.rig import random_rig
    from fastavatar.animate.sequence import default_camera
    from fastavatar.render import render_splats

    k = cfg.num_expr[0]
    rows = []
    for backend, device in _render_backends():
        mcfg = BlendshapeModelConfig()
        model = BlendshapeModel(random_rig(cfg.num_gaussians, k).to(torch.float32, device=device), mcfg).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        c2w, K, _, _ = default_camera(model.rest_means.detach().mean(0).cpu(), width=cfg.train_width,
                                      height=cfg.train_height, focal=2048.0 * cfg.train_width / 550)
        c2w, K = c2w.to(device), K.to(device)
        g = torch.Generator().manual_seed(2)
        target = torch.rand(cfg.train_height, cfg.train_width, 3, generator=g).to(device)
        mask = torch.ones(cfg.train_height, cfg.train_width, 1, device=device)
        background = torch.zeros(3, device=device)
        frames = _frames(k, cfg.train_steps, device, seed=3)

        def step(p):
            out = render_splats(model(p), c2w, K, cfg.train_width, cfg.train_height, background=(0.0, 0.0, 0.0),
                                backend=backend)
            terms = photometric_terms(out.rgb[0], out.alpha[0], target, mask, background, mcfg)
            terms.update(model.regularisers())
            opt.zero_grad(set_to_none=True)
            sum(terms.values()).backward()
            opt.step()
            _sync(device)

        try:
            t = _time_ms(step, frames, warmup=1)
            rows.append({"backend": backend, "device": device, "num_expr": k, "width": cfg.train_width,
                         "height": cfg.train_height, "seconds_per_iteration": t["median"] / 1000.0,
                         "hours_for_40k_iterations": t["median"] / 1000.0 * 40000 / 3600})
        except Exception as exc:  # noqa: BLE001 - reported in the JSON
            rows.append({"backend": backend, "device": device, "error": f"{type(exc).__name__}: {exc}"})
    return rows


def run_benchmark(cfg: AnimateBenchConfig) -> dict:
    """All figures of the module docstring as one JSON-serialisable dict."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    result = {
        "num_gaussians": cfg.num_gaussians,
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],  # other processes on the machine distort CPU timings
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "target_drive_ms_cpu": 2.0,
        "paper_fps": PAPER_FPS,
        "drive": bench_drive(cfg),
        "frame": [] if cfg.skip_render else bench_frame(cfg),
        "train_step": [] if cfg.skip_train else bench_train_step(cfg),
    }
    for row in result["drive"]:
        if row["device"] == "cpu":
            row["meets_target_cpu"] = row["drive_ms"] <= result["target_drive_ms_cpu"]
    return result



def benchmark_main(argv=None) -> int:
    """``scripts/benchmark_animate.py``: run, print the JSON, optionally write it."""
    import json

    from fastavatar.config import parse_config
    from fastavatar.io.atomic import atomic_write_json

    cfg = parse_config(AnimateBenchConfig, argv, description="Animation speed: drive, frame, training step (JSON)")
    out = run_benchmark(cfg)
    print(json.dumps(out, indent=2))
    if cfg.output:
        atomic_write_json(cfg.output, out)
    return 0
