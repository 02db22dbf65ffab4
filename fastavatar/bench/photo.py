"""Photo -> splats timing of the camera-free mode (benchmark, printed as JSON; no timed unit test).

Two decoders on the same photo and settings: the given checkpoint (e.g. the demo's / a
leave-one-out decoder) and one of the official size (hidden 256, 6 body layers; random weights
on the given decoder's template, since speed does not depend on the values).
"""

from __future__ import annotations

import contextlib
import os
import sys
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict

import torch


def official_size_like(decoder):
    """A decoder of the released size on ``decoder``'s template (random, non-zero output layers)."""
    from fastavatar.models.decoder import DecoderConfig, GaussianDecoder

    template = decoder.template_splats()
    template = {**template, "shN": decoder.base_shN.detach()}
    big = GaussianDecoder(template, DecoderConfig(init="zero_out"))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for head in big.conditioning_mlp.heads().values():
            head[-1].weight.copy_(torch.randn(head[-1].weight.shape, generator=gen) * 0.01)
    return big


def benchmark_photo(cfg, repeats: int = 1) -> Dict[str, object]:
    """Run ``reconstruct_photo`` (no files written) with both decoders; seconds per stage (best of ``repeats``)."""
    from fastavatar.face.landmarks import FaceStage
    from fastavatar.face.template_landmarks import load_template_landmarks
    from fastavatar.inference.photo import load_photo_decoder, reconstruct_photo
    from fastavatar.losses import load_lpips
    from fastavatar.runtime import resolve_device

    device = resolve_device(cfg.device)
    decoder, w_vectors = load_photo_decoder(cfg, device)
    stage = FaceStage()
    landmarks = load_template_landmarks(Path(cfg.template_landmarks) if cfg.template_landmarks else None)
    lpips_model = load_lpips(cfg.lpips_net, device, quiet=True)
    results = {}
    for name, dec in (("given_decoder", decoder), ("official_size_decoder", official_size_like(decoder).to(device))):
        runs = []
        for _ in range(repeats):
            with contextlib.redirect_stdout(sys.stderr):  # the run's progress lines; stdout stays JSON
                rec = reconstruct_photo(replace(cfg, turntable_frames=0, ring_views=0), Path(cfg.image), dec, w_vectors,
                                        stage, landmarks, lpips_model, device, None, show_progress=False)
            runs.append(rec.summary["timings_s"])
        best = min(runs, key=lambda t: t["photo_to_splats"])
        results[name] = {"decoder_hidden": dec.config.hidden_dim, "decoder_body_layers": dec.config.body_layers,
                         "seconds": best}
    steps = {"camera": cfg.camera.camera_steps, "w": cfg.fit.w_steps, "mlp": cfg.fit.mlp_steps,
             "per_gaussian": cfg.gaussians.pg_steps if cfg.gaussians.per_gaussian else 0}
    return {"photo": cfg.image, "image_scale": cfg.image_scale, "steps": steps, "device": str(device),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0], "machine": platform.processor() or platform.machine(),
            "results": results, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
