#!/usr/bin/env python
"""Benchmark the test-time refinement (W phase, MLP phase) and print JSON.

Measures seconds per refinement iteration of each phase at the given image scales with the
official decoder size (hidden 256, 6 body layers, 10144 Gaussians) on subject 306's view 8,
and the full default refinement (300 steps: 150 W + 150 MLP), either run (``--full``) or
extrapolated from the per-iteration times. Uses ``--decoder_checkpoint`` when given, otherwise a
decoder with random weights (speed does not depend on the values).

    python scripts/benchmark_refine.py --scales 0.25 1.0 --iters 5
"""

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def build_decoder(args, points_parser):
    from fastavatar.models.decoder import DecoderConfig, GaussianDecoder
    from fastavatar.train.template import initial_splats

    if args.decoder_checkpoint:
        from fastavatar.io.checkpoints import load_decoder

        decoder, w_vectors, _ = load_decoder(args.decoder_checkpoint)
        return decoder, w_vectors, "checkpoint"
    decoder = GaussianDecoder(initial_splats(points_parser), DecoderConfig(init="zero_out"))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for head in decoder.conditioning_mlp.heads().values():
            head[-1].weight.copy_(torch.randn(head[-1].weight.shape, generator=gen) * 0.01)
    return decoder, torch.randn(4, 512) * 0.1, "random (official size)"


def time_phase(decoder, w0, points, image, c2w, K, width, height, steps, phase, device, backend, precision):
    from fastavatar.inference.refine import FitConfig, fit_to_views

    cfg = FitConfig(w_steps=steps if phase == "w" else 0, mlp_steps=steps if phase == "mlp" else 0,
                    lpips_weight=0.0, render_backend=backend, precision=precision)
    fit_to_views(decoder, w0, points, image, c2w, K, width, height,
                 FitConfig(w_steps=1, mlp_steps=1, lpips_weight=0.0, render_backend=backend, precision=precision),
                 show_progress=False)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fit_to_views(decoder, w0, points, image, c2w, K, width, height, cfg, show_progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> int:
    from fastavatar.data import SubjectParser
    from fastavatar.inference.refine import FitConfig, fit_to_views, mean_w, use_bf16
    from fastavatar.runtime import resolve_device

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_root", default="data/nersemble")
    ap.add_argument("--sample_id", default="306")
    ap.add_argument("--view", type=int, default=8)
    ap.add_argument("--scales", type=float, nargs="*", default=[0.25, 1.0])
    ap.add_argument("--iters", type=int, default=5, help="timed iterations per phase")
    ap.add_argument("--full", action="store_true", help="also run the whole default refinement (300 steps)")
    ap.add_argument("--decoder_checkpoint", default="")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--precision", default="auto", help="fp32, bf16 or auto (see fastavatar.inference.refine.FitConfig)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
               "torch": torch.__version__, "num_gaussians": 10144, "per_scale": [],
               "precision": "bf16" if use_bf16(args.precision, device) else "fp32"}
    for scale in args.scales:
        parser = SubjectParser(Path(args.data_root) / args.sample_id, image_scale=scale)
        decoder, w_vectors, source = build_decoder(args, parser)
        decoder = decoder.to(device)
        results["decoder"] = source
        points = parser.points.to(device)
        image = parser.load_image(args.view).to(device)[None]
        c2w, K = parser.c2w[args.view:args.view + 1].to(device), parser.Ks[args.view:args.view + 1].to(device)
        w0 = mean_w(w_vectors).to(device)
        row = {"image_scale": scale, "image_size": [parser.width, parser.height]}
        for phase in ("w", "mlp"):
            row[f"{phase}_phase_s_per_iter"] = time_phase(decoder, w0, points, image, c2w, K, parser.width,
                                                           parser.height, args.iters, phase, device, args.backend,
                                                           args.precision)
        row["full_default_refinement_s_estimated"] = 150 * (row["w_phase_s_per_iter"] + row["mlp_phase_s_per_iter"])
        if args.full:
            t0 = time.perf_counter()
            fit_to_views(decoder, w0, points, image, c2w, K, parser.width, parser.height,
                         FitConfig(w_steps=150, mlp_steps=150, lpips_weight=0.0, render_backend=args.backend,
                                   precision=args.precision),
                         show_progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            row["full_default_refinement_s"] = time.perf_counter() - t0
        results["per_scale"].append(row)
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["targets"] = {"cpu_quarter_scale_full_s": 60.0, "h100_full_scale_full_s": 3.0}
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    from fastavatar.cli import run_script

    sys.exit(run_script(main))
