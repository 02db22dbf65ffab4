"""Benchmark the render backends side by side (numba and torch on CPU, gsplat on CUDA, the dense
reference once); prints JSON.

Scene: subject 306's points3D as isotropic Gaussians (scale = mean distance to the 3 nearest
neighbours), opacity logit 2, small random SH of degree 3, the camera of image 00000_08.png at each
of ``--scales`` (1/2: 275 x 401, full: 550 x 802).

Timings: the backends are timed in turn within each repeat (so machine load hits all of them alike);
medians and minima of wall time, and the median process CPU time. Ratios are computed from those
side-by-side medians. Peak memory: each backend renders forward + backward in its own subprocess,
whose peak resident set (VmHWM, reset after the scene is built) minus the resident set before the
first render is reported as ``peak_render_mb``.

    python scripts/benchmark_render.py [--device cpu] [--repeats 7] [--scales 0.5 1.0] [--skip_dense]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

from fastavatar.core.cameras import c2w_to_w2c  # noqa: E402
from fastavatar.data import SubjectParser  # noqa: E402
from fastavatar.render import rasterize  # noqa: E402
from fastavatar.core.splats import activate  # noqa: E402


def load_scene(subject_dir: Path, image_name: str, scale: float):
    """(points [N,3], c2w [4,4], K [3,3], width, height) of one view of a subject."""
    parser = SubjectParser(str(subject_dir), image_scale=scale)
    i = parser.image_names.index(image_name)
    return parser.points.float(), parser.c2w[i].float(), parser.Ks[i].float(), parser.width, parser.height


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


def _rss_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MiB (Linux), or ru_maxrss for VmHWM elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def build(args, scale, dev):
    points, c2w, K, width, height = load_scene(Path(args.subject_dir), args.image, scale)
    act = activate({k: v.to(dev) for k, v in make_splats(points).items()})
    tensors = [act[k] for k in ("means", "quats", "scales", "opacities", "sh")]
    return tensors, c2w_to_w2c(c2w[None]).to(dev), K[None].to(dev), width, height, int(points.shape[0])


def make_render(args, tensors, viewmats, Ks, width, height, dev):
    bg = torch.ones(1, 3, device=dev)

    def render(backend, grad=False):
        leaves = [t.detach().requires_grad_(grad) for t in tensors]
        with torch.set_grad_enabled(grad):
            out = rasterize(*leaves, viewmats, Ks, width, height, sh_degree=3, backgrounds=bg, backend=backend,
                            antialiased=args.antialiased)
            if grad:
                loss = out.rgb.sum() + out.alpha.sum() + (out.depth.sum() if args.depth_loss else 0.0)
                loss.backward()
                return out, [t.grad for t in leaves]
        return out, None

    return render


def memory_probe(args) -> None:
    """Subprocess entry: peak memory of one backend's forward + backward at one scale."""
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    tensors, viewmats, Ks, width, height, _ = build(args, args.scales[0], dev)
    render = make_render(args, tensors, viewmats, Ks, width, height, dev)
    render(args.memory_probe, grad=False)  # loads/compiles kernels, first-touch allocations of the import
    before = _rss_mb("VmRSS")
    exact = _reset_peak()
    for _ in range(2):
        render(args.memory_probe, grad=True)
    peak = _rss_mb("VmHWM")
    print(json.dumps({"backend": args.memory_probe, "rss_before_mb": round(before, 1), "peak_rss_mb": round(peak, 1),
                      "peak_render_mb": round(peak - before, 1), "peak_reset": exact}))


