"""Training and fitting objectives: photometric losses, LPIPS loading (offline-safe), the
decoder's delta regularisers and the tracker's point/pose losses.

A leaf module (torch only): trainers, refinement and metrics all import it downward.

Images are [B, H, W, 3] float in 0..1 throughout (channels last, as renders come out).
LPIPS is fed [-1, 1] (``normalize=True``); the original fed [0, 1] (spec §8.2 bug 2).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, Literal, Mapping, Optional

import torch
import torch.nn.functional as F

LPIPS_TRUNK_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
_LPIPS_CACHE: Dict[str, object] = {}


def _to_nchw(image: torch.Tensor) -> torch.Tensor:
    if image.dim() == 3:
        image = image[None]
    return image.permute(0, 3, 1, 2)


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).abs().mean()


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean SSIM (Gaussian window 11, sigma 1.5) of [B,H,W,3] images in 0..1, differentiable."""
    from pytorch_msssim import ssim as _ssim

    return _ssim(_to_nchw(pred), _to_nchw(target), data_range=1.0, size_average=True)


def lpips_trunk_path(net: str) -> Path:
    """Where torch hub keeps the torchvision trunk that LPIPS needs (``$TORCH_HOME/hub/checkpoints``)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_TRUNK_FILES[net]


def load_lpips(net: str = "alex", device="cpu", required: bool = False, quiet: bool = False):
    """An ``lpips.LPIPS`` model with real trunk weights from the torch-hub cache, or None.

    Nothing is downloaded: when the trunk file is absent this prints one line saying which file to put
    where and returns None (or raises ``FileNotFoundError`` when ``required``).
    """
    if net not in LPIPS_TRUNK_FILES:
        raise ValueError(f"lpips net must be one of {sorted(LPIPS_TRUNK_FILES)}, got {net!r}")
    key = f"{net}:{device}"
    if key in _LPIPS_CACHE:
        return _LPIPS_CACHE[key]
    trunk = lpips_trunk_path(net)
    if not trunk.is_file():
        message = (f"LPIPS disabled: trunk weights {trunk.name} not found; put the torchvision file at {trunk} "
                   f"(or set TORCH_HOME) to enable it")
        if required:
            raise FileNotFoundError(message)
        if not quiet:
            print(f"[fastavatar] {message}")
        _LPIPS_CACHE[key] = None
        return None
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    from fastavatar.io.integrity import read_checkpoint

    state = read_checkpoint(trunk)
    # lpips splits torchvision's `features` Sequential into slices but keeps the layer indices.
    trunk_state = {}
    for name, _ in model.net.named_parameters():
        _, index, kind = name.split(".")  # sliceK.I.weight (named under model.net)
        source = f"features.{index}.{kind}"
        if source not in state:
            raise ValueError(f"{trunk}: not a torchvision {net} checkpoint (missing {source})")
        trunk_state[name] = state[source]
    model.net.load_state_dict(trunk_state, strict=True)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    _LPIPS_CACHE[key] = model
    return model


def lpips_distance(model, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean LPIPS of [B,H,W,3] 0..1 images (mapped to [-1, 1] inside, as LPIPS expects)."""
    return model(_to_nchw(pred), _to_nchw(target), normalize=True).mean()


def photometric_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    l1_weight: float = 0.6,
    ssim_weight: float = 0.3,
    lpips_weight: float = 0.1,
    lpips_model=None,
) -> Dict[str, torch.Tensor]:
    """The FastAvatar loss: l1_w·L1 + ssim_w·(1−SSIM) + lpips_w·LPIPS (LPIPS term skipped when
    ``lpips_model`` is None). Returns the parts and ``total``."""
    parts = {"l1": l1_loss(pred, target)}
    total = l1_weight * parts["l1"]
    if ssim_weight > 0:
        parts["ssim"] = 1.0 - ssim(pred, target)
        total = total + ssim_weight * parts["ssim"]
    if lpips_weight > 0 and lpips_model is not None:
        parts["lpips"] = lpips_distance(lpips_model, pred, target)
        total = total + lpips_weight * parts["lpips"]
    parts["total"] = total
    return parts


def delta_regularisers(raw_deltas: Dict[str, torch.Tensor], scale_reg: float, pos_reg: float) -> Dict[str, torch.Tensor]:
    """Pull the decoder's deltas toward zero: scale_reg·mean|Δlog s| + pos_reg·mean|Δμ|.

    The original penalised mean(exp(Δs)), which pushes deltas negative rather than to zero (§8.2).
    """
    out = {}
    if scale_reg > 0:
        out["scale_reg"] = scale_reg * raw_deltas["scales"].abs().mean()
    if pos_reg > 0:
        out["pos_reg"] = pos_reg * raw_deltas["means"].abs().mean()
    return out


# ---------------------------------------------------------------------------- tracker
def tracker_loss(
    pred: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    points_loss: Literal["mse", "l1"] = "mse",
    rotation_loss: Literal["geodesic", "mse"] = "geodesic",
    weights: Optional[Mapping[str, float]] = None,
) -> Dict[str, torch.Tensor]:
    """Released ``EncoderWithLoss`` losses. target: ``points [B,N,3]``, ``rotation_matrix [B,3,3]``,
    ``translation [B,3]``. Returns ``points``, ``rotation``, ``translation``, ``total``
    (weighted sum; default weights 1.0)."""
    w = {"points": 1.0, "rotation": 1.0, "translation": 1.0, **(weights or {})}
    if points_loss == "mse":
        lp = F.mse_loss(pred["points"], target["points"])
    elif points_loss == "l1":
        lp = F.l1_loss(pred["points"], target["points"])
    else:
        raise ValueError(f"unknown points_loss {points_loss!r}")
    r_pred, r_gt = pred["rotation_matrix"], target["rotation_matrix"]
    if rotation_loss == "geodesic":
        lr = geodesic_angle(r_pred, r_gt).mean()
    elif rotation_loss == "mse":
        lr = F.mse_loss(r_pred, r_gt)
    else:
        raise ValueError(f"unknown rotation_loss {rotation_loss!r}")
    lt = F.mse_loss(pred["translation"], target["translation"])
    total = w["points"] * lp + w["rotation"] * lr + w["translation"] * lt
    return {"points": lp, "rotation": lr, "translation": lt, "total": total}


def geodesic_angle(r_pred: torch.Tensor, r_gt: torch.Tensor) -> torch.Tensor:
    """[B,3,3] x2 -> [B] angle (rad) acos((tr(R_pred R_gt^T) - 1)/2), trace clamped to [-1+1e-6, 3-1e-6]."""
    tr = (r_pred * r_gt).sum(dim=(-2, -1))  # = trace(R_pred R_gt^T)
    tr = tr.clamp(-1.0 + 1e-6, 3.0 - 1e-6)
    return torch.acos((tr - 1.0) / 2.0)
