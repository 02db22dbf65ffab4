"""Learned Gaussian blendshapes (GaussianBlendshapes, SIGGRAPH 2024): the model and its loss.

The model is a neutral set of N Gaussians plus, for each of K FLAME expression bases, a delta of
every Gaussian's position, rotation (rotation vector), per-axis log-scale, SH DC colour and opacity
logit. Per frame with expression coefficients psi (spec: gaussian-blendshapes.md §1, in our rig's
conventions, :mod:`fastavatar.animate.blendshapes`):

    x = x0 + sum_k psi_k dx_k + P(theta) posedirs        q = exp(sum_k psi_k dr_k) ⊗ q0
    l = l0 + sum_k psi_k dl_k      c = c0 + sum_k psi_k dc_k      o = o0 + sum_k psi_k do_k

then FLAME's linear blend skinning with per-Gaussian joint weights and expression-dependent joints.
Each delta is ``init_k + m_k ⊙ res_k``: ``init`` is the FLAME-mesh-derived (analytic) blendshape
of :func:`fastavatar.animate.build_rig` (zero for colour and opacity, which FLAME has no notion
of), ``res`` is learned, and ``m_k`` [N] is the per-Gaussian mask of basis k (the paper's
semantic link to the mesh): 1 where FLAME's basis k moves the Gaussian, 0 where it does not, so
learned appearance changes stay where the expression acts. Masks here are a ramp of the analytic
displacement |init_dx_k| between ``mask_low`` and ``mask_high`` times basis k's largest
displacement (the paper uses the same ramp with constants from two FLAME 2020 bases, which do not
transfer to other FLAME files or to the test model).

Mouth interior and teeth, as the paper: teeth are separate Gaussians that move rigidly, upper
with the head and lower with the jaw. In our FLAME(+VHAP teeth) layout the Gaussians bound to the
teeth triangles already do exactly that through their skinning (upper teeth -> neck joint,
lower -> jaw), their masks are 0 (the teeth have no expression basis), and a bounding loss (the
paper's cylinder, here a ball of ``teeth_radius`` around each tooth Gaussian's initial rest
position) keeps them inside the mouth.

Losses (the paper's): ``0.8 L1 + 0.2 (1 - SSIM)`` on the masked frame against the render on the
same background, ``alpha_weight * mean((alpha - mask)^2)``, plus ``reg_weight * mean(res^2)``
per attribute (the deltas stay near the FLAME-derived ones).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict

import torch
import torch.nn as nn

from fastavatar.animate.rig import Rig
from fastavatar.config import option
from fastavatar.core.splats import SPLAT_KEYS, Splats

DELTA_NAMES = ("dmeans", "drotvecs", "dlog_scales", "dsh0", "dopacities")  # learned per-basis deltas
DELTA_WIDTH = {"dmeans": 3, "drotvecs": 3, "dlog_scales": 3, "dsh0": 3, "dopacities": 1}


@dataclass
class BlendshapeModelConfig:
    """The learned model's masks, teeth handling and loss weights."""

    mask_low: float = option(0.02, "mask 0 below this fraction of basis k's largest analytic displacement")
    mask_high: float = option(0.2, "mask 1 above this fraction (linear ramp in between)")
    l1_weight: float = option(0.8, "photometric L1 weight (the paper: 0.8)")
    ssim_weight: float = option(0.2, "1 - SSIM weight (the paper: 0.2)")
    alpha_weight: float = option(10.0, "weight of mean((rendered alpha - mask)^2) (the paper: 10)")
    reg_dmeans: float = option(1e3, "weight of mean(residual^2) of the position deltas (m^2 per unit coefficient)")
    reg_drotvecs: float = option(1.0, "... of the rotation-vector deltas (rad^2)")
    reg_dlog_scales: float = option(1.0, "... of the log-scale deltas")
    reg_dsh0: float = option(1e-3, "... of the SH DC colour deltas (weak: colour change is what FLAME lacks)")
    reg_dopacities: float = option(1e-3, "... of the opacity-logit deltas")
    teeth_radius: float = option(0.01, "metres; teeth Gaussians are pulled back inside this ball around their start")
    teeth_weight: float = option(100.0, "weight of the teeth bounding loss (the paper's cylinder loss: 100)")


