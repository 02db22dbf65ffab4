"""Single-image point + camera-pose tracker (FastAvatar's ``DINOv2Encoder`` in ``EncoderWithLoss``).

A DINOv2 ViT (our own :mod:`fastavatar.models.vit`, no torch.hub) encodes the
ImageNet-normalised 224x224 image; from the CLS token two MLP heads regress

* ``points [B,N,3]`` = (mean_shape + learn_mean_shape) + 0.1 * points_projector(cls)
  (N = 10144 FLAME+teeth face centroids), and
* the camera pose: 6D rotation (Gram-Schmidt, basis vectors stacked as **rows**, as the
  released code) + translation -> ``camera_pose [B,4,4]`` camera-to-world (OpenCV).

:class:`DinoTracker` is the wrapper whose state dict has the released ``encoder.`` prefix
(205 keys: ``encoder.dino.*`` backbone, ``encoder.points_projector.*``,
``encoder.pose_projector.*``, ``encoder.mean_shape`` buffer, ``encoder.learn_mean_shape``
parameter), so the released ``dino_encoder.pth`` ``model_state_dict`` loads strict.

Pretrained backbone: :meth:`DinoTracker.load_backbone_weights` reads the user-supplied
``pretrained_weights/dinov2_vitb14_pretrain.pth`` (facebookresearch/dinov2 names); nothing is
downloaded.

Image preprocessing (:func:`preprocess_for_tracker`): the released code squashes the whole
photo to 224x224 (bilinear, aspect ratio not kept) before ImageNet normalisation. The released
weights were trained on such squashed images, so ``mode="squash"`` is the default;
``mode="pad"`` letterboxes onto white to keep the aspect ratio (better for new training runs,
but it changes the input distribution seen by the released weights).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Literal, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastavatar import NUM_TEMPLATE_GAUSSIANS
from fastavatar.models.vit import VIT_PRESETS, DinoVisionTransformer, ViTConfig
from fastavatar.rotations import quat_to_matrix

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRACKER_INPUT_SIZE = 224
BACKBONE_WEIGHTS_NAME = "dinov2_vitb14_pretrain.pth"


@dataclass
class TrackerConfig:
    dino_model: str = "dinov2_vitb14"  # backbone preset (s/b/l 14); ignored when ``vit`` is given
    vit: Optional[ViTConfig] = None  # explicit backbone config (tests use a tiny one)
    max_points: int = NUM_TEMPLATE_GAUSSIANS  # number of regressed points
    hidden_dim: int = 1024  # head MLP width
    num_layers: int = 3  # hidden blocks per head
    dropout: float = 0.1  # head dropout (released inference uses 0.0)
    use_rotation_6d: bool = True  # 6D rotation (9 pose outputs) or quaternion wxyz (7)
    predict_point_residuals: bool = True  # points = mean shape + 0.1 * head, else head directly
    point_residual_scale: float = 0.1  # residual scale (released: 0.1)
    freeze_dino: bool = False  # stop gradients into the backbone

    def backbone_config(self) -> ViTConfig:
        return self.vit if self.vit is not None else ViTConfig.preset(self.dino_model)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "TrackerConfig":
        d = dict(d)
        vit = d.pop("vit", None)
        known = {f for f in cls.__dataclass_fields__}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        if vit is not None:
            cfg.vit = vit if isinstance(vit, ViTConfig) else ViTConfig(**vit)
        return cfg


def _build_projector(in_dim: int, hidden: int, out_dim: int, num_layers: int, dropout: float) -> nn.Sequential:
    """num_layers x [Linear, LayerNorm, ReLU, Dropout (not after the last block)] + Linear(out).
    With num_layers=3: indices 0..11 as released."""
    layers = []
    d = in_dim
    for i in range(num_layers):
        layers += [nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.ReLU()]
        if i < num_layers - 1:
            layers.append(nn.Dropout(dropout))
        d = hidden
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


def rotation_6d_to_matrix(d6: torch.Tensor) -> torch.Tensor:
    """[...,6] -> [...,3,3]. Gram-Schmidt of (a1, a2); b1, b2, b3 = b1 x b2 stacked as rows."""
    a1, a2 = d6[..., :3], d6[..., 3:6]
    b1 = F.normalize(a1, dim=-1)
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-2)


class DinoPointPoseEncoder(nn.Module):
    """The released ``DINOv2Encoder``: image -> points + camera pose."""

    def __init__(self, config: TrackerConfig):
        super().__init__()
        self.config = config
        n = config.max_points
        # Registration order reproduces the released state_dict order.
        self.learn_mean_shape = nn.Parameter(torch.zeros(n, 3))
        self.register_buffer("mean_shape", torch.zeros(n, 3))
        self.dino = DinoVisionTransformer(config.backbone_config())
        feat = self.dino.embed_dim
        pose_dim = 9 if config.use_rotation_6d else 7
        self.points_projector = _build_projector(feat, config.hidden_dim, n * 3, config.num_layers, config.dropout)
        self.pose_projector = _build_projector(feat, config.hidden_dim, pose_dim, config.num_layers, config.dropout)
        if config.freeze_dino:
            self.dino.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """images [B,3,H,W] ImageNet-normalised -> dict:
        ``points [B,N,3]``, ``camera_pose [B,4,4]`` (c2w), ``camera_pose_flat [B,12]``,
        ``rotation_matrix [B,3,3]``, ``translation [B,3]``, ``features [B,D]`` (CLS)."""
        if self.config.freeze_dino:
            with torch.no_grad():
                cls = self.dino.forward_features(images)["x_norm_clstoken"]
        else:
            cls = self.dino.forward_features(images)["x_norm_clstoken"]  # [B, D]
        b = cls.shape[0]
        p = self.pose_projector(cls)
        if self.config.use_rotation_6d:
            rot = rotation_6d_to_matrix(p[:, :6])
            t = p[:, 6:9]
        else:
            rot = quat_to_matrix(p[:, :4])
            t = p[:, 4:7]
        pose = torch.zeros(b, 4, 4, dtype=p.dtype, device=p.device)
        pose[:, :3, :3] = rot
        pose[:, :3, 3] = t
        pose[:, 3, 3] = 1.0
        head = self.points_projector(cls).view(b, -1, 3)
        if self.config.predict_point_residuals:
            points = (self.mean_shape + self.learn_mean_shape)[None] + self.config.point_residual_scale * head
        else:
            points = head
        return {
            "points": points,
            "camera_pose": pose,
            "camera_pose_flat": pose[:, :3, :].reshape(b, 12),
            "rotation_matrix": rot,
            "translation": t,
            "features": cls,
        }


class DinoTracker(nn.Module):
    """Wrapper with the released ``EncoderWithLoss`` key prefix (``encoder.``)."""

    def __init__(self, config: Optional[TrackerConfig] = None):
        super().__init__()
        self.config = config or TrackerConfig()
        self.encoder = DinoPointPoseEncoder(self.config)

    @property
    def backbone(self) -> DinoVisionTransformer:
        return self.encoder.dino

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """images [B,3,224,224] ImageNet-normalised (see :func:`preprocess_for_tracker`)."""
        return self.encoder(images)

    def set_mean_shape(self, mean_shape: torch.Tensor) -> None:
        """Overwrite the ``mean_shape`` buffer ([N,3]), as the released loader does from metadata.json."""
        ms = torch.as_tensor(mean_shape, dtype=self.encoder.mean_shape.dtype).reshape(-1, 3)
        if ms.shape != self.encoder.mean_shape.shape:
            raise ValueError(f"mean_shape has shape {tuple(ms.shape)}, expected {tuple(self.encoder.mean_shape.shape)}")
        with torch.no_grad():
            self.encoder.mean_shape.copy_(ms.to(self.encoder.mean_shape.device))

    def load_backbone_weights(self, path: Union[str, os.PathLike]) -> None:
        """Load a facebookresearch/dinov2 backbone file (e.g. ``dinov2_vitb14_pretrain.pth``) strict."""
        load_backbone_weights(self.backbone, path)


def load_backbone_weights(backbone: DinoVisionTransformer, path: Union[str, os.PathLike]) -> None:
    """Load DINOv2-named weights into ``backbone``; clear error when the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"DINOv2 backbone weights not found: {path} — download {BACKBONE_WEIGHTS_NAME} "
            f"(facebookresearch/dinov2 ViT-B/14) and put it in pretrained_weights/ (see pretrained_weights/README.md)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if isinstance(state, dict) and any(k.startswith("encoder.dino.") for k in state):
        state = {k[len("encoder.dino."):]: v for k, v in state.items() if k.startswith("encoder.dino.")}
    from fastavatar.checkpoints import check_state_dict  # local import: checkpoints imports this module

    check_state_dict(backbone, state, path, "DINOv2 backbone")
    backbone.load_state_dict(state, strict=True)


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


