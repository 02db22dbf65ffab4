"""A synthetic tracked video of a bundled head with expression-dependent colour that FLAME lacks.

Head: subject 306's 10144 points3D as Gaussians (the template's count), bound to the tiny test
FLAME (:mod:`flame_fixtures`, 3 expression bases) by nearest triangle; its analytic rig is the
"known rig". Truth = that rig plus planted per-basis SH-DC colour deltas: basis 0 reddens the
lower half of the head, basis 1 darkens and blues the upper half, basis 2 has none (a control),
each inside its FLAME mask. Frames: random expressions (unit variance), a little jaw and head
motion, one fixed camera; rendered with our renderer (SH degree 0, black background).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List

import torch

from fastavatar.animate import build_rig, evaluate_rig
from fastavatar.animate.learn import basis_masks
from fastavatar.core.cameras import look_at_c2w
from fastavatar.render import render_splats
from flame_fixtures import make_tiny_flame

NUM_EXPR = 3


@dataclass
class SyntheticVideo:
    rig: object  # analytic Rig (float32)
    planted_dsh0: torch.Tensor  # [K, N, 3] colour deltas of the truth
    params: List[Dict[str, torch.Tensor]]  # per-frame driving parameters
    images: List[torch.Tensor]  # [H, W, 3] truth colour (render / alpha, as a matted video frame)
    masks: List[torch.Tensor]  # [H, W, 1] truth alpha (the "segmentation")
    c2w: torch.Tensor  # [4, 4]
    K: torch.Tensor  # [3, 3]
    model: object  # the tiny FlameModel
    splats: dict  # the head as reconstructed (rest pose)


def head_splats(data_root) -> dict:
    from fastavatar.data import SubjectParser

    pts = SubjectParser(data_root / "306", expected_points=None).points.float()
    n = pts.shape[0]
    sh0 = torch.stack([torch.sin(pts[:, 0] * 40), torch.cos(pts[:, 1] * 30), torch.sin(pts[:, 2] * 35 + 1)], -1)[:, None] * 0.8
    return {"means": pts.clone(), "quats": torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
            "scales": torch.full((n, 3), math.log(0.005)), "opacities": torch.full((n,), 3.0),
            "sh0": sh0, "shN": torch.zeros(n, 15, 3)}


def planted_colour_deltas(rig) -> torch.Tensor:
    y = rig.rest["means"][:, 1]
    masks = basis_masks(rig.expr_dmeans, 0.02, 0.2)
    out = torch.zeros(rig.num_expr, rig.num_gaussians, 3)
    out[0] = torch.sigmoid(-y * 60)[:, None] * torch.tensor([1.0, -0.6, -0.6]) * masks[0][:, None]
    out[1] = torch.sigmoid(y * 60)[:, None] * torch.tensor([-0.8, -0.8, 0.5]) * masks[1][:, None]
    return out


def render_truth(rig, dsh0, params, c2w, K, width, height):
    """Truth render of one frame: the analytic rig's geometry, sh0 + sum_k psi_k dsh0_k (independent of the
    learned-rig code under test)."""
    splats = evaluate_rig(rig, params)
    psi = params["expr"].reshape(-1)[: rig.num_expr]
    splats["sh0"] = rig.rest["sh0"] + torch.einsum("k,knc->nc", psi, dsh0)[:, None]
    out = render_splats(splats, c2w, K, width, height, sh_degree=0, background=(0.0, 0.0, 0.0), backend="torch")
    return out.rgb[0], out.alpha[0]


def synthetic_video(data_root, num_frames: int = 40, size: int = 48, seed: int = 5) -> SyntheticVideo:
    model = make_tiny_flame()
    splats = head_splats(data_root)
    rig = build_rig(model, splats, {}, num_expr=NUM_EXPR, rest_mode="mesh").to(torch.float32)
    dsh0 = planted_colour_deltas(rig)
    c2w = look_at_c2w(torch.tensor([0.0, 0.0, 0.7]), torch.tensor([0.0, -0.01, -0.01]), torch.tensor([0.0, 1.0, 0.0]))
    K = torch.tensor([[size * 2.6, 0, size / 2], [0, size * 2.6, size / 2], [0, 0, 1]])
    g = torch.Generator().manual_seed(seed)
    params, images, masks = [], [], []
    for _ in range(num_frames):
        p = {"expr": torch.randn(1, NUM_EXPR, generator=g), "jaw_pose": torch.rand(1, 3, generator=g) * torch.tensor([[0.15, 0, 0]]),
             "rotation": torch.randn(1, 3, generator=g) * 0.08, "neck_pose": torch.zeros(1, 3), "eyes_pose": torch.zeros(1, 6),
             "translation": torch.zeros(1, 3)}
        with torch.no_grad():
            rgb, alpha = render_truth(rig, dsh0, p, c2w, K, size, size)
        params.append(p)
        images.append((rgb / alpha.clamp_min(1e-6)).clamp(0, 1))  # a matted frame: colour, and alpha as mask
        masks.append(alpha)
    return SyntheticVideo(rig, dsh0, params, images, masks, c2w, K, model, splats)


def visible_gaussians(rig, c2w, K, size: int, fraction: float = 0.05) -> torch.Tensor:
    """[N] bool: Gaussians whose colour reaches the frontal image with at least ``fraction`` of the largest
    per-Gaussian blending weight (d sum(rgb) / d sh0), i.e. those a monocular video can constrain."""
    splats = {k: v.detach().clone() for k, v in evaluate_rig(rig, {}).items()}
    splats["sh0"].requires_grad_(True)
    out = render_splats(splats, c2w, K, size, size, sh_degree=0, background=(0.0, 0.0, 0.0), backend="torch")
    out.rgb.sum().backward()
    weight = splats["sh0"].grad.abs().sum((1, 2))
    return weight > fraction * weight.max()
