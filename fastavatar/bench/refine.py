"""Test-time refinement timed per phase (``scripts/benchmark_refine.py``), as JSON.

Seconds per refinement iteration of each phase at the given image scales on one view of a bundled
subject, and the full default refinement (150 W + 150 MLP steps), either run (``--full``) or
extrapolated from the per-iteration times. Uses ``--decoder_checkpoint`` when given, otherwise a
decoder of the official size with random weights (speed does not depend on the values); the JSON
says which, and how many Gaussians the decoder has.
"""

from __future__ import annotations

import copy
import json
import statistics
import platform
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Literal, Optional, Sequence

import torch

from fastavatar.config import option, parse_config
from fastavatar.data import SubjectParser
from fastavatar.inference.refine import FitConfig, fit_to_views, mean_w, use_bf16
from fastavatar.io.checkpoints import load_decoder
from fastavatar.models.decoder import DecoderConfig, GaussianDecoder
from fastavatar.render import resolve_backend
from fastavatar.runtime import resolve_device
from fastavatar.train.template import initial_splats


@dataclass
class RefineBenchConfig:
    data_root: str = option("data/nersemble", "folder of subject folders")
    sample_id: str = option("306", "subject whose view is fitted")
    view: int = option(8, "the input view")
    scales: List[float] = option([0.25, 1.0], "image scales timed")
    iters: int = option(5, "timed iterations per phase")
    full: bool = option(False, "also run the whole default refinement (150 W + 150 MLP steps)")
    decoder_checkpoint: str = option("", "decoder to time (default: random weights at the official size)")
    device: str = option("auto", "torch device: auto, cpu, cuda")
    render_backend: Literal["auto", "numba", "torch", "gsplat"] = option("auto", "renderer (when render_backends is empty)")
    render_backends: List[str] = option([], "renderers timed side by side in one run, e.g. torch numba (interleaved "
                                             "per phase so machine load hits them alike)")
    profile_decoder: bool = option(True, "also time the decoder alone (forward + backward) in each phase")
    precision: Literal["auto", "fp32", "bf16"] = option("auto", "decoder precision (see FitConfig.precision)")
    threads: int = option(0, "torch CPU threads (0: leave as is)")


def _decoder(cfg: RefineBenchConfig, parser: SubjectParser):
    if cfg.decoder_checkpoint:
        decoder, w_vectors, _ = load_decoder(cfg.decoder_checkpoint)
        return decoder, w_vectors, "checkpoint"
    decoder = GaussianDecoder(initial_splats(parser), DecoderConfig(init="zero_out"))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for head in decoder.conditioning_mlp.heads().values():
            head[-1].weight.copy_(torch.randn(head[-1].weight.shape, generator=gen) * 0.01)
    return decoder, torch.randn(4, 512) * 0.1, "random (official size)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _profile_decoder(decoder, w0, device, bf16: bool, iters: int) -> dict:
    """Seconds per iteration of the decoder alone as the refinement runs it: forward under the same
    autocast, then backward of a sum over its outputs into W (W phase) or into the hypernetwork
    (MLP phase); no rendering, loss or optimiser step."""
    decoder = copy.deepcopy(decoder)
    for p in decoder.parameters():
        p.requires_grad_(False)
    mlp = list(decoder.conditioning_mlp.parameters())
    out = {}
    for phase in ("w", "mlp"):
        w = w0.detach().clone().reshape(1, -1).requires_grad_(phase == "w")
        for p in mlp:
            p.requires_grad_(phase == "mlp")
        times = []
        for i in range(iters + 1):
            _sync(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                res = decoder(w)
            loss = sum(res[k].float().sum() for k in ("means_delta", "quats", "scales", "opacities", "sh0"))
            loss.backward()
            _sync(device)
            if i:  # the first one is a warm-up
                times.append(time.perf_counter() - t0)
        out[f"{phase}_phase_s_per_iter"] = statistics.median(times)
    return out


def benchmark_refine(cfg: RefineBenchConfig) -> dict:
    """The figures (see the module doc) as a JSON-serialisable dict."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    fit = FitConfig(lpips_weight=0.0, render_backend=cfg.render_backend, precision=cfg.precision)
    cpu = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
               "torch": torch.__version__, "per_scale": [],
               "precision": "bf16" if use_bf16(cfg.precision, device) else "fp32"}
    for scale in cfg.scales:
        parser = SubjectParser(Path(cfg.data_root) / cfg.sample_id, image_scale=scale)
        decoder, w_vectors, source = _decoder(cfg, parser)
        decoder = decoder.to(device)
        results["decoder"] = source
        results["num_gaussians"] = int(decoder.template_means.shape[0])
        points = parser.points.to(device)
        image = parser.load_image(cfg.view).to(device)[None]
        c2w, K = parser.c2w[cfg.view:cfg.view + 1].to(device), parser.Ks[cfg.view:cfg.view + 1].to(device)
        w0 = mean_w(w_vectors).to(device)

        def run(w_steps: int, mlp_steps: int, backend: str) -> float:
            _sync(device)
            t0 = time.perf_counter()
            fit_to_views(decoder, w0, points, image, c2w, K, parser.width, parser.height,
                         replace(fit, w_steps=w_steps, mlp_steps=mlp_steps, render_backend=backend),
                         show_progress=False)
            _sync(device)
            return time.perf_counter() - t0

        backends = list(cfg.render_backends) or [cfg.render_backend]
        row = {"image_scale": scale, "image_size": [parser.width, parser.height], "backends": {}}
        for backend in backends:
            run(1, 1, backend)  # warm-up (kernel loading)
            row["backends"][backend] = {"resolved": resolve_backend(backend, device)}
        for phase in ("w", "mlp"):
            for backend in backends:  # side by side: one phase of every backend, then the next phase
                steps = (cfg.iters, 0) if phase == "w" else (0, cfg.iters)
                row["backends"][backend][f"{phase}_phase_s_per_iter"] = run(*steps, backend) / cfg.iters
        for backend in backends:
            b = row["backends"][backend]
            b["full_default_refinement_s_estimated"] = 150 * (b["w_phase_s_per_iter"] + b["mlp_phase_s_per_iter"])
            b["estimate"] = f"extrapolated: 150 x (W + MLP seconds per iteration over {cfg.iters} iterations)"
            if cfg.full:
                b["full_default_refinement_s"] = run(150, 150, backend)
        if "torch" in backends:
            t = row["backends"]["torch"]["full_default_refinement_s_estimated"]
            for backend in backends:
                row["backends"][backend]["speedup_vs_torch"] = t / row["backends"][backend]["full_default_refinement_s_estimated"]
        if cfg.profile_decoder:
            row["decoder_alone"] = _profile_decoder(decoder, w0, device, use_bf16(cfg.precision, device), cfg.iters)
            for backend in backends:
                b = row["backends"][backend]
                for phase in ("w", "mlp"):
                    b[f"decoder_share_{phase}_phase"] = (row["decoder_alone"][f"{phase}_phase_s_per_iter"]
                                                         / b[f"{phase}_phase_s_per_iter"])
        results["per_scale"].append(row)
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["targets"] = {"cpu_quarter_scale_full_s": 60.0, "h100_full_scale_full_s": 3.0,
                          "cpu_full_scale_550x802_full_s": 120.0, "cpu_half_scale_full_s": 60.0}
    return results


def benchmark_refine_main(argv: Optional[Sequence[str]] = None, description: str = "") -> int:
    print(json.dumps(benchmark_refine(parse_config(RefineBenchConfig, argv, description=description)), indent=2))
    return 0
