"""Drive a rig with a tracked sequence and compare with its frames (like GaussianBlendshapes' ``test.py``).

For every frame of a tracked monocular sequence (:mod:`fastavatar.data.monocular`) the rig is
driven with that frame's FLAME parameters and rendered from that frame's camera. Ground truth is
the frame composited with its mask onto the render background (the INSTA / GaussianBlendshapes
protocol: whole-image metrics of the masked head). Written to ``output_dir``:

- ``side_by_side.mp4`` (GIF without imageio-ffmpeg): ground truth | render, per frame;
- ``per_frame.json``: ``[{frame, psnr, ssim, lpips}]`` (lpips null when the AlexNet trunk is absent);
- the returned summary holds the means.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch


def is_tracked_sequence(path: Union[str, Path]) -> bool:
    """True for a tracked monocular sequence folder (INSTA ``checkpoint/`` or VHAP ``transforms.json``),
    as opposed to a bare folder of VHAP ``flame_param/*.npz``."""
    path = Path(path)
    return path.is_dir() and ((path / "checkpoint").is_dir() or (path / "transforms.json").is_file())


@dataclass
class CompareConfig:
    """How :func:`compare_with_sequence` renders and scores."""

    image_scale: float = 1.0  # render and score at this fraction of the frame resolution
    background: Tuple[float, float, float] = (1.0, 1.0, 1.0)  # render background; ground truth composited onto it
    render_backend: str = "auto"  # renderer backend (fastavatar.render)
    fps: int = 25  # side-by-side video frame rate
    lpips: bool = True  # score LPIPS (AlexNet) when its trunk is in the torch-hub cache
    video_name: str = "side_by_side"  # output video stem


def compare_with_sequence(rig, sequence, output_dir: Union[str, Path], cfg: CompareConfig = CompareConfig(),
                          frames: Optional[List[int]] = None) -> Dict[str, object]:
    """Render ``rig`` on ``sequence``'s frames (all, or the indices ``frames``) and score them (see module doc)."""
    import numpy as np

    from fastavatar.animate.blendshapes import evaluate_rig, pack_rig
    from fastavatar.animate.sequence import write_video
    from fastavatar.eval.metrics import image_metrics, mean_metrics
    from fastavatar.io.atomic import atomic_write_json
    from fastavatar.losses import load_lpips
    from fastavatar.render import render_splats
    from fastavatar.runtime import progress

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = rig.rest["means"].device
    packed = pack_rig(rig)
    lpips_model = load_lpips("alex", device=device) if cfg.lpips else None
    background = torch.tensor(cfg.background, dtype=torch.float32)
    rows, video = [], []
    for i in progress(frames if frames is not None else range(len(sequence)), desc="compare", unit="frame"):
        frame = sequence.frames[i]
        c2w, K, width, height = sequence.camera(i, cfg.image_scale)
        with torch.no_grad():
            splats = evaluate_rig(packed, {k: v.to(device) for k, v in frame.params.items()})
            pred = render_splats(splats, c2w.to(device), K.to(device), width, height, background=cfg.background,
                                 backend=cfg.render_backend).rgb[0].float().cpu().clamp(0, 1)
        rgb, mask = sequence.load(i, cfg.image_scale)
        gt = rgb * mask + background * (1 - mask)
        row = {"frame": frame.name, **image_metrics(pred, gt, lpips_model=lpips_model)}
        rows.append(row)
        video.append((torch.cat([gt, pred], dim=1).numpy() * 255 + 0.5).astype(np.uint8))
    path = write_video(video, output_dir / f"{cfg.video_name}.mp4", fps=cfg.fps)
    atomic_write_json(output_dir / "per_frame.json", rows)
    return {"video": str(path), "per_frame": str(output_dir / "per_frame.json"), "num_frames": len(rows),
            **{f"mean_{k}": v for k, v in mean_metrics([{k: r[k] for k in ("psnr", "ssim", "lpips")} for r in rows]).items()}}