def measure_memory(args, backend: str, scale: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory_probe", backend, "--scales", str(scale),
           "--device", args.device, "--threads", str(args.threads), "--subject_dir", args.subject_dir,
           "--image", args.image] + (["--antialiased"] if args.antialiased else []) + (
           ["--depth_loss"] if args.depth_loss else [])
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_scale(args, scale, dev, backends, sync) -> dict:
    tensors, viewmats, Ks, width, height, n = build(args, scale, dev)
    render = make_render(args, tensors, viewmats, Ks, width, height, dev)
    row = {"scale": scale, "width": width, "height": height, "num_gaussians": n, "backends": {}}
    outs = {}
    for backend in backends:  # warm-up (and kernel loading) outside the timings
        render(backend)
        outs[backend] = render(backend, grad=True)
        sync()
    times = {b: {"forward": [], "forward_backward": [], "forward_backward_cpu": []} for b in backends}
    for _ in range(args.repeats):
        for backend in backends:  # interleaved: the same machine load for every backend
            t0 = time.perf_counter()
            render(backend)
            sync()
            times[backend]["forward"].append(time.perf_counter() - t0)
            c0, t0 = time.process_time(), time.perf_counter()
            render(backend, grad=True)
            sync()
            times[backend]["forward_backward"].append(time.perf_counter() - t0)
            times[backend]["forward_backward_cpu"].append(time.process_time() - c0)
    for backend in backends:
        t = times[backend]
        row["backends"][backend] = {
            "forward_s": statistics.median(t["forward"]),
            "forward_min_s": min(t["forward"]),
            "forward_backward_s": statistics.median(t["forward_backward"]),
            "forward_backward_min_s": min(t["forward_backward"]),
            "forward_backward_cpu_s": statistics.median(t["forward_backward_cpu"]),
        }
        if dev.type == "cpu" and not args.skip_memory:
            row["backends"][backend]["memory"] = measure_memory(args, backend, scale)
    base = "torch"
    for backend in backends:
        if backend == base:
            continue
        b, t = row["backends"][backend], row["backends"][base]
        b["speedup_forward_vs_torch"] = t["forward_s"] / b["forward_s"]
        b["speedup_forward_backward_vs_torch"] = t["forward_backward_s"] / b["forward_backward_s"]
        b["speedup_forward_backward_cpu_time_vs_torch"] = t["forward_backward_cpu_s"] / b["forward_backward_cpu_s"]
        if "memory" in b and "peak_render_mb" in b["memory"] and "peak_render_mb" in t.get("memory", {}):
            b["peak_render_memory_ratio_vs_torch"] = b["memory"]["peak_render_mb"] / max(t["memory"]["peak_render_mb"], 1e-3)
        (o_b, g_b), (o_t, g_t) = outs[backend], outs[base]
        b["max_abs_diff_rgb_vs_torch"] = float((o_b.rgb - o_t.rgb).abs().max().detach())
        b["max_rel_diff_grads_vs_torch"] = {
            name: float((gb - gt).abs().max() / gt.abs().max().clamp_min(1e-30))
            for name, gb, gt in zip(("means", "scales", "opacities", "sh"), [g_b[0], g_b[2], g_b[3], g_b[4]],
                                    [g_t[0], g_t[2], g_t[3], g_t[4]])
        }
    if not args.skip_dense and scale == args.scales[0]:
        with torch.no_grad():
            t0 = time.perf_counter()
            dense, _ = render("reference")
            sync()
            row["dense_reference_forward_s"] = time.perf_counter() - t0
        for backend in backends:
            o, _ = outs[backend]
            diff = {k: (getattr(o, k) - getattr(dense, k)).abs().detach() for k in ("rgb", "alpha", "depth")}
            diff["depth"] = diff["depth"] * (dense.alpha > 1e-3)  # depth is normalised by alpha
            row["backends"][backend]["max_abs_diff_vs_dense"] = {k: float(v.max()) for k, v in diff.items()}
            row["backends"][backend]["speedup_forward_vs_dense"] = (
                row["dense_reference_forward_s"] / row["backends"][backend]["forward_s"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subject_dir", default=str(REPO / "data" / "nersemble" / "306"))
    ap.add_argument("--image", default="00000_08.png")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backends", nargs="*", default=None,
                    help="default: torch and numba on CPU (when numba imports), torch and gsplat on CUDA")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--scales", type=float, nargs="*", default=[0.5, 1.0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--antialiased", action="store_true", help="gsplat's antialiased mode in every backend")
    ap.add_argument("--depth_loss", action="store_true", help="backpropagate through depth too (default: rgb + alpha)")
    ap.add_argument("--skip_dense", action="store_true", help="skip the (slow) dense reference at the first scale")
    ap.add_argument("--skip_memory", action="store_true", help="skip the per-backend peak-memory subprocesses")
    ap.add_argument("--memory_probe", default="", help=argparse.SUPPRESS)  # internal: subprocess mode
    args = ap.parse_args()
    if args.memory_probe:
        memory_probe(args)
        return

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if args.backends is None:
        if dev.type == "cuda":
            backends = ["torch", "gsplat"]
        else:
            from fastavatar.render.rasterize_numba import numba_status

            backends = ["torch"] + (["numba"] if numba_status()[0] else [])
    else:
        backends = args.backends
    if "torch" not in backends:
        backends = ["torch"] + list(backends)  # the baseline of every ratio
    result = {
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "antialiased": args.antialiased,
        "repeats": args.repeats,
        "backends": backends,
        "per_scale": [bench_scale(args, s, dev, backends, sync) for s in args.scales],
    }
    try:
        import numba

        result["numba"] = numba.__version__
    except ImportError:
        pass
    result["load_average_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if dev.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["targets"] = {"numba_speedup_forward_backward_vs_torch": ">= 5 at 275x401 and 550x802",
                         "numba_forward_backward_s_at_275x401": "<= 0.040",
                         "numba_peak_render_memory_ratio_vs_torch": "<= 0.5"}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    from fastavatar.cli import run_script

    sys.exit(run_script(lambda _argv: main()))