def basis_masks(init_dmeans: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """[K, N, 3] analytic position deltas -> [K, N] masks in 0..1 (ramp of |delta| / max_i |delta_k|)."""
    length = init_dmeans.norm(dim=-1)  # [K, N]
    top = length.amax(dim=1, keepdim=True).clamp_min(1e-12)
    return ((length / top - low) / max(high - low, 1e-12)).clamp(0.0, 1.0)


def _init_deltas(rig: Rig) -> Dict[str, torch.Tensor]:
    """The rig's per-basis deltas in the learned layout (broadcast isotropic log-scales; zero colour/opacity
    deltas when the rig has none, i.e. an analytic rig)."""
    k, n = rig.num_expr, rig.num_gaussians
    like = rig.expr_dmeans
    dlog = rig.expr_dlog_scales
    dlog = dlog[..., None].expand(k, n, 3) if dlog.dim() == 2 else dlog
    dsh0 = getattr(rig, "expr_dsh0", None)
    dop = getattr(rig, "expr_dopacities", None)
    return {
        "dmeans": rig.expr_dmeans,
        "drotvecs": rig.expr_drotvecs,
        "dlog_scales": dlog,
        "dsh0": torch.zeros(k, n, 3, dtype=like.dtype) if dsh0 is None else dsh0,
        "dopacities": torch.zeros(k, n, 1, dtype=like.dtype) if dop is None else dop.reshape(k, n, 1),
    }


class BlendshapeModel(nn.Module):
    """Neutral Gaussians + masked learned per-basis deltas on top of a rig's skinning (see module doc).

    Parameters: ``rest_<key>`` for the six raw splat keys and ``res_<delta>`` [K, N, w] (start at 0).
    Buffers: ``init_<delta>`` [K, N, w] (FLAME-derived), ``masks`` [K, N], ``teeth`` [N] bool and
    ``teeth_start`` [T, 3]. The rig's skinning, joints and pose correctives are held fixed.
    """

    def __init__(self, rig: Rig, cfg: BlendshapeModelConfig = BlendshapeModelConfig()):
        super().__init__()
        self.cfg = cfg
        self.base = rig.to(torch.float32)
        for key in SPLAT_KEYS:
            self.register_parameter(f"rest_{key}", nn.Parameter(self.base.rest[key].detach().clone()))
        for name, value in _init_deltas(self.base).items():
            self.register_buffer(f"init_{name}", value.detach().float().clone())
            self.register_parameter(f"res_{name}", nn.Parameter(torch.zeros_like(value, dtype=torch.float32)))
        masks = basis_masks(self.init_dmeans, cfg.mask_low, cfg.mask_high)
        teeth = rig.triangle_ids >= rig.faces.shape[0] - rig.num_teeth_faces  # bound to a teeth triangle
        masks[:, teeth] = 0.0
        self.register_buffer("masks", masks)
        self.register_buffer("teeth", teeth)
        self.register_buffer("teeth_start", self.base.rest["means"][teeth].detach().clone())

    @property
    def num_expr(self) -> int:
        return int(self.masks.shape[0])

    def rest(self) -> Splats:
        return {key: getattr(self, f"rest_{key}") for key in SPLAT_KEYS}

    def deltas(self) -> Dict[str, torch.Tensor]:
        """Per-basis deltas ``init + mask * res``, each [K, N, w]."""
        m = self.masks[..., None]
        return {name: getattr(self, f"init_{name}") + m * getattr(self, f"res_{name}") for name in DELTA_NAMES}

    def to_rig(self) -> Rig:
        """The learned rig (detached, float32): same binding, skinning and joints, learned rest and deltas."""
        with torch.no_grad():
            return self._rig({k: v.detach().clone() for k, v in self.rest().items()},
                             {k: v.detach().clone() for k, v in self.deltas().items()})

    def _rig(self, rest: Splats, deltas: Dict[str, torch.Tensor]) -> Rig:
        k, n = self.num_expr, self.masks.shape[1]
        return replace(self.base, rest=rest, kind="learned", expr_dmeans=deltas["dmeans"],
                       expr_drotvecs=deltas["drotvecs"], expr_dlog_scales=deltas["dlog_scales"],
                       expr_dsh0=deltas["dsh0"], expr_dopacities=deltas["dopacities"].reshape(k, n))

    def forward(self, params: Dict[str, torch.Tensor]) -> Splats:
        """Raw splats for one frame of driving parameters (differentiable in every parameter)."""
        from fastavatar.animate.blendshapes import evaluate_rig_reference

        return evaluate_rig_reference(self._rig(self.rest(), self.deltas()), params)

    def regularisers(self) -> Dict[str, torch.Tensor]:
        """Weighted regularisers: mean squared residual per delta kind, and the teeth bounding loss."""
        cfg = self.cfg
        out = {f"reg_{name}": getattr(cfg, f"reg_{name}") * getattr(self, f"res_{name}").pow(2).mean()
               for name in DELTA_NAMES}
        if bool(self.teeth.any()):
            dist = (self.rest_means[self.teeth] - self.teeth_start).norm(dim=-1)
            out["teeth"] = cfg.teeth_weight * torch.relu(dist - cfg.teeth_radius).pow(2).mean()
        return out


def photometric_terms(rgb: torch.Tensor, alpha: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                      background: torch.Tensor, cfg: BlendshapeModelConfig) -> Dict[str, torch.Tensor]:
    """The paper's image loss for one frame.

    rgb [H,W,3] rendered on ``background`` [3]; alpha [H,W,1]; target [H,W,3] and mask [H,W,1] in 0..1.
    The target is composited onto the same background with the mask, so the head is compared and
    the background must stay empty (the alpha term). Returns weighted terms (sum them for the loss).
    """
    from fastavatar.losses import ssim

    gt = target * mask + background * (1 - mask)
    out = {"l1": cfg.l1_weight * (rgb - gt).abs().mean(),
           "alpha": cfg.alpha_weight * (alpha - mask).pow(2).mean()}
    if cfg.ssim_weight > 0:
        out["ssim"] = cfg.ssim_weight * (1 - ssim(rgb[None], gt[None]))
    return out


__all__ = ["BlendshapeModel", "BlendshapeModelConfig", "DELTA_NAMES", "basis_masks", "photometric_terms"]
