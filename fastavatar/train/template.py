"""The canonical template: element-wise average of per-subject 3DGS fits, one Gaussian per
FLAME triangle in a fixed order (spec §1.2 "Template provenance"; not released upstream).

Per subject we fit Gaussians with positions fixed at the subject's points3D (the decoder adds
bounded deltas to those positions later, so the template's own positions only matter as the
mean shape) and optimise rotations, log-scales, logit-opacities and SH with our renderer on the
subject's calibrated views. Initialisation: identity rotations, isotropic scales from the mean
distance to the 3 nearest neighbours, colours from the images (each point projected into every
view it faces), opacity 0.8. The average is taken in raw space (log-scales, logits, SH) with
quaternions sign-aligned to w >= 0 and renormalised.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Dict, List, Literal, Optional, Sequence

import torch

from fastavatar.config import option, parse_config, save_config
from fastavatar.core.cameras import c2w_to_w2c
from fastavatar.core.splats import SH_REST_COEFFS, Splats, canonical_quats, rgb_to_sh0
from fastavatar.data import SubjectParser, discover_subjects
from fastavatar.io.ply import save_ply
from fastavatar.losses import photometric_loss
from fastavatar.runtime import progress, resolve_device


@dataclass
class TemplateFitConfig:
    iterations: int = option(300, "optimisation steps per subject")
    views_per_step: int = option(2, "views rendered per step (random subset)")
    lr: float = option(0.01, "Adam learning rate (rotations, scales, opacities, SH DC)")
    sh_rest_lr_scale: float = option(0.05, "learning rate factor for SH bands 1-3")
    sh_degree: int = option(3, "SH degree of the fitted Gaussians")
    l1_weight: float = option(0.8, "L1 weight")
    ssim_weight: float = option(0.2, "1-SSIM weight")
    render_backend: Literal["auto", "numba", "torch", "gsplat"] = option("auto", "renderer: auto, numba, torch or gsplat")
    seed: int = option(0, "random seed (view sampling)")


def knn_mean_distance(points: torch.Tensor, k: int = 3, chunk: int = 2048) -> torch.Tensor:
    """[N,3] -> [N] mean distance to the k nearest other points (chunked, CPU-friendly)."""
    out = []
    for s in range(0, points.shape[0], chunk):
        d = torch.cdist(points[s : s + chunk], points)  # [c, N]
        d[torch.arange(d.shape[0]), torch.arange(s, s + d.shape[0])] = float("inf")
        out.append(d.topk(k, dim=1, largest=False).values.mean(dim=1))
    return torch.cat(out)


@torch.no_grad()
def colours_from_views(parser: SubjectParser, points: torch.Tensor, views: Optional[Sequence[int]] = None) -> torch.Tensor:
    """[N,3] colour per point: the mean of the pixels it projects to over the views where it lies
    in the image (no occlusion test; good enough as an initialisation)."""
    views = list(range(len(parser))) if views is None else list(views)
    total = torch.zeros(points.shape[0], 3)
    count = torch.zeros(points.shape[0], 1)
    for v in views:
        image = parser.load_image(v)  # [H, W, 3]
        w2c = c2w_to_w2c(parser.c2w[v])
        cam = points @ w2c[:3, :3].T + w2c[:3, 3]
        uv = cam @ parser.Ks[v].T
        uv = uv[:, :2] / uv[:, 2:].clamp_min(1e-6)
        px = uv.floor().long()
        ok = (cam[:, 2] > 0) & (px[:, 0] >= 0) & (px[:, 0] < parser.width) & (px[:, 1] >= 0) & (px[:, 1] < parser.height)
        total[ok] += image[px[ok, 1], px[ok, 0]]
        count[ok] += 1
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, 0.5))


def initial_splats(parser: SubjectParser, sh_degree: int = 3) -> Splats:
    """Raw splats at the subject's points3D, initialised as described in the module doc."""
    points = parser.points.clone()
    n = points.shape[0]
    dist = knn_mean_distance(points).clamp_min(1e-4)
    rgb = colours_from_views(parser, points).clamp(0.02, 0.98)
    rest = (sh_degree + 1) ** 2 - 1
    return {
        "means": points,
        "quats": torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1),
        "scales": torch.log(dist)[:, None].repeat(1, 3),
        "opacities": torch.full((n,), math.log(0.8 / 0.2)),
        "sh0": rgb_to_sh0(rgb)[:, None, :],
        "shN": torch.zeros(n, rest, 3),
    }


