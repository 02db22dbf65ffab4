"""Evaluation of a reconstruction against a subject's calibrated views (3DGS ``metrics.py`` style).

Writes, under ``out_dir``::

    renders/<view>.png   gt/<view>.png   side_by_side/<view>.png
    results.json         mean PSNR/SSIM/LPIPS over the scored views (+ over all views)
    per_view.json        one entry per view, with ``seen`` marking input views

Masks (``fg_masks``) are respected when present, see :mod:`fastavatar.eval.metrics`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from fastavatar.data import SubjectParser
from fastavatar.eval.metrics import image_metrics, mean_metrics
from fastavatar.core.splats import Splats
from fastavatar.io.atomic import atomic_path, atomic_save_image, atomic_write_json


def sh_degree_of(splats: Splats) -> int:
    """The highest SH degree (0..3) the splats' ``shN`` [N, K, 3] holds coefficients for."""
    k = int(splats["shN"].shape[1])
    return max(d for d in range(4) if (d + 1) ** 2 - 1 <= k)


@torch.no_grad()
def render_views(splats: Splats, parser: SubjectParser, views: Sequence[int], sh_degree: int = 3,
                 backend: str = "auto", device="cpu") -> torch.Tensor:
    """[V,H,W,3] renders of ``views`` of ``parser`` on white."""
    from fastavatar.render import render_splats

    splats = {k: v.to(device) for k, v in splats.items()}
    out = []
    for v in views:  # one camera at a time keeps memory flat at full resolution
        out.append(render_splats(splats, parser.c2w[v].to(device), parser.Ks[v].to(device), parser.width,
                                 parser.height, sh_degree=sh_degree, backend=backend).rgb[0].cpu())
    return torch.stack(out)


@torch.no_grad()
def evaluate_reconstruction(
    splats: Splats,
    parser: SubjectParser,
    out_dir: Optional[Path] = None,
    seen_views: Sequence[int] = (),
    lpips_model=None,
    backend: str = "auto",
    device="cpu",
    save_images: bool = True,
) -> Dict[str, object]:
    """Render all views, score them, optionally save images and JSON. Returns the results dict:
    ``{"unseen": means over views not in seen_views, "seen": means over seen views, "all": ...}``."""
    views = list(range(len(parser)))
    bad = [v for v in seen_views if not 0 <= int(v) < len(views)]
    if bad:
        raise ValueError(f"--seen_views {bad}: subject {parser.subject_id} has {len(views)} views (0..{len(views) - 1})")
    renders = render_views(splats, parser, views, sh_degree=sh_degree_of(splats), backend=backend, device=device)
    per_view: List[dict] = []
    for v in views:
        gt = parser.load_image(v)
        mask = parser.load_mask(v)
        row = {"view": parser.image_names[v], "index": v, "seen": v in set(seen_views),
               **image_metrics(renders[v], gt, mask, lpips_model)}
        per_view.append(row)
        if out_dir is not None and save_images:
            name = Path(parser.image_names[v]).stem + ".png"
            atomic_save_image(Path(out_dir) / "renders" / name, renders[v].numpy())
            atomic_save_image(Path(out_dir) / "gt" / name, gt.numpy())
            atomic_save_image(Path(out_dir) / "side_by_side" / name, torch.cat([renders[v], gt], dim=1).numpy())

    def means(rows):
        return mean_metrics([{k: r[k] for k in ("psnr", "ssim", "lpips")} for r in rows]) if rows else {}

    results = {
        "subject_id": parser.subject_id,
        "image_size": [parser.width, parser.height],
        "num_views": len(views),
        "seen_views": [parser.image_names[v] for v in seen_views],
        "unseen": means([r for r in per_view if not r["seen"]]),
        "seen": means([r for r in per_view if r["seen"]]),
        "all": means(per_view),
        "lpips": getattr(lpips_model, "pnet_type", "unknown") if lpips_model is not None else None,  # trunk used
    }
    if out_dir is not None:
        atomic_write_json(Path(out_dir) / "results.json", results)
        atomic_write_json(Path(out_dir) / "per_view.json", per_view)
    results["per_view"] = per_view
    return results


@torch.no_grad()
def save_turntable(splats: Splats, parser: SubjectParser, path: Path, reference_view: int = 8, num_frames: int = 36,
                   backend: str = "auto", device="cpu", fps: int = 12) -> Path:
    """A 360° orbit around the head (at the reference camera's distance) as a GIF or MP4."""
    import imageio.v2 as imageio

    from fastavatar.core.cameras import orbit_cameras
    from fastavatar.render import render_splats

    target = splats["means"].detach().mean(dim=0).cpu()
    poses = orbit_cameras(parser.c2w[reference_view], target, num_frames)
    K = parser.Ks[reference_view]
    dev_splats = {k: v.to(device) for k, v in splats.items()}
    frames = []
    for pose in poses:
        rgb = render_splats(dev_splats, pose.to(device), K.to(device), parser.width, parser.height, backend=backend).rgb[0]
        frames.append((rgb.clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8))
    path = Path(path)
    with atomic_path(path, suffix=path.suffix) as tmp:
        if path.suffix == ".gif":
            imageio.mimsave(tmp, frames, format="GIF", duration=1.0 / fps, loop=0)
        else:
            imageio.mimsave(tmp, frames, fps=fps)
    return path
