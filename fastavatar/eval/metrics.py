"""Image-quality metrics: PSNR, SSIM, LPIPS per view, with optional foreground masks.

Images are [H, W, 3] float 0..1. With a mask [H, W, 1]: PSNR is the mean squared error over
mask-weighted pixels; SSIM and LPIPS compare both images composited onto white with the mask
(so background pixels agree by construction and do not inflate the score).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from fastavatar.losses import lpips_distance, ssim


@torch.no_grad()
def psnr(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    err = (pred.float() - target.float()) ** 2
    if mask is not None:
        weight = mask.float().expand_as(err)
        mse = (err * weight).sum() / weight.sum().clamp_min(1e-8)
    else:
        mse = err.mean()
    return float(10.0 * math.log10(1.0 / max(float(mse), 1e-12)))


@torch.no_grad()
def image_metrics(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
                  lpips_model=None) -> Dict[str, Optional[float]]:
    """{psnr, ssim, lpips} for one view; lpips is None when no LPIPS model is available."""
    pred = pred.float().clamp(0, 1)
    target = target.float().clamp(0, 1)
    out = {"psnr": psnr(pred, target, mask)}
    if mask is not None:
        pred_c = pred * mask + (1 - mask)
        target_c = target * mask + (1 - mask)
    else:
        pred_c, target_c = pred, target
    out["ssim"] = float(ssim(pred_c[None], target_c[None]))
    out["lpips"] = float(lpips_distance(lpips_model, pred_c[None], target_c[None])) if lpips_model is not None else None
    return out


def mean_metrics(rows: List[Dict[str, Optional[float]]]) -> Dict[str, Optional[float]]:
    """Average each metric over views (None when any view lacks it)."""
    if not rows:
        return {}
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float)) or rows[0][k] is None]
    out = {}
    for key in keys:
        values = [r.get(key) for r in rows]
        out[key] = None if any(v is None for v in values) else float(sum(values) / len(values))
    return out
