"""Benchmark the torch rasterizer (and gsplat on CUDA) against the dense reference; prints JSON.

Scene: subject 306's points3D as isotropic Gaussians (scale = mean distance to the 3 nearest
neighbours), opacity logit 2, small random SH of degree 3, the camera of image 00000_08.png at
``--scale`` (1/2 by default: 275 x 401).

    python scripts/benchmark_render.py [--device cpu] [--repeats 5] [--scale 0.5] [--skip_dense]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastavatar.core.cameras import c2w_to_w2c  # noqa: E402
from fastavatar.render import rasterize  # noqa: E402
from fastavatar.core.splats import activate  # noqa: E402


def load_scene(subject_dir: Path, image_name: str, scale: float):
    """(points [N,3], c2w [4,4], K [3,3], width, height) of one view of a subject."""
    try:
        from fastavatar.data import SubjectParser

        parser = SubjectParser(str(subject_dir), image_scale=scale)
        i = parser.image_names.index(image_name)
        return parser.points.float(), parser.c2w[i].float(), parser.Ks[i].float(), parser.width, parser.height
    except (ImportError, AttributeError):
        pass
    import pycolmap

    rec = pycolmap.Reconstruction(str(subject_dir / "sparse" / "0"))
    import numpy as np

    points = torch.from_numpy(np.stack([p.xyz for _, p in sorted(rec.points3D.items())])).float()
    image = next(im for im in rec.images.values() if im.name == image_name)
    cam = rec.cameras[image.camera_id]
    w2c = torch.eye(4)
    w2c[:3, :] = torch.tensor(image.cam_from_world().matrix(), dtype=torch.float32)
    fx, fy, cx, cy = cam.params[:4]
    K = torch.tensor([[fx * scale, 0, cx * scale], [0, fy * scale, cy * scale], [0, 0, 1]], dtype=torch.float32)
    width, height = max(1, round(cam.width * scale)), max(1, round(cam.height * scale))
    return points, torch.linalg.inv(w2c), K, width, height


def knn_mean_distance(points: torch.Tensor, k: int = 3, chunk: int = 2048) -> torch.Tensor:
    """[N] mean distance to the k nearest other points."""
    out = []
    for i in range(0, points.shape[0], chunk):
        d = torch.cdist(points[i : i + chunk], points)
        out.append(d.topk(k + 1, largest=False).values[:, 1:].mean(1))
    return torch.cat(out)


def make_splats(points: torch.Tensor, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    n = points.shape[0]
    log_scale = torch.log(knn_mean_distance(points).clamp_min(1e-7))
    return {
        "means": points.clone(),
        "quats": torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1),
        "scales": log_scale[:, None].repeat(1, 3),
        "opacities": torch.full((n,), 2.0),
        "sh0": torch.randn(n, 1, 3, generator=gen) * 0.5,
        "shN": torch.randn(n, 15, 3, generator=gen) * 0.05,
    }


def timed(fn, repeats: int, sync):
    """(median, min) wall seconds over ``repeats`` calls after one warm-up call."""
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subject_dir", default=str(REPO / "data" / "nersemble" / "306"))
    ap.add_argument("--image", default="00000_08.png")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scale", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depth_loss", action="store_true", help="backpropagate through depth too (default: rgb + alpha)")
    ap.add_argument("--skip_dense", action="store_true", help="skip the (slow) dense reference")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    points, c2w, K, width, height = load_scene(Path(args.subject_dir), args.image, args.scale)
    raw = {k: v.to(dev) for k, v in make_splats(points).items()}
    act = activate(raw)
    viewmats = c2w_to_w2c(c2w[None]).to(dev)
    Ks = K[None].to(dev)
    bg = torch.ones(1, 3, device=dev)
    tensors = [act[k] for k in ("means", "quats", "scales", "opacities", "sh")]

    def render(backend, grad=False):
        leaves = [t.detach().requires_grad_(grad) for t in tensors]
        out = rasterize(*leaves, viewmats, Ks, width, height, sh_degree=3, backgrounds=bg, backend=backend)
        if grad:
            loss = out.rgb.sum() + out.alpha.sum() + (out.depth.sum() if args.depth_loss else 0.0)
            loss.backward()
        return out

    result = {
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "num_gaussians": int(points.shape[0]),
        "width": width,
        "height": height,
        "repeats": args.repeats,
    }
    backends = ["torch"] + (["gsplat"] if dev.type == "cuda" else [])
    images = {}
    for backend in backends:
        with torch.no_grad():
            result[f"{backend}_forward_s"], result[f"{backend}_forward_min_s"] = timed(
                lambda: render(backend), args.repeats, sync
            )
            images[backend] = render(backend)
        result[f"{backend}_forward_backward_s"], result[f"{backend}_forward_backward_min_s"] = timed(
            lambda: render(backend, grad=True), args.repeats, sync
        )
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # before the dense run
    if "gsplat" in images:
        result["max_abs_diff_torch_vs_gsplat"] = float((images["torch"].rgb - images["gsplat"].rgb).abs().max())
    if not args.skip_dense:
        with torch.no_grad():
            t0 = time.perf_counter()
            dense = render("reference")
            sync()
            result["dense_forward_s"] = time.perf_counter() - t0
        result["speedup_forward_vs_dense"] = result["dense_forward_s"] / result["torch_forward_s"]
        fwd_bwd = result["torch_forward_backward_s"]
        result["speedup_forward_backward_vs_dense_forward"] = result["dense_forward_s"] / fwd_bwd
        for key in ("rgb", "alpha", "depth"):
            diff = (getattr(images["torch"], key) - getattr(dense, key)).abs()
            if key == "depth":  # depth is normalised by alpha: compare where something was drawn
                diff = diff * (dense.alpha > 1e-3)
            result[f"max_abs_diff_{key}_vs_dense"] = float(diff.max())
    if not args.skip_dense:
        result["peak_rss_mb_incl_dense"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if dev.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
