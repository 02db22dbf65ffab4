"""Feed-forward single-photo inference ("no guidance"): photo -> 3D Gaussian head in one pass.

Stages (as in the original ``inference_feedforward_no_guidance.py``):
1. face embedding: insightface ``buffalo_l`` detector + ArcFace (:mod:`fastavatar.face`);
2. tracker: DINOv2 on the whole photo squashed to 224x224 -> ``points [10144,3]`` and a
   camera-to-world pose ``[4,4]`` (OpenCV);
3. W encoder: embedding -> ``w [1,512]``;
4. decoder: ``w`` -> per-Gaussian offsets on the template; ``means = points + 0.1 tanh(dmu)``;
5. export: ``splats.ply`` (standard 3DGS), ``w_vector.npy``, ``dino_points.npy``,
   ``dino_camera_pose.npy``, ``summary.json`` and (new) renders in ``images/``.

Intrinsics of the predicted camera (the tracker predicts only a pose): the NeRSemble/VHAP
cameras the tracker was trained on have fx = fy ~ 2048.7 px at 550x802 with the principal
point at the image centre. Because the tracker sees every photo squashed to a square (any
aspect ratio -> 224x224, exactly like its 550x802 training images), a normalised image
position (u/W, v/H) of the input corresponds to (u'/550, v'/802) in a training view. We
therefore scale the NeRSemble intrinsics **per axis** to the render size:
fx = 2048.7 * W/550, fy = 2048.7 * H/802, cx = W/2, cy = H/2 (:func:`predicted_intrinsics`).
For a 550x802 photo this is the NeRSemble camera itself.

Speed: stages 1 and 2 are independent, so the face stage (onnxruntime, which releases the
GIL) runs in a worker thread while the tracker runs (``--overlap_face_and_tracker``, default
on; identical results). ``scripts/benchmark_inference.py`` times every stage.

Differences from the original: models load from any path (no hard-coded
``averaged_model.ply``), the DINO backbone is built offline, ``--no-save_ply`` works, the
largest face is used (not the highest-scoring one), a folder of photos is processed in batch
mode (a failing photo is reported and skipped), and renders are written.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from fastavatar.config import option
from fastavatar.face.embedding import FaceEmbedder, FaceError, FaceModelsMissingError, FaceResult
from fastavatar.face.images import ImageError, LoadedImage, list_images, load_rgb
from fastavatar.splats import Splats
from fastavatar.utils.io import atomic_path, atomic_save_image, atomic_write_json

NERSEMBLE_FOCAL_PX = 2048.7
"""Focal length (pixels) of the NeRSemble/VHAP training cameras at 550x802 (sample data)."""
NERSEMBLE_SIZE = (550, 802)
"""(width, height) of the NeRSemble/VHAP training views."""

WEIGHTS_README = "pretrained_weights/README.md"


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
    render_backend: str = option("auto", "renderer backend: auto, torch (CPU) or gsplat (CUDA)")
    tracker_preprocess: str = option("squash", "tracker input: squash (released weights) or pad (aspect kept)")
    threads: int = option(0, "torch CPU threads (0 = torch default; 1 is faster on a busy CPU)")
    overlap_face_and_tracker: bool = option(True, "run face detection/embedding in a thread while the tracker runs")
    det_size: int = option(640, "face detector input size in pixels (square; the original used 640)")


class MissingFileError(FileNotFoundError):
    """A required checkpoint is not on disk."""


# ----------------------------------------------------------------------------- models
@dataclass
class FeedForwardModels:
    """Everything inference needs, on ``device``, in eval mode."""

    embedder: Any  # FaceEmbedder (or None when only timing the torch stages)
    w_encoder: torch.nn.Module
    decoder: torch.nn.Module
    tracker: torch.nn.Module
    device: torch.device
    notes: Dict[str, str] = field(default_factory=dict)


def require_files(paths: Dict[str, Path]) -> None:
    """One-line ``MissingFileError`` naming every missing checkpoint and where to put it."""
    missing = [f"{name} {path}" for name, path in paths.items() if not Path(path).is_file()]
    if missing:
        raise MissingFileError(
            f"missing checkpoint(s): {', '.join(missing)}; download the FastAvatar weights into "
            f"pretrained_weights/ (see {WEIGHTS_README}) or pass the paths with --encoder_checkpoint, "
            f"--decoder_checkpoint, --dino_checkpoint"
        )


def load_models(
    encoder_checkpoint: Path,
    decoder_checkpoint: Path,
    dino_checkpoint: Path,
    insightface_root: Optional[str] = None,
    device: torch.device = torch.device("cpu"),
    det_size: int = 640,
) -> FeedForwardModels:
    """Load the three checkpoints (released or ours) and the insightface models."""
    from fastavatar.checkpoints import load_decoder, load_tracker, load_w_encoder

    require_files({"encoder": Path(encoder_checkpoint), "decoder": Path(decoder_checkpoint),
                   "dino": Path(dino_checkpoint)})
    embedder = FaceEmbedder(insightface_root, device=str(device), det_size=(det_size, det_size))
    w_encoder = load_w_encoder(encoder_checkpoint, device)
    decoder, _, _ = load_decoder(decoder_checkpoint, device)
    tracker = load_tracker(dino_checkpoint, device)
    return FeedForwardModels(embedder, w_encoder.eval(), decoder.eval(), tracker.eval(), torch.device(device))


# ----------------------------------------------------------------------------- one photo
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
    from fastavatar.models.tracker import preprocess_for_tracker

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


# ----------------------------------------------------------------------------- outputs
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


def versions() -> Dict[str, Optional[str]]:
    from importlib import metadata

    import fastavatar

    out: Dict[str, Optional[str]] = {"python": sys.version.split()[0], "torch": torch.__version__,
                                     "fastavatar": fastavatar.__version__}
    for dist in ("gsplat", "onnxruntime", "onnxruntime-gpu", "insightface", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


@torch.no_grad()
def render_outputs(result: FeedForwardResult, out_dir: Path, cfg: FeedForwardConfig) -> List[str]:
    """Write ``images/predicted_view.png``, ``images/novel_XX.png`` and ``images/input_vs_render.png``."""
    from fastavatar.cameras import orbit_cameras
    from fastavatar.render import render_splats

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
    from fastavatar.ply import save_ply

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


# ----------------------------------------------------------------------------- batch / main
def _output_names(paths: Sequence[Path]) -> List[str]:
    """One folder name per photo: the stem, or stem_ext when two photos share a stem."""
    stems = [p.stem for p in paths]
    return [f"{p.stem}_{p.suffix.lstrip('.').lower()}" if stems.count(p.stem) > 1 else p.stem for p in paths]


def run(cfg: FeedForwardConfig) -> Dict[str, Any]:
    """Single photo -> ``output_dir``; folder -> ``output_dir/<photo stem>/`` each.

    Returns ``{"ok": [...], "failed": [{"image", "error"}]}``. In single mode an unreadable
    photo or missing face raises (the script prints the one-line message).
    """
    from fastavatar.train.common import progress, resolve_device, seed_everything

    if not cfg.image:
        raise ValueError("--image is required (a photo or a folder of photos)")
    source = Path(cfg.image)
    if not source.exists():
        raise ImageError(f"{source}: file not found")
    seed_everything(cfg.seed)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    models = load_models(cfg.encoder_checkpoint, cfg.decoder_checkpoint, cfg.dino_checkpoint,
                         cfg.insightface_root, device, cfg.det_size)
    output_dir = Path(cfg.output_dir)
    if source.is_file():
        result = run_photo(models, source, cfg.tracker_preprocess, cfg.overlap_face_and_tracker)
        summary = write_outputs(result, output_dir, cfg)
        return {"ok": [{"image": str(source), "output_dir": str(output_dir), "summary": summary}], "failed": []}

    photos = list_images(source)
    if not photos:
        raise ImageError(f"{source}: folder contains no images ({', '.join(('.jpg', '.png', '...'))})")
    ok, failed = [], []
    for photo, name in progress(list(zip(photos, _output_names(photos))), desc="photos", unit="photo"):
        try:
            result = run_photo(models, photo, cfg.tracker_preprocess, cfg.overlap_face_and_tracker)
            summary = write_outputs(result, output_dir / name, cfg)
            ok.append({"image": str(photo), "output_dir": str(output_dir / name), "summary": summary})
        except (ImageError, FaceError) as exc:
            print(f"[fastavatar] skipped: {exc}", file=sys.stderr)
            failed.append({"image": str(photo), "error": str(exc)})
        except Exception as exc:  # one bad photo must not stop a long batch; report it
            message = f"{photo}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"[fastavatar] skipped: {message}", file=sys.stderr)
            failed.append({"image": str(photo), "error": message})
    batch = {"ok": [{"image": o["image"], "output_dir": o["output_dir"]} for o in ok], "failed": failed}
    atomic_write_json(output_dir / "batch_summary.json", batch)
    return {"ok": ok, "failed": failed}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point (``scripts/inference_feedforward_no_guidance.py``); returns the exit code."""
    from fastavatar.config import parse_config

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = parse_config(FeedForwardConfig, argv, description="FastAvatar feed-forward inference: photo -> 3DGS head")
    try:
        out = run(cfg)
    except (ImageError, FaceError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for item in out["ok"]:
        timings = item["summary"]["timings_s"]
        total = sum(v for k, v in timings.items() if k != "render")
        print(f"{item['image']} -> {item['output_dir']} ({item['summary']['num_gaussians']} Gaussians, "
              f"{total:.3f} s without rendering)")
    if out["failed"]:
        print(f"{len(out['failed'])} photo(s) failed, see {Path(cfg.output_dir) / 'batch_summary.json'}",
              file=sys.stderr)
    return 0 if out["ok"] else 1


# ----------------------------------------------------------------------------- benchmark
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
    from fastavatar import NUM_TEMPLATE_GAUSSIANS
    from fastavatar.models.decoder import GaussianDecoder
    from fastavatar.models.tracker import DinoTracker, TrackerConfig
    from fastavatar.models.w_encoder import WEncoder

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
    from fastavatar.checkpoints import load_decoder, load_tracker, load_w_encoder
    from fastavatar.ply import save_ply
    from fastavatar.train.common import resolve_device

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
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

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
    from fastavatar.config import parse_config

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = parse_config(BenchmarkConfig, argv, description="Time feed-forward inference per stage (JSON)")
    out = benchmark(cfg)
    text = json.dumps(out, indent=2)
    print(text)
    if cfg.output:
        atomic_write_json(cfg.output, out)
    return 0
