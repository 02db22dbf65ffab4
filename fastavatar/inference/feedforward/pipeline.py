"""One photo through the feed-forward stages: face embedding and tracker (overlapped), W encoder,
decoder. No file is written here (see :mod:`fastavatar.inference.feedforward.outputs`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from fastavatar.core.splats import Splats
from fastavatar.face.embedding import FaceResult
from fastavatar.face.images import LoadedImage, load_rgb
from fastavatar.face.tracker_input import preprocess_for_tracker
from fastavatar.inference.feedforward.loading import FeedForwardModels


@dataclass
class FeedForwardResult:
    image: LoadedImage  # the photo (8-bit RGB, EXIF-oriented, maybe downscaled)
    face: FaceResult  # chosen face + raw ArcFace embedding
    w: torch.Tensor  # [1, 512]
    points: torch.Tensor  # [N, 3] tracker points (world)
    camera_pose: torch.Tensor  # [1, 4, 4] tracker c2w (OpenCV)
    splats: Splats  # raw splats, means = points + delta
    timings: Dict[str, float]  # seconds per stage


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run_tracker(models: FeedForwardModels, rgb: np.ndarray, tracker_preprocess: str = "squash",
                timings: Optional[Dict[str, float]] = None) -> tuple:
    """rgb [H,W,3] uint8 photo -> (points [N,3], camera_pose [1,4,4] c2w)."""
    timings = {} if timings is None else timings
    t = time.perf_counter()
    image = preprocess_for_tracker(rgb, mode=tracker_preprocess)[None].to(models.device)
    pred = models.tracker(image)
    _sync(models.device)
    timings["tracker"] = time.perf_counter() - t
    return pred["points"][0], pred["camera_pose"]


@torch.no_grad()
def encode_and_decode(models: FeedForwardModels, embedding: np.ndarray, points: torch.Tensor,
                      timings: Optional[Dict[str, float]] = None) -> tuple:
    """embedding [512] raw ArcFace + points [N,3] -> (w [1,512], raw splats with means = points + delta)."""
    timings = {} if timings is None else timings
    device = models.device
    t = time.perf_counter()
    emb = torch.as_tensor(np.asarray(embedding, dtype=np.float32), device=device)[None]
    w = models.w_encoder(emb)
    _sync(device)
    timings["encoder"] = time.perf_counter() - t
    t = time.perf_counter()
    splats = models.decoder.decode(w, points)[0]
    _sync(device)
    timings["decoder"] = time.perf_counter() - t
    return w, splats


def predict_from_embedding(
    models: FeedForwardModels, embedding: np.ndarray, rgb: np.ndarray, tracker_preprocess: str = "squash",
    timings: Optional[Dict[str, float]] = None,
) -> tuple:
    """Torch stages only: (w [1,512], points [N,3], camera_pose [1,4,4], splats)."""
    timings = {} if timings is None else timings
    points, pose = run_tracker(models, rgb, tracker_preprocess, timings)
    w, splats = encode_and_decode(models, embedding, points, timings)
    return w, points, pose, splats


def _timed_embedding(models: FeedForwardModels, image: LoadedImage) -> tuple:
    t = time.perf_counter()
    face = models.embedder.embed_loaded(image)
    return face, time.perf_counter() - t


def run_photo(models: FeedForwardModels, image_path: Path, tracker_preprocess: str = "squash",
              overlap: bool = True) -> FeedForwardResult:
    """Photo file -> prediction. Raises ``ImageError`` / ``FaceError`` (one line each).

    With ``overlap`` the face stage (onnxruntime, releases the GIL) runs in a worker thread while
    the tracker (torch) runs, since neither needs the other's output; the results are identical.
    """
    timings: Dict[str, float] = {}
    t = time.perf_counter()
    image = load_rgb(image_path)
    timings["load_image"] = time.perf_counter() - t
    t = time.perf_counter()
    if overlap:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(_timed_embedding, models, image)
            try:
                points, pose = run_tracker(models, image.rgb, tracker_preprocess, timings)
            finally:
                face, timings["face_embedding"] = future.result()
    else:
        face, timings["face_embedding"] = _timed_embedding(models, image)
        points, pose = run_tracker(models, image.rgb, tracker_preprocess, timings)
    timings["face_and_tracker_wall"] = time.perf_counter() - t
    w, splats = encode_and_decode(models, face.embedding, points, timings)
    return FeedForwardResult(image, face, w, points, pose, splats, timings)
