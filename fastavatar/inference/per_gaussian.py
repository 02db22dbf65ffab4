"""Per-Gaussian refinement: after W and the hypernetwork, optimise the decoded Gaussians' own raw
parameters on the input view(s), with priors that keep what the camera cannot see plausible.

What moves (offsets ``d`` added to the decoded raw splats, see :mod:`fastavatar.core.splats`):
colour (SH DC; bands 1-3 stay fixed by default), opacity logit, log-scale, quaternion, and
the position inside a small bound (``bound * tanh(raw)``, metres; 2 mm by default).

Defaults were chosen by a nested leave-one-subject-out grid (``scripts/tune_refinement.py``,
README "Evaluation protocol"): after a short W fit (30 steps, no hypernetwork phase), unseen-view
PSNR peaks near 200 steps at these low learning rates, while the input view keeps improving
(longer or faster runs overfit the input camera); letting positions move inside 2 mm added
0.04-0.27 dB on each held-out subject.

Priors, all on the offsets (the decoded head is the prior):
- **stay close**: ``sum_k prior_k * mean(d_k^2)`` per parameter kind;
- **left-right symmetry**: a Gaussian's offset matches its mirror partner's (colour, opacity,
  scale; position reflected through the symmetry plane). The partner comes from the template
  points: reflect across their best-fit symmetry plane and take the mutual nearest neighbour;
- **smoothness**: offsets match those of the k nearest template neighbours;
- **visibility**: a Gaussian that contributes (``sum over pixels of a_i T_i``) less than
  ``visibility_threshold`` pixels to every input view, and whose mirror partner does not either,
  keeps its decoded values exactly (its offsets are masked to zero).

Everything here is computed from the template points at call time (about a second for 10144
points on a CPU); nothing is cached or shipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from fastavatar.config import option
from fastavatar.core.splats import Splats, detach_splats
from fastavatar.losses import photometric_loss
from fastavatar.runtime import progress

SH_C0 = 0.28209479177387814  # band-0 SH constant (colour = SH_C0 * sh0 + 0.5)


@dataclass
class PerGaussianConfig:
    per_gaussian: bool = option(True, "run the per-Gaussian stage after W and the hypernetwork (--no-per_gaussian: skip)")
    pg_steps: int = option(200, "optimisation steps on the input view(s) (held-out unseen-view PSNR peaks near 200)")
    pg_lr_sh0: float = option(0.003, "Adam learning rate of the SH DC offset (raw SH units)")
    pg_lr_opacity: float = option(0.01, "Adam learning rate of the opacity-logit offset")
    pg_lr_scale: float = option(0.003, "Adam learning rate of the log-scale offset")
    pg_lr_rotation: float = option(0.001, "Adam learning rate of the (unnormalised) quaternion offset")
    pg_lr_position: float = option(0.01, "Adam learning rate of the raw position offset (before bound*tanh)")
    pg_position_bound: float = option(
        0.002, "largest position offset per axis, metres (the tuned default 0.002: positions move inside 2 mm; "
               "0: fixed)")
    pg_lr_shN: float = option(0.0005, "Adam learning rate of the SH bands 1-3 offset (only when view-dependent colour is not kept)")
    pg_l1_weight: float = option(0.6, "photometric L1 weight")
    pg_ssim_weight: float = option(0.3, "photometric 1-SSIM weight")
    pg_lpips_weight: float = option(0.1, "LPIPS weight (skipped without the LPIPS trunk)")
    pg_prior_sh0: float = option(0.01, "stay-close weight on the mean squared SH DC offset")
    pg_prior_shN: float = option(0.1, "stay-close weight on the mean squared SH bands 1-3 offset (when they move)")
    pg_prior_opacity: float = option(0.001, "stay-close weight on the mean squared opacity-logit offset")
    pg_prior_scale: float = option(0.001, "stay-close weight on the mean squared log-scale offset")
    pg_prior_rotation: float = option(0.01, "stay-close weight on the mean squared quaternion offset")
    pg_prior_position: float = option(0.001, "stay-close weight on the mean squared position offset / bound")
    pg_symmetry_weight: float = option(0.01, "weight of the left-right symmetry prior on the offsets (0: off)")
    pg_smoothness_weight: float = option(0.01, "weight of the template-neighbour smoothness prior on the offsets (0: off)")
    pg_num_neighbours: int = option(8, "template neighbours per Gaussian for the smoothness prior")
    pg_visibility_threshold: float = option(
        0.05, "pixels of contribution (sum of a_i T_i over an input view) below which a Gaussian counts as unseen")
    pg_facing_threshold: float = option(
        -1.0, "cosine between a Gaussian's surface normal (from its template neighbours) and the direction to the "
              "camera below which it counts as unseen (-1: off, the tuned default: 0.5 cost 0.4 dB on held-out views)")
    pg_grad_clip: float = option(0.0, "gradient-norm clip over all offsets (0: off)")


@dataclass
class TemplateGraph:
    """Correspondences computed from the template points (N Gaussians)."""

    mirror: torch.Tensor  # [N] long: mirror partner index, -1 where there is none (mirror[mirror[i]] == i)
    neighbours: torch.Tensor  # [N, k] long: k nearest template neighbours (self excluded)
    plane_normal: torch.Tensor  # [3] unit normal of the symmetry plane
    plane_offset: float  # plane: normal . x = offset
    residual: float  # median distance between reflected points and their nearest neighbour, metres


@dataclass
class PerGaussianResult:
    splats: Splats  # refined raw splats, detached
    initial_splats: Splats  # the splats the stage started from
    losses: List[float]  # total loss per step
    movable: torch.Tensor  # [N] bool: Gaussians allowed to move (seen, or mirror partner seen)
    contribution: torch.Tensor  # [N] pixels of contribution, max over input views
    seconds: float


# ---------------------------------------------------------------------------- template geometry
def reflect_points(points: torch.Tensor, normal: torch.Tensor, offset: float) -> torch.Tensor:
    """Reflect [N,3] points across the plane ``normal . x = offset`` (normal unit)."""
    dist = points @ normal - offset
    return points - 2.0 * dist[:, None] * normal


def symmetry_plane(points: torch.Tensor, iterations: int = 15):
    """Best-fit mirror plane of [N,3] points: (unit normal [3], offset, median residual metres).

    Tries the three principal axes through the centroid as starting planes; each is refined by
    alternating nearest-neighbour matching of the reflected points and a closed-form plane update
    (the matched pairs' differences give the normal, their midpoints the offset)."""
    from scipy.spatial import cKDTree

    p = points.detach().double().cpu().numpy()
    tree = cKDTree(p)
    centre = p.mean(axis=0)
    _, _, axes = np.linalg.svd(p - centre, full_matrices=False)
    best = None
    for axis in axes:
        n = axis / np.linalg.norm(axis)
        d = float(n @ centre)
        for _ in range(iterations):
            refl = p - 2.0 * (p @ n - d)[:, None] * n
            dist, idx = tree.query(refl)
            keep = dist <= 3.0 * np.median(dist) + 1e-12
            diff = (p - p[idx])[keep]
            _, _, vt = np.linalg.svd(diff, full_matrices=False)
            n_new = vt[0] if vt[0] @ n >= 0 else -vt[0]
            d = float(n_new @ ((p[keep] + p[idx][keep]) * 0.5).mean(axis=0))
            n = n_new
        refl = p - 2.0 * (p @ n - d)[:, None] * n
        residual = float(np.median(tree.query(refl)[0]))
        if best is None or residual < best[2]:
            best = (n, d, residual)
    n, d, residual = best
    return torch.as_tensor(n, dtype=points.dtype), d, residual


def template_graph(points: torch.Tensor, num_neighbours: int = 8, max_mirror_distance: float = 3.0) -> TemplateGraph:
    """Mirror partners and k nearest neighbours of the template points [N,3].

    A point's partner is the nearest neighbour of its reflection, kept only when the match is
    mutual (so ``mirror`` is an involution on the matched points) and closer than
    ``max_mirror_distance`` times the median nearest-neighbour spacing; otherwise -1. Points on
    the plane may be their own partner."""
    from scipy.spatial import cKDTree

    if points.dim() != 2 or points.shape[1] != 3 or points.shape[0] < num_neighbours + 1:
        raise ValueError(f"template_graph: points must be [N,3] with N > {num_neighbours}, got {tuple(points.shape)}")
    normal, offset, residual = symmetry_plane(points)
    p = points.detach().double().cpu().numpy()
    tree = cKDTree(p)
    spacing = float(np.median(tree.query(p, k=2)[0][:, 1]))
    refl = reflect_points(torch.from_numpy(p), normal.double(), offset).numpy()
    dist, idx = tree.query(refl)
    mutual = idx[idx] == np.arange(len(p))
    ok = mutual & (dist <= max_mirror_distance * max(spacing, 1e-12))
    mirror = np.where(ok, idx, -1)
    _, nbr = tree.query(p, k=num_neighbours + 1)
    neighbours = nbr[:, 1:]
    return TemplateGraph(mirror=torch.from_numpy(mirror).long(), neighbours=torch.from_numpy(neighbours).long(),
                         plane_normal=normal.float(), plane_offset=float(offset), residual=residual)


# ---------------------------------------------------------------------------- visibility
def gaussian_contribution(splats: Splats, c2w: torch.Tensor, Ks: torch.Tensor, width: int, height: int,
                          backend: str = "auto") -> torch.Tensor:
    """[N] per-Gaussian contribution ``sum over pixels of a_i T_i`` (pixels), max over the C cameras.

    Computed as the gradient of the summed render of a white-on-black copy of the splats with
    respect to its colour: d(sum rgb)/d(colour_i) = sum_pixels a_i T_i (one forward + backward
    per camera, any backend)."""
    from fastavatar.render import render_splats

    c2w = c2w if c2w.dim() == 3 else c2w[None]
    Ks = Ks if Ks.dim() == 3 else Ks[None]
    out = None
    for cam in range(c2w.shape[0]):
        sh0 = torch.full_like(splats["sh0"], 0.5 / SH_C0).requires_grad_(True)  # colour 1 everywhere
        probe = {k: v.detach() for k, v in splats.items()}
        probe["sh0"] = sh0
        probe["shN"] = torch.zeros_like(splats["shN"])
        rgb = render_splats(probe, c2w[cam:cam + 1], Ks[cam:cam + 1], width, height, sh_degree=0,
                            background=None, backend=backend).rgb
        (grad,) = torch.autograd.grad(rgb[..., 0].sum(), sh0)
        contrib = grad[:, 0, 0].detach() / SH_C0
        out = contrib if out is None else torch.maximum(out, contrib)
    return out


def facing_cosine(means: torch.Tensor, neighbours: torch.Tensor, c2w: torch.Tensor) -> torch.Tensor:
    """[N] max over cameras of cos(angle) between each point's outward surface normal and the direction
    to the camera. Normals: the least-variance axis of the point and its neighbours [N,k], oriented away
    from the centroid of all points (a head is close to star-shaped about it)."""
    c2w = c2w if c2w.dim() == 3 else c2w[None]
    local = torch.cat([means[:, None], means[neighbours]], dim=1)  # [N, k+1, 3]
    centred = local - local.mean(dim=1, keepdim=True)
    cov = centred.transpose(1, 2) @ centred  # [N, 3, 3]
    normals = torch.linalg.eigh(cov.double())[1][..., 0].to(means.dtype)  # eigenvector of the smallest eigenvalue
    outward = means - means.mean(dim=0)
    normals = torch.where((normals * outward).sum(-1, keepdim=True) < 0, -normals, normals)
    best = None
    for cam in range(c2w.shape[0]):
        to_cam = torch.nn.functional.normalize(c2w[cam, :3, 3].to(means) - means, dim=-1)
        cos = (normals * to_cam).sum(-1)
        best = cos if best is None else torch.maximum(best, cos)
    return best


# ---------------------------------------------------------------------------- the stage
def _pair_term(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).reshape(a.shape[0], -1).sum(dim=1).mean()


def refine_gaussians(
    splats: Splats,
    images: torch.Tensor,
    c2w: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    cfg: PerGaussianConfig,
    template_points: Optional[torch.Tensor] = None,
    lpips_model=None,
    graph: Optional[TemplateGraph] = None,
    show_progress: bool = True,
    on_step: Optional[Callable[[int, Splats], None]] = None,
    keep_view_dependent: bool = True,
    sh_degree: int = 3,
    render_backend: str = "auto",
) -> PerGaussianResult:
    """Optimise per-Gaussian offsets of ``splats`` so renders at ``c2w`` [V,4,4] / ``Ks`` [V,3,3]
    match ``images`` [V,H,W,3] (0..1, on white), under the priors in the module docstring.

    ``template_points`` [N,3] (the decoder's template means; default: the splats' own means)
    define the mirror partners and neighbours, unless ``graph`` is given. With ``cfg.per_gaussian``
    False (or ``cfg.pg_steps`` 0) the input splats come back unchanged. ``on_step(step, splats)``, when
    given, sees the detached splats after every step (for curves; it must not modify them).
    """
    from fastavatar.render import render_splats

    t0 = time.perf_counter()
    base = detach_splats(splats)
    n = base["means"].shape[0]
    device = base["means"].device
    c2w = c2w if c2w.dim() == 3 else c2w[None]
    Ks = Ks if Ks.dim() == 3 else Ks[None]
    if images.dim() == 3:
        images = images[None]
    if images.shape[0] != c2w.shape[0] or tuple(images.shape[1:3]) != (height, width):
        raise ValueError(f"refine_gaussians: images {tuple(images.shape)} do not match {c2w.shape[0]} cameras "
                         f"of {width}x{height}")
    if not cfg.per_gaussian or cfg.pg_steps <= 0:
        return PerGaussianResult(splats=base, initial_splats=detach_splats(base), losses=[],
                                 movable=torch.zeros(n, dtype=torch.bool, device=device),
                                 contribution=torch.zeros(n, device=device), seconds=0.0)
    contribution = gaussian_contribution(base, c2w, Ks, width, height, render_backend)
    seen = contribution > cfg.pg_visibility_threshold
    if graph is None:
        points = template_points if template_points is not None else base["means"]
        graph = template_graph(points, cfg.pg_num_neighbours)
    if cfg.pg_facing_threshold > -1:
        seen &= facing_cosine(base["means"], graph.neighbours.to(device), c2w) > cfg.pg_facing_threshold
    mirror = graph.mirror.to(device)
    movable = seen.clone()
    if cfg.pg_symmetry_weight > 0:
        has = mirror >= 0
        movable[has] |= seen[mirror[has]]
    mask = movable.to(base["means"].dtype)

    offsets = {
        "sh0": torch.zeros_like(base["sh0"], requires_grad=True),
        "opacities": torch.zeros_like(base["opacities"], requires_grad=True),
        "scales": torch.zeros_like(base["scales"], requires_grad=True),
        "quats": torch.zeros_like(base["quats"], requires_grad=True),
    }
    groups = [{"params": [offsets["sh0"]], "lr": cfg.pg_lr_sh0}, {"params": [offsets["opacities"]], "lr": cfg.pg_lr_opacity},
              {"params": [offsets["scales"]], "lr": cfg.pg_lr_scale}, {"params": [offsets["quats"]], "lr": cfg.pg_lr_rotation}]
    if not keep_view_dependent:
        offsets["shN"] = torch.zeros_like(base["shN"], requires_grad=True)
        groups.append({"params": [offsets["shN"]], "lr": cfg.pg_lr_shN})
    use_pos = cfg.pg_position_bound > 0
    if use_pos:
        offsets["means"] = torch.zeros_like(base["means"], requires_grad=True)
        groups.append({"params": [offsets["means"]], "lr": cfg.pg_lr_position})
    optimizer = torch.optim.Adam(groups)
    priors = {"sh0": cfg.pg_prior_sh0, "opacities": cfg.pg_prior_opacity, "scales": cfg.pg_prior_scale,
              "quats": cfg.pg_prior_rotation, "means": cfg.pg_prior_position, "shN": cfg.pg_prior_shN}
    sym_keys = ("sh0", "opacities", "scales")
    pairs = torch.nonzero((mirror >= 0) & (mirror != torch.arange(n, device=device))).squeeze(1)
    pairs = pairs[pairs < mirror[pairs]]  # each pair once
    left, right = pairs, mirror[pairs]
    nbrs = graph.neighbours.to(device) if cfg.pg_smoothness_weight > 0 else None
    normal = graph.plane_normal.to(device)

    def masked(key: str) -> torch.Tensor:
        d = offsets[key]
        shape = (n,) + (1,) * (d.dim() - 1)
        if key == "means":
            d = cfg.pg_position_bound * torch.tanh(d)
        return d * mask.reshape(shape)

    losses: List[torch.Tensor] = []
    bar = progress(range(cfg.pg_steps), show_progress, desc="fit per-Gaussian", leave=False)
    for _ in bar:
        d = {k: masked(k) for k in offsets}
        current = {k: (base[k] + d[k] if k in d else base[k]) for k in base}
        rgb = render_splats(current, c2w, Ks, width, height, sh_degree=sh_degree, backend=render_backend).rgb
        loss = photometric_loss(rgb, images, cfg.pg_l1_weight, cfg.pg_ssim_weight, cfg.pg_lpips_weight, lpips_model)["total"]
        for key, value in d.items():
            weight = priors[key]
            if weight > 0:
                scaled = value / cfg.pg_position_bound if key == "means" else value
                loss = loss + weight * scaled.pow(2).reshape(n, -1).sum(dim=1).mean()
        if cfg.pg_symmetry_weight > 0 and left.numel():
            sym = sum(_pair_term(d[k][left], d[k][right]) for k in sym_keys)
            if use_pos:  # a reflected offset: flip the component along the plane normal
                dl = d["means"][left]
                dr = d["means"][right]
                dr_reflected = dr - 2.0 * (dr @ normal)[:, None] * normal
                sym = sym + _pair_term(dl, dr_reflected) / cfg.pg_position_bound ** 2
            loss = loss + cfg.pg_symmetry_weight * sym
        if nbrs is not None:
            smooth = 0.0
            for key in sym_keys + (("means",) if use_pos else ()):
                v = d[key] / cfg.pg_position_bound if key == "means" else d[key]
                flat = v.reshape(n, -1)
                smooth = smooth + (flat[:, None, :] - flat[nbrs]).pow(2).sum(dim=-1).mean()
            loss = loss + cfg.pg_smoothness_weight * smooth
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.pg_grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.pg_grad_clip)
        optimizer.step()
        losses.append(loss.detach())
        if on_step is not None:
            with torch.no_grad():
                d = {k: masked(k) for k in offsets}
                on_step(len(losses), {k: (base[k] + d[k] if k in d else base[k]).detach() for k in base})
        if hasattr(bar, "set_postfix") and device.type != "cuda" and len(losses) % 10 == 0:
            bar.set_postfix(loss=f"{float(losses[-1]):.4f}")
    with torch.no_grad():
        d = {k: masked(k) for k in offsets}
        final = {k: (base[k] + d[k] if k in d else base[k]).detach().clone() for k in base}
    return PerGaussianResult(splats=final, initial_splats=base, losses=torch.stack(losses).tolist(), movable=movable,
                             contribution=contribution, seconds=time.perf_counter() - t0)


def offsets_summary(result: PerGaussianResult) -> Dict[str, float]:
    """Mean absolute change per parameter kind, and how many Gaussians could move (for summaries)."""
    out = {f"mean_abs_change_{k}": float((result.splats[k] - result.initial_splats[k]).abs().mean())
           for k in ("sh0", "shN", "opacities", "scales", "quats", "means")}
    out["movable"] = int(result.movable.sum())
    out["num_gaussians"] = int(result.movable.numel())
    return out
