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

Networks only. The pretrained backbone file is read by
:func:`fastavatar.io.checkpoints.tracker.load_backbone_weights`, the input photo prepared by
:func:`fastavatar.face.tracker_input.preprocess_for_tracker`, and the losses are
:func:`fastavatar.losses.tracker_loss`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastavatar import NUM_TEMPLATE_GAUSSIANS
from fastavatar.models.vit import DinoVisionTransformer, ViTConfig
from fastavatar.core.rotations import quat_to_matrix

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
        """images [B,3,224,224] ImageNet-normalised (see :func:`fastavatar.face.tracker_input.preprocess_for_tracker`)."""
        return self.encoder(images)

    def set_mean_shape(self, mean_shape: torch.Tensor) -> None:
        """Overwrite the ``mean_shape`` buffer ([N,3]), as the released loader does from metadata.json."""
        ms = torch.as_tensor(mean_shape, dtype=self.encoder.mean_shape.dtype).reshape(-1, 3)
        if ms.shape != self.encoder.mean_shape.shape:
            raise ValueError(f"mean_shape has shape {tuple(ms.shape)}, expected {tuple(self.encoder.mean_shape.shape)}")
        with torch.no_grad():
            self.encoder.mean_shape.copy_(ms.to(self.encoder.mean_shape.device))


__all__ = ["DinoPointPoseEncoder", "DinoTracker", "TrackerConfig", "rotation_6d_to_matrix"]
