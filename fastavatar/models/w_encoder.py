"""ArcFace embedding -> decoder W (FastAvatar's ``ViewInvariantEncoder``).

Input is the raw 512-d InsightFace ``buffalo_l`` embedding (``face.embedding``, not the
normed one); it is L2-normalised here. Architecture and state-dict names match the released
module (24 keys: ``temperature`` and ``projector.{0,1,4,5,8,9,11}.*`` incl. BatchNorm buffers):

    x̂ = normalize(x)
    projector = Linear(512,1024) BN ReLU Dropout(0.2)   [0-3]
                Linear(1024,768) BN ReLU Dropout(0.2)   [4-7]
                Linear(768,512)  BN ReLU                [8-10]
                Linear(512,512)                         [11]
    W = projector(x̂) * temperature                      (learnable scalar, init 1.0)

Difference from the released code: a training batch of size 1 does not crash. The original
BatchNorm raises "Expected more than 1 value per channel" on a final batch of 1; here such a
batch is normalised with the running statistics (which are then not updated), i.e. it behaves
like eval mode for the BN layers only. Larger batches behave exactly as nn.BatchNorm1d.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class WEncoderConfig:
    in_dim: int = 512  # ArcFace embedding width
    hidden_dims: Tuple[int, ...] = (1024, 768, 512)  # BN-MLP hidden widths
    out_dim: int = 512  # decoder W width
    dropout: float = 0.2  # dropout after the first two hidden blocks

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden_dims"] = list(self.hidden_dims)
        return d


class SafeBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d that uses running statistics for a training batch of one sample
    (instead of raising); same parameters, buffers and names as nn.BatchNorm1d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1 and self.track_running_stats:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, momentum=0.0, eps=self.eps)
        return super().forward(x)


class WEncoder(nn.Module):
    """embedding [B, 512] -> W [B, 512]."""

    def __init__(self, config: Optional[WEncoderConfig] = None):
        super().__init__()
        cfg = config or WEncoderConfig()
        self.config = cfg
        layers = []
        d = cfg.in_dim
        for i, h in enumerate(cfg.hidden_dims):
            layers += [nn.Linear(d, h), SafeBatchNorm1d(h), nn.ReLU()]
            if i < len(cfg.hidden_dims) - 1:
                layers.append(nn.Dropout(cfg.dropout))
            d = h
        layers.append(nn.Linear(d, cfg.out_dim))
        self.projector = nn.Sequential(*layers)
        self.temperature = nn.Parameter(torch.tensor(1.0))
        for m in self.projector:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm1d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @classmethod
    def from_state_dict(cls, model_dict: Mapping[str, torch.Tensor], dropout: float = 0.2,
                        load: bool = True) -> "WEncoder":
        """Build with sizes read from ``model_dict`` and (if ``load``) load it strict."""
        lin = sorted(
            (int(k.split(".")[1]), v.shape)
            for k, v in model_dict.items()
            if k.startswith("projector.") and k.endswith(".weight") and v.dim() == 2
        )
        if not lin or "temperature" not in model_dict:
            raise ValueError("not a W-encoder state dict: no 'temperature' / 'projector.*' Linear weights")
        cfg = WEncoderConfig(
            in_dim=int(lin[0][1][1]),
            hidden_dims=tuple(int(s[0]) for _, s in lin[:-1]),
            out_dim=int(lin[-1][1][0]),
            dropout=dropout,
        )
        model = cls(cfg)
        if load:
            model.load_state_dict(model_dict, strict=True)
        return model

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """embedding [B, in_dim] (raw ArcFace, any norm) -> W [B, out_dim]."""
        if embedding.dim() == 1:
            embedding = embedding.unsqueeze(0)
        x = F.normalize(embedding.to(self.temperature.dtype), dim=1)
        return self.projector(x) * self.temperature