def preprocess_for_tracker(
    image, mode: Literal["squash", "pad"] = "squash", size: int = TRACKER_INPUT_SIZE
) -> torch.Tensor:
    """Photo -> tracker input [3,size,size], ImageNet-normalised.

    Args:
        image: HxWx3 uint8 (0..255) or float (0..1) array / tensor, RGB, or a PIL image.
        mode: ``"squash"`` resizes the whole image to size x size ignoring the aspect ratio
            (released behaviour, matches the released weights); ``"pad"`` first letterboxes
            onto a white square (aspect preserved).
    """
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL image
        image = image.convert("RGB")
    if not isinstance(image, torch.Tensor):
        image = torch.from_numpy(np.array(image))  # copy: works for read-only arrays too
    x = image
    if x.dim() != 3 or x.shape[-1] not in (3, 4):
        raise ValueError(f"expected an HxWx3 image, got shape {tuple(x.shape)}")
    x = x[..., :3]
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    else:
        x = x.float()
    x = x.permute(2, 0, 1)  # [3,H,W]
    if mode == "pad":
        h, w = x.shape[1:]
        s = max(h, w)
        canvas = torch.ones(3, s, s, dtype=x.dtype)
        top, left = (s - h) // 2, (s - w) // 2
        canvas[:, top : top + h, left : left + w] = x
        x = canvas
    elif mode != "squash":
        raise ValueError(f"unknown preprocessing mode {mode!r}; use 'squash' or 'pad'")
    # PIL's bilinear resize (released code) filters when downsampling: antialias=True matches it.
    x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    x = x.clamp(0.0, 1.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def read_tracker_sidecars(checkpoint_path: Union[str, os.PathLike]) -> dict:
    """Optional ``metadata.json`` / ``args.json`` of a released tracker checkpoint.

    The released loader looks in ``Path(ckpt).parent.parent``; we also look beside the
    checkpoint (first). Returns config overrides (``max_points``, ``dino_model``,
    ``use_rotation_6d``, ``predict_point_residuals``, ``hidden_dim``, ``num_layers``) plus
    ``mean_shape`` (list) when present; {} when no sidecar exists.
    """
    p = Path(checkpoint_path)
    out: dict = {}
    for name, keys in (
        ("metadata.json", ("max_points", "dino_model", "use_rotation_6d", "predict_point_residuals", "mean_shape")),
        ("args.json", ("hidden_dim", "num_layers")),
    ):
        for folder in (p.parent, p.parent.parent):
            f = folder / name
            if f.is_file():
                try:
                    data = json.loads(f.read_text())
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}: invalid JSON ({e})") from None
                out.update({k: data[k] for k in keys if k in data and data[k] is not None})
                break
    return out


