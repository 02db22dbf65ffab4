"""Driving sequences: per-frame VHAP FLAME parameters.

A frame is a dict with any of ``expr`` [1,E], ``rotation`` [1,3], ``neck_pose`` [1,3],
``jaw_pose`` [1,3], ``eyes_pose`` [1,6], ``translation`` [1,3] (float32 tensors). Identity
(``shape``, ``static_offset``) always comes from the rig, never from the driving frames, so
one subject's expressions can drive another subject's avatar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple, Union

import torch

from fastavatar.config import option
from fastavatar.flame.model import params_from_npz

DRIVING_KEYS = ("expr", "rotation", "neck_pose", "jaw_pose", "eyes_pose", "translation")
Frame = Dict[str, torch.Tensor]


def load_flame_sequence(folder: Union[str, Path], max_frames: Optional[int] = None) -> List[Frame]:
    """All ``*.npz`` in ``folder`` (a VHAP ``flame_param/`` folder), sorted by name.

    A single ``.npz`` file is accepted too (one frame).
    """
    folder = Path(folder)
    if folder.is_file():
        files = [folder]
    elif folder.is_dir():
        files = sorted(folder.glob("*.npz"))
    else:
        raise FileNotFoundError(f"FLAME parameter folder not found: {folder}")
    if not files:
        raise FileNotFoundError(f"no *.npz FLAME parameter files in {folder}")
    if max_frames is not None:
        files = files[:max_frames]
    frames = []
    for path in files:
        params = params_from_npz(path, dtype=torch.float32)
        frames.append({k: v for k, v in params.items() if k in DRIVING_KEYS})
    return frames


@dataclass
class DemoSequenceConfig:
    """The built-in demo: neutral -> expression sweep -> jaw open -> head turn -> neutral."""

    fps: int = 25  # frames per second of the output video
    seconds_per_part: float = 2.0  # length of each part
    num_expr: int = 100  # width of the expression vector written into frames
    sweep_bases: int = 4  # expression bases swept one after another in the first part
    expr_amplitude: float = 2.0  # peak |coefficient| of the sweep
    jaw_open: float = 0.35  # radians at the peak of the jaw part
    head_yaw: float = 0.5  # radians, peak head turn (left then right)
    head_pitch: float = 0.15  # radians, slight nod during the turn


def demo_sequence(cfg: DemoSequenceConfig = DemoSequenceConfig(), base: Optional[Frame] = None) -> List[Frame]:
    """A deterministic demo sequence, optionally on top of ``base`` (e.g. the source frame's pose).

    Parts: (1) sweep each of the first ``sweep_bases`` expression bases through
    ``+A, -A`` (sine), (2) jaw opens and closes, (3) the head turns left, right and back
    (global ``rotation`` about the vertical axis, with a small nod).
    """
    n = max(2, int(round(cfg.fps * cfg.seconds_per_part)))
    base = {k: torch.as_tensor(v, dtype=torch.float32).reshape(1, -1).clone() for k, v in (base or {}).items()
            if k in DRIVING_KEYS}
    zero = {"expr": torch.zeros(1, cfg.num_expr), "rotation": torch.zeros(1, 3), "neck_pose": torch.zeros(1, 3),
            "jaw_pose": torch.zeros(1, 3), "eyes_pose": torch.zeros(1, 6), "translation": torch.zeros(1, 3)}
    for key, value in zero.items():
        if key not in base:
            base[key] = value
        elif key == "expr" and base[key].shape[1] < cfg.num_expr:
            base[key] = torch.cat([base[key], torch.zeros(1, cfg.num_expr - base[key].shape[1])], 1)

    def frame(**changes) -> Frame:
        out = {k: v.clone() for k, v in base.items()}
        for key, delta in changes.items():
            out[key] = out[key] + delta
        return out

    frames: List[Frame] = []
    per_basis = max(2, n // max(cfg.sweep_bases, 1))
    for b in range(min(cfg.sweep_bases, cfg.num_expr)):
        for i in range(per_basis):
            expr = torch.zeros(1, cfg.num_expr)
            expr[0, b] = cfg.expr_amplitude * math.sin(2 * math.pi * i / per_basis)
            frames.append(frame(expr=expr))
    for i in range(n):
        jaw = torch.zeros(1, 3)
        jaw[0, 0] = cfg.jaw_open * math.sin(math.pi * i / (n - 1))
        frames.append(frame(jaw_pose=jaw))
    for i in range(n):
        t = 2 * math.pi * i / (n - 1)
        rot = torch.zeros(1, 3)
        rot[0, 1] = cfg.head_yaw * math.sin(t)
        rot[0, 0] = cfg.head_pitch * math.sin(2 * t)
        frames.append(frame(rotation=rot))
    return frames


# --------------------------------------------------------------------------------------------
# Playing a sequence: drive the rig, render, write a video (and PLYs on request)
# --------------------------------------------------------------------------------------------


@dataclass
class AnimateConfig:
    """How :func:`render_sequence` drives and renders."""

    mode: Literal["blendshapes", "mesh"] = option(
        "blendshapes", "'blendshapes' (rig only) or 'mesh' (exact mesh rigging; needs --flame_model)")
    fps: int = option(25, "output video frame rate")
    render_backend: Literal["auto", "numba", "torch", "gsplat"] = option("auto", "renderer (fastavatar.render)")
    background: Tuple[float, float, float] = option((1.0, 1.0, 1.0), "render background colour")
    save_ply: bool = option(False, "also write frames/NNNNN.ply")
    video_name: str = option("animation", "output file stem (.mp4, or .gif without imageio-ffmpeg)")
    image_scale: float = option(1.0, "render resolution scale (e.g. 0.5 for a faster CPU preview)")


def ffmpeg_available() -> bool:
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return False
    return True


def write_video(frames: List, path: Union[str, Path], fps: int = 25) -> Path:
    """Write HxWx3 uint8 frames to ``path`` (MP4 with imageio-ffmpeg, else a GIF beside it). Atomic."""
    import imageio.v2 as imageio
    import numpy as np

    from fastavatar.io.atomic import atomic_path

    path = Path(path)
    if path.suffix.lower() == ".mp4" and not ffmpeg_available():
        path = path.with_suffix(".gif")
    if path.suffix.lower() == ".mp4":
        with atomic_path(path, suffix=".mp4") as tmp:
            writer = imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", quality=8,
                                        macro_block_size=1, pixelformat="yuv420p")
            for frame in frames:
                arr = np.asarray(frame)
                h, w = arr.shape[0] // 2 * 2, arr.shape[1] // 2 * 2  # yuv420p needs even sizes
                writer.append_data(arr[:h, :w])
            writer.close()
    else:
        with atomic_path(path, suffix=".gif") as tmp:
            imageio.mimsave(tmp, [np.asarray(f) for f in frames], format="GIF", duration=1000.0 / fps, loop=0)
    return path


def default_camera(centre: torch.Tensor, distance: float = 1.0, width: int = 550, height: int = 802,
                   focal: float = 2048.0):
    """A frontal OpenCV camera looking at ``centre`` from +z (FLAME faces +z, y up): (c2w [4,4], K [3,3], w, h)."""
    from fastavatar.core.cameras import look_at_c2w

    centre = centre.to(torch.float32)
    eye = centre + torch.tensor([0.0, 0.0, distance])
    c2w = look_at_c2w(eye, centre, torch.tensor([0.0, 1.0, 0.0]))
    K = torch.tensor([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]])
    return c2w, K, width, height


def resolve_cameras(subject_dir, camera: int, centre: torch.Tensor, num_frames: int, orbit_deg: float = 0.0):
    """Cameras for an animation: view ``camera`` of a subject folder (or a frontal default when
    ``subject_dir`` is None), optionally orbiting ±``orbit_deg`` around ``centre`` over the frames.

    Returns (c2ws [T,4,4] or [4,4], K [3,3], width, height).
    """
    from fastavatar.core.cameras import orbit_cameras

    if subject_dir is not None:
        from fastavatar.data import SubjectParser

        parser = SubjectParser(subject_dir, expected_points=None)
        if not 0 <= camera < len(parser.image_names):
            raise ValueError(f"camera {camera} out of range: {subject_dir} has {len(parser.image_names)} views")
        c2w, K, width, height = parser.c2w[camera], parser.Ks[camera], parser.width, parser.height
    else:
        c2w, K, width, height = default_camera(centre)
    if orbit_deg > 0:
        c2w = orbit_cameras(c2w, centre.float(), num_frames, orbit_deg)
    return c2w, K, width, height


def render_sequence(
    frames: List[Frame],
    rig,
    c2ws: torch.Tensor,  # [T, 4, 4] or [4, 4] camera per frame (or one for all)
    K: torch.Tensor,  # [3, 3]
    width: int,
    height: int,
    output_dir: Union[str, Path],
    cfg: AnimateConfig = AnimateConfig(),
    model=None,  # FlameModel, needed for cfg.mode == "mesh"
) -> Dict[str, object]:
    """Drive ``rig`` with ``frames``, render each from its camera, write the video (+ PLYs).

    Returns a summary dict (paths, number of frames, seconds per frame for driving and rendering).
    """
    import time

    import numpy as np
    from tqdm import tqdm

    from fastavatar.animate.blendshapes import evaluate_rig, mesh_rig_splats, pack_rig
    from fastavatar.core.cameras import scale_intrinsics, scaled_size
    from fastavatar.render import render_splats

    if cfg.mode not in ("blendshapes", "mesh"):
        raise ValueError(f"mode must be 'blendshapes' or 'mesh', got {cfg.mode!r}")
    if cfg.mode == "mesh" and model is None:
        raise ValueError("mode 'mesh' needs the FLAME model (--flame_model)")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if c2ws.dim() == 2:
        c2ws = c2ws[None].expand(len(frames), 4, 4)
    if cfg.image_scale != 1.0:
        K = scale_intrinsics(K, cfg.image_scale)
        width, height = scaled_size(width, height, cfg.image_scale)
    packed = pack_rig(rig) if cfg.mode == "blendshapes" else None
    images, t_drive, t_render = [], 0.0, 0.0
    for i, params in enumerate(tqdm(frames, desc="animate", unit="frame")):
        t0 = time.perf_counter()
        with torch.no_grad():
            splats = evaluate_rig(packed, params) if packed is not None else mesh_rig_splats(model, rig, params)
        t1 = time.perf_counter()
        with torch.no_grad():
            out = render_splats(splats, c2ws[i], K, width, height, background=tuple(cfg.background), backend=cfg.render_backend)
        t_render += time.perf_counter() - t1
        t_drive += t1 - t0
        images.append((out.rgb[0].clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8))
        if cfg.save_ply:
            from fastavatar.io.ply import save_ply

            save_ply(output_dir / "frames" / f"{i:05d}.ply", {k: v.float() for k, v in splats.items()})
    video = write_video(images, output_dir / f"{cfg.video_name}.mp4", fps=cfg.fps)
    n = max(len(frames), 1)
    return {
        "video": str(video),
        "num_frames": len(frames),
        "mode": cfg.mode,
        "drive_ms_per_frame": 1000.0 * t_drive / n,
        "render_ms_per_frame": 1000.0 * t_render / n,
        "width": width,
        "height": height,
        "ply_dir": str(output_dir / "frames") if cfg.save_ply else None,
    }
