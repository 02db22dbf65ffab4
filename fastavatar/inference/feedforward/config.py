"""Options of feed-forward single-photo inference (``scripts/inference_feedforward_no_guidance.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from fastavatar.config import option


@dataclass
class FeedForwardConfig:
    image: str = option("", "input photo, or a folder of photos (batch mode: one output folder per photo)")
    encoder_checkpoint: Path = option(Path("pretrained_weights/encoder_neutral_flame.pth"), "W-encoder checkpoint")
    decoder_checkpoint: Path = option(Path("pretrained_weights/decoder_neutral_flame.pth"), "decoder checkpoint")
    dino_checkpoint: Path = option(Path("pretrained_weights/dino_encoder.pth"), "DINO point/pose tracker checkpoint")
    output_dir: Path = option(Path("results"), "output folder")
    device: str = option("auto", "torch device: auto, cpu, cuda, cuda:1 (cuda falls back to cpu when absent)")
    seed: int = option(42, "random seed")
    save_ply: bool = option(True, "write splats.ply (standard 3DGS PLY)")
    insightface_root: Optional[str] = option(
        None, "folder with det_10g.onnx + w600k_r50.onnx (default: pretrained_weights/insightface/buffalo_l, "
              "then ~/.insightface/models/buffalo_l)")
    render: bool = option(True, "write renders to images/ (predicted view, novel-view ring, input beside render)")
    num_novel_views: int = option(8, "views in the novel-view ring")
    novel_view_max_azimuth: float = option(180.0, "ring half-angle in degrees (180 = full circle)")
    render_max_side: int = option(802, "longer side of the renders in pixels (aspect of the input photo)")
    render_backend: Literal["auto", "numba", "torch", "gsplat"] = option("auto", "renderer backend: auto, numba or torch (CPU), gsplat (CUDA)")
    tracker_preprocess: Literal["squash", "pad"] = option("squash", "tracker input: squash (released weights) or pad (aspect kept)")
    threads: int = option(0, "torch CPU threads (0 = torch default; 1 is faster on a busy CPU)")
    overlap_face_and_tracker: bool = option(True, "run face detection/embedding in a thread while the tracker runs")
    det_size: int = option(640, "face detector input size in pixels (square; the original used 640)")

    def check(self) -> None:
        """One-line ValueError naming the flag of the first out-of-range value (run by the parser)."""
        import math

        for name, low in (("render_max_side", 16), ("det_size", 32), ("num_novel_views", 0), ("threads", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name} must be >= {low}, got {getattr(self, name)}")
        if not math.isfinite(self.novel_view_max_azimuth) or not 0 <= self.novel_view_max_azimuth <= 180:
            raise ValueError(f"--novel_view_max_azimuth must be in [0, 180], got {self.novel_view_max_azimuth}")