def fit_subject(parser: SubjectParser, cfg: TemplateFitConfig, device="cpu", show_progress: bool = True) -> Splats:
    """Fit one subject's Gaussians (positions fixed) to its views; returns raw splats on CPU."""
    from fastavatar.render import render_splats

    rng = random.Random(cfg.seed)
    init = initial_splats(parser, cfg.sh_degree)
    params = {k: torch.nn.Parameter(v.to(device)) for k, v in init.items() if k != "means"}
    means = init["means"].to(device)
    groups = [{"params": [params[k]], "lr": cfg.lr} for k in ("quats", "scales", "opacities", "sh0")]
    groups.append({"params": [params["shN"]], "lr": cfg.lr * cfg.sh_rest_lr_scale})
    optimizer = torch.optim.Adam(groups, eps=1e-15)
    images = [parser.load_image(v).to(device) for v in range(len(parser))]
    c2w, Ks = parser.c2w.to(device), parser.Ks.to(device)
    bar = progress(range(cfg.iterations), show_progress, desc=f"template fit {parser.subject_id}", leave=False)
    for _ in bar:
        views = rng.sample(range(len(parser)), min(cfg.views_per_step, len(parser)))
        splats = {"means": means, **params}
        out = render_splats(splats, c2w[views], Ks[views], parser.width, parser.height,
                            sh_degree=cfg.sh_degree, backend=cfg.render_backend)
        target = torch.stack([images[v] for v in views])
        loss = photometric_loss(out.rgb, target, cfg.l1_weight, cfg.ssim_weight, 0.0)["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    return {"means": means.detach().cpu(), **{k: v.detach().cpu() for k, v in params.items()}}


def average_splats(fits: List[Splats]) -> Splats:
    """Element-wise average in raw space; quaternions sign-aligned (w >= 0) and renormalised."""
    if not fits:
        raise ValueError("average_splats needs at least one fit")
    n = fits[0]["means"].shape[0]
    for f in fits:
        if f["means"].shape[0] != n:
            raise ValueError(f"cannot average fits with {f['means'].shape[0]} and {n} Gaussians")
    out: Dict[str, torch.Tensor] = {}
    for key in fits[0]:
        stack = torch.stack([canonical_quats(f[key]) if key == "quats" else f[key] for f in fits])
        out[key] = stack.mean(dim=0)
    out["quats"] = canonical_quats(out["quats"])
    if out["shN"].shape[1] != SH_REST_COEFFS:  # the decoder template is always SH degree 3
        pad = torch.zeros(n, SH_REST_COEFFS - out["shN"].shape[1], 3)
        out["shN"] = torch.cat([out["shN"], pad], dim=1)
    return out


def build_template(parsers: Sequence[SubjectParser], cfg: TemplateFitConfig, device="cpu",
                   show_progress: bool = True) -> Splats:
    """Fit every subject and average: the canonical template (raw splats, SH degree 3)."""
    fits = [fit_subject(p, cfg, device, show_progress) for p in parsers]
    return average_splats(fits)


@dataclass
class BuildTemplateConfig(TemplateFitConfig):
    """``scripts/build_template.py``: the fit options plus which subjects and where the PLY goes."""

    data_root: str = option("data/nersemble", "folder of subject folders")
    subjects: List[str] = option([], "subject ids to fit (empty: all)")
    image_scale: float = option(0.5, "image scale used for fitting")
    output: str = option("pretrained_weights/averaged_model.ply", "where to write the template PLY")
    device: str = option("auto", "auto, cpu or cuda")


def build_template_main(argv: Optional[Sequence[str]] = None, description: str = "") -> int:
    """CLI of ``scripts/build_template.py``: fit, average, write the PLY and its resolved
    ``<output stem>.config.yaml`` beside it."""
    cfg = parse_config(BuildTemplateConfig, argv, description=description)
    parsers = [SubjectParser(p, image_scale=cfg.image_scale)
               for p in discover_subjects(cfg.data_root, cfg.subjects or None, verbose=True)]
    fit_cfg = TemplateFitConfig(**{f.name: getattr(cfg, f.name) for f in fields(TemplateFitConfig)})
    template = build_template(parsers, fit_cfg, device=resolve_device(cfg.device))
    rows = save_ply(cfg.output, template)
    output = Path(cfg.output)
    config_path = save_config(cfg, output.parent, name=f"{output.stem}.config.yaml")
    print(f"[template] wrote {cfg.output}: {rows} Gaussians averaged over {len(parsers)} subjects (config {config_path})")
    return 0
