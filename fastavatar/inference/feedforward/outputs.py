"""Files written for one photo: ``splats.ply``, ``w_vector.npy``, ``dino_points.npy``,
``dino_camera_pose.npy``, ``summary.json`` and renders in ``images/``.

Intrinsics of the predicted camera (the tracker predicts only a pose): the NeRSemble/VHAP
cameras the tracker was trained on have fx = fy ~ 2048.7 px at 550x802 with the principal
point at the image centre. Because the tracker sees every photo squashed to a square (any
aspect ratio -> 224x224, exactly like its 550x802 training images), a normalised image
position (u/W, v/H) of the input corresponds to (u'/550, v'/802) in a training view. We
therefore scale the NeRSemble intrinsics **per axis** to the render size:
fx = 2048.7 * W/550, fy = 2048.7 * H/802, cx = W/2, cy = H/2 (:func:`predicted_intrinsics`).
For a 550x802 photo this is the NeRSemble camera itself.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from fastavatar.core.cameras import orbit_cameras
from fastavatar.core.splats import Splats
from fastavatar.inference.feedforward.config import FeedForwardConfig
from fastavatar.inference.feedforward.pipeline import FeedForwardResult
from fastavatar.io.atomic import atomic_path, atomic_save_image, atomic_write_json
from fastavatar.io.ply import save_ply
from fastavatar.render import render_splats
from fastavatar.runtime import versions

NERSEMBLE_FOCAL_PX = 2048.7
"""Focal length (pixels) of the NeRSemble/VHAP training cameras at 550x802 (sample data)."""
NERSEMBLE_SIZE = (550, 802)
"""(width, height) of the NeRSemble/VHAP training views."""


def splat_statistics(splats: Splats) -> Dict[str, float]:
    """The original's summary statistics: std of all mean coordinates, mean of exp(scales),
    mean of sigmoid(opacities)."""
    return {
        "means_std": float(splats["means"].float().std()),
        "scales_mean": float(torch.exp(splats["scales"].float()).mean()),
        "opacities_mean": float(torch.sigmoid(splats["opacities"].float()).mean()),
    }


def predicted_intrinsics(width: int, height: int) -> torch.Tensor:
    """K [3,3] for a render of ``width`` x ``height`` from the predicted pose (see module doc)."""
    return torch.tensor(
        [
            [NERSEMBLE_FOCAL_PX * width / NERSEMBLE_SIZE[0], 0.0, width / 2.0],
            [0.0, NERSEMBLE_FOCAL_PX * height / NERSEMBLE_SIZE[1], height / 2.0],
            [0.0, 0.0, 1.0],
        ],
        dtype=torch.float32,
    )


def render_size(width: int, height: int, max_side: int) -> tuple:
    """(w, h) with the photo's aspect and the longer side ``max_side``."""
    scale = max_side / float(max(width, height))
    return max(8, int(round(width * scale))), max(8, int(round(height * scale)))


@torch.no_grad()
def render_outputs(result: FeedForwardResult, out_dir: Path, cfg: FeedForwardConfig) -> List[str]:
    """Write ``images/predicted_view.png``, ``images/novel_XX.png`` and ``images/input_vs_render.png``."""
    images = out_dir / "images"
    photo = result.image.rgb
    width, height = render_size(photo.shape[1], photo.shape[0], cfg.render_max_side)
    K = predicted_intrinsics(width, height).to(result.points.device)
    c2w = result.camera_pose[0].float()
    splats = {k: v.float() for k, v in result.splats.items()}
    written = []
    main = render_splats(splats, c2w, K, width, height, backend=cfg.render_backend).rgb[0].clamp(0, 1).cpu()
    atomic_save_image(images / "predicted_view.png", main.numpy())
    written.append("images/predicted_view.png")

    from PIL import Image

    resized = np.asarray(Image.fromarray(photo).resize((width, height), Image.Resampling.BILINEAR))
    pair = np.concatenate([resized, (main.numpy() * 255.0 + 0.5).astype(np.uint8)], axis=1)
    atomic_save_image(images / "input_vs_render.png", pair)
    written.append("images/input_vs_render.png")

    if cfg.num_novel_views > 0:
        target = result.points.float().mean(dim=0).cpu()
        ring = orbit_cameras(c2w.cpu(), target, cfg.num_novel_views, cfg.novel_view_max_azimuth)
        for i in range(ring.shape[0]):
            rgb = render_splats(splats, ring[i].to(c2w), K, width, height, backend=cfg.render_backend).rgb[0]
            name = f"images/novel_{i:02d}.png"
            atomic_save_image(out_dir / name, rgb.clamp(0, 1).cpu().numpy())
            written.append(name)
    return written


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)


def write_outputs(result: FeedForwardResult, out_dir: Path, cfg: FeedForwardConfig) -> Dict[str, Any]:
    """Write every output file of one photo into ``out_dir``; returns the summary dict."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = dict(result.timings)
    t = time.perf_counter()
    splats_cpu = {k: v.detach().float().cpu() for k, v in result.splats.items()}
    _save_npy(out_dir / "w_vector.npy", result.w.detach().float().cpu().numpy().reshape(1, -1))  # [1, 512]
    _save_npy(out_dir / "dino_points.npy", result.points.detach().float().cpu().numpy())  # [N, 3]
    _save_npy(out_dir / "dino_camera_pose.npy",
              result.camera_pose.detach().float().cpu().numpy().reshape(1, 4, 4))  # [1, 4, 4] c2w
    rows = save_ply(out_dir / "splats.ply", splats_cpu) if cfg.save_ply else None
    timings["export"] = time.perf_counter() - t
    rendered: List[str] = []
    if cfg.render:
        t = time.perf_counter()
        rendered = render_outputs(result, out_dir, cfg)
        timings["render"] = time.perf_counter() - t
    width, height = result.image.original_size
    summary = {
        "image_path": str(result.image.path),
        "w_vector_shape": list(result.w.reshape(1, -1).shape),
        "dino_points_shape": list(result.points.shape),
        "num_gaussians": int(splats_cpu["means"].shape[0]),
        "ply_rows_written": rows,
        "splat_statistics": splat_statistics(splats_cpu),
        "face": {
            "bbox": [float(v) for v in result.face.bbox],
            "det_score": float(result.face.det_score),
            "num_faces": int(result.face.num_faces),
            "selection": "largest",
            "embedding_norm": float(np.linalg.norm(result.face.embedding)),
        },
        "camera": {
            "c2w": result.camera_pose[0].detach().cpu().tolist(),
            "intrinsics_for_input_size": predicted_intrinsics(width, height).tolist(),
            "intrinsics_note": "NeRSemble focal 2048.7 px at 550x802 scaled per axis to the image size",
        },
        "images": rendered,
        "timings_s": {k: round(v, 6) for k, v in timings.items()},
        "versions": versions(),
    }
    atomic_write_json(out_dir / "summary.json", summary)
    return summary
