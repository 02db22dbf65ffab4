"""Feed-forward inference timed per stage (``scripts/benchmark_inference.py``), as JSON.

Random weights at full size stand in when the checkpoints are absent (the JSON says so).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from fastavatar import NUM_TEMPLATE_GAUSSIANS
from fastavatar.config import option, parse_config
from fastavatar.face.embedding import FaceEmbedder, FaceModelsMissingError
from fastavatar.face.images import load_rgb
from fastavatar.inference.feedforward.loading import FeedForwardModels
from fastavatar.inference.feedforward.pipeline import encode_and_decode, predict_from_embedding, run_tracker
from fastavatar.io.atomic import atomic_write_json
from fastavatar.io.checkpoints import load_decoder, load_tracker, load_w_encoder
from fastavatar.io.ply import save_ply
from fastavatar.models.decoder import GaussianDecoder
from fastavatar.models.tracker import DinoTracker, TrackerConfig
from fastavatar.models.w_encoder import WEncoder
from fastavatar.runtime import resolve_device, versions


@dataclass
class BenchmarkConfig:
    image: str = option("", "photo to time (default: the insightface sample t1.jpg)")
    encoder_checkpoint: Path = option(Path("pretrained_weights/encoder_neutral_flame.pth"), "W-encoder checkpoint")
    decoder_checkpoint: Path = option(Path("pretrained_weights/decoder_neutral_flame.pth"), "decoder checkpoint")
    dino_checkpoint: Path = option(Path("pretrained_weights/dino_encoder.pth"), "tracker checkpoint")
    insightface_root: Optional[str] = option(None, "buffalo_l folder (det_10g.onnx, w600k_r50.onnx)")
    device: str = option("auto", "torch device: auto, cpu, cuda")
    repeats: int = option(10, "timed repetitions (median reported)")
    warmup: int = option(2, "untimed warm-up repetitions")
    threads: int = option(0, "torch CPU threads (0 = leave as is)")
    output: Optional[str] = option(None, "also write the JSON here")


def _random_models(device: torch.device) -> FeedForwardModels:
    """Full-size models with random weights (ViT-B/14 tracker, 10144-Gaussian decoder)."""
    g = torch.Generator().manual_seed(0)
    n = NUM_TEMPLATE_GAUSSIANS
    template = {
        "means": torch.randn(n, 3, generator=g) * 0.05,
        "quats": torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1),
        "scales": torch.full((n, 3), math.log(0.003)),
        "opacities": torch.full((n,), 2.0),
        "sh0": torch.rand(n, 1, 3, generator=g),
        "shN": torch.zeros(n, 15, 3),
    }
    decoder = GaussianDecoder(template)
    tracker = DinoTracker(TrackerConfig(dropout=0.0))
    return FeedForwardModels(None, WEncoder().eval().to(device), decoder.eval().to(device),
                             tracker.eval().to(device), device)


def _median(values: List[float]) -> float:
    return float(np.median(np.asarray(values))) if values else float("nan")


def benchmark(cfg: BenchmarkConfig) -> Dict[str, Any]:
    """Median seconds per stage and end to end; random weights when checkpoints are absent."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    notes: List[str] = []
    paths = {"encoder": cfg.encoder_checkpoint, "decoder": cfg.decoder_checkpoint, "dino": cfg.dino_checkpoint}
    if all(Path(p).is_file() for p in paths.values()):
        models = FeedForwardModels(None, load_w_encoder(cfg.encoder_checkpoint, device),
                                   load_decoder(cfg.decoder_checkpoint, device)[0],
                                   load_tracker(cfg.dino_checkpoint, device), device)
        weights = "checkpoints"
    else:
        absent = [f"{k} ({p})" for k, p in paths.items() if not Path(p).is_file()]
        notes.append(f"random weights: checkpoint(s) absent: {', '.join(absent)}; same architectures and sizes")
        models = _random_models(device)
        weights = "random"
    embedder = None
    try:
        embedder = FaceEmbedder(cfg.insightface_root, device=str(device))
    except FaceModelsMissingError as exc:
        notes.append(f"face stage not timed: {exc}")
    if cfg.image:
        photo_path = Path(cfg.image)
    else:
        import insightface

        photo_path = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    photo = load_rgb(photo_path)
    embedding = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    stage_times: Dict[str, List[float]] = {k: [] for k in ("face_embedding", "tracker", "encoder", "decoder",
                                                           "export", "torch_stages", "end_to_end",
                                                           "end_to_end_overlapped")}
    def export(splats, tmp) -> float:
        t = time.perf_counter()
        save_ply(Path(tmp) / "splats.ply", {k: v.detach().float().cpu() for k, v in splats.items()})
        return time.perf_counter() - t

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=1) as pool:
        for i in range(cfg.warmup + cfg.repeats):
            # Sequential: every stage timed on its own.
            timings: Dict[str, float] = {}
            t0 = time.perf_counter()
            if embedder is not None:
                t = time.perf_counter()
                embedding = embedder.embed_loaded(photo).embedding
                timings["face_embedding"] = time.perf_counter() - t
            _, _, _, splats = predict_from_embedding(models, embedding, photo.rgb, "squash", timings)
            timings["export"] = export(splats, tmp)
            timings["end_to_end"] = time.perf_counter() - t0
            timings["torch_stages"] = timings["tracker"] + timings["encoder"] + timings["decoder"]
            # Overlapped (what the CLI does): face stage in a thread while the tracker runs.
            if embedder is not None:
                t0 = time.perf_counter()
                future = pool.submit(embedder.embed_loaded, photo)
                points, _ = run_tracker(models, photo.rgb, "squash")
                _, splats = encode_and_decode(models, future.result().embedding, points)
                export(splats, tmp)
                timings["end_to_end_overlapped"] = time.perf_counter() - t0
            if i >= cfg.warmup:
                for k, v in timings.items():
                    stage_times[k].append(v)
    medians = {k: (_median(v) if v else None) for k, v in stage_times.items()}
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    if embedder is None:
        notes.append("end_to_end excludes face detection + embedding (models absent)")
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": {"before": load_before[0] if load_before else None,
                              "after": load_after[0] if load_after else None},
        "weights": weights,
        "image": str(photo_path),
        "image_size": list(photo.original_size),
        "repeats": cfg.repeats,
        "warmup": cfg.warmup,
        "median_s": medians,
        "targets_s": {"end_to_end_cpu": 0.6, "tracker_encoder_decoder_gpu": 0.010},
        "notes": notes,
        "versions": versions(),
    }


def benchmark_main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = parse_config(BenchmarkConfig, argv, description="Time feed-forward inference per stage (JSON)")
    out = benchmark(cfg)
    text = json.dumps(out, indent=2)
    print(text)
    if cfg.output:
        atomic_write_json(cfg.output, out)
    return 0