def infer_tracker_config(state: Mapping[str, torch.Tensor], base: Optional[TrackerConfig] = None) -> TrackerConfig:
    """Sizes of a tracker from an ``encoder.``-prefixed state dict (backbone, heads, N)."""
    cfg = TrackerConfig.from_dict(asdict(base)) if base is not None else TrackerConfig()
    pre = "encoder.dino."
    if f"{pre}cls_token" not in state or "encoder.points_projector.0.weight" not in state:
        raise ValueError("not a tracker state dict: no 'encoder.dino.cls_token' / 'encoder.points_projector.*'")
    dim = int(state[f"{pre}cls_token"].shape[-1])
    depth = len({k.split(".")[3] for k in state if k.startswith(f"{pre}blocks.")})
    patch = int(state[f"{pre}patch_embed.proj.weight"].shape[-1])
    grid = int(round((state[f"{pre}pos_embed"].shape[1] - 1) ** 0.5))
    mlp_hidden = int(state[f"{pre}blocks.0.mlp.fc1.weight"].shape[0]) if depth else 4 * dim
    preset = {v[0]: v for v in VIT_PRESETS.values()}
    old = cfg.vit
    heads = old.num_heads if (old is not None and old.embed_dim == dim) else (
        preset[dim][2] if dim in preset else max(1, dim // 64))
    cfg.vit = ViTConfig(
        img_size=grid * patch, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
        mlp_ratio=mlp_hidden / dim,
    )
    pts = sorted(int(k.split(".")[2]) for k in state
                 if k.startswith("encoder.points_projector.") and k.endswith(".weight")
                 and state[k].dim() == 2)
    cfg.hidden_dim = int(state["encoder.points_projector.0.weight"].shape[0])
    cfg.num_layers = len(pts) - 1
    cfg.max_points = int(state[f"encoder.points_projector.{pts[-1]}.weight"].shape[0]) // 3
    pose_out = int(state[f"encoder.pose_projector.{pts[-1]}.weight"].shape[0]) if \
        f"encoder.pose_projector.{pts[-1]}.weight" in state else 9
    cfg.use_rotation_6d = pose_out == 9
    return cfg


__all__ = [
    "BACKBONE_WEIGHTS_NAME",
    "DinoPointPoseEncoder",
    "DinoTracker",
    "TrackerConfig",
    "geodesic_angle",
    "infer_tracker_config",
    "load_backbone_weights",
    "preprocess_for_tracker",
    "read_tracker_sidecars",
    "rotation_6d_to_matrix",
    "tracker_loss",
]
