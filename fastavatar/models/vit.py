"""A DINOv2-compatible Vision Transformer (ViT-S/B/L with patch 14), written from scratch.

Parameter names follow facebookresearch/dinov2 ``DinoVisionTransformer`` with
``block_chunks=0`` and no register tokens, so that

* a user-supplied ``dinov2_vitb14_pretrain.pth`` loads with ``strict=True``, and
* the backbone part (``encoder.dino.*``) of the released ``dino_encoder.pth`` loads unchanged.

Names (ViT-B): ``cls_token [1,1,768]``, ``pos_embed [1,1370,768]`` (1 + 37^2 for 518-px
pretraining), ``mask_token [1,768]`` (unused at inference, kept for key compatibility),
``patch_embed.proj`` (Conv2d k=s=14), ``blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,
mlp.fc1,mlp.fc2,ls2.gamma}``, ``norm``.

Positional-embedding interpolation matches DINOv2's released behaviour: bicubic, no
antialias, and the "interpolate offset" kludge (scale factor ``(grid + 0.1) / M`` passed to
``F.interpolate`` instead of an output size). timm's ``vit_base_patch14_dinov2`` uses an output
size and ``antialias=True`` instead, so the two agree exactly only at the native grid
(518 px); at 224 px they differ slightly (see tests/test_tracker.py).

No network access, no torch.hub: weights come only from files the user supplies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# name -> (embed_dim, depth, num_heads); all use patch 14, mlp_ratio 4, head dim 64.
VIT_PRESETS: Dict[str, tuple] = {
    "dinov2_vits14": (384, 12, 6),
    "dinov2_vitb14": (768, 12, 12),
    "dinov2_vitl14": (1024, 24, 16),
}


@dataclass
class ViTConfig:
    img_size: int = 518  # pretraining resolution; sets the pos_embed grid (518/14 = 37)
    patch_size: int = 14  # patch side in pixels
    embed_dim: int = 768  # token width
    depth: int = 12  # number of transformer blocks
    num_heads: int = 12  # attention heads (head dim = embed_dim / num_heads)
    mlp_ratio: float = 4.0  # MLP hidden width = embed_dim * mlp_ratio
    layerscale_init: float = 1.0  # LayerScale gamma init (DINOv2 hub models: 1.0)
    interpolate_offset: float = 0.1  # DINOv2's scale-factor kludge; 0 -> interpolate to an exact size
    interpolate_antialias: bool = False  # DINOv2 default: no antialias when resizing pos_embed
    norm_eps: float = 1e-6  # LayerNorm epsilon

    @classmethod
    def preset(cls, name: str) -> "ViTConfig":
        if name not in VIT_PRESETS:
            raise ValueError(f"unknown DINOv2 model {name!r}; supported: {sorted(VIT_PRESETS)}")
        dim, depth, heads = VIT_PRESETS[name]
        return cls(embed_dim=dim, depth=depth, num_heads=heads)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,3,H,W] -> [B, H/p * W/p, D]
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, T, hd]
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(hd)) v
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as DINOv2
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale: x += ls1(attn(norm1 x)); x += ls2(mlp(norm2 x))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.attn = Attention(d, cfg.num_heads)
        self.ls1 = LayerScale(d, cfg.layerscale_init)
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.ls2 = LayerScale(d, cfg.layerscale_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    """ViT backbone with DINOv2 parameter names; ``forward_features`` returns a dict."""

    def __init__(self, cfg: Optional[ViTConfig] = None):
        super().__init__()
        cfg = cfg or ViTConfig()
        self.cfg = cfg
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"img_size {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}")
        d = cfg.embed_dim
        grid = cfg.img_size // cfg.patch_size
        self.patch_size = cfg.patch_size
        self.embed_dim = d
        # Registration order reproduces DINOv2's state_dict order (own params first).
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        self.patch_embed = PatchEmbed(cfg.patch_size, 3, d)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.head = nn.Identity()  # no parameters: matches DINOv2's Identity head
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, num_patches: int, h: int, w: int) -> torch.Tensor:
        """Resize ``pos_embed`` to an ``h x w`` pixel input -> [1, 1 + (h/p)(w/p), D]."""
        pos = self.pos_embed
        n_orig = pos.shape[1] - 1
        if num_patches == n_orig and h == w:
            return pos
        m = int(math.sqrt(n_orig))
        if m * m != n_orig:
            raise ValueError(f"pos_embed has {n_orig} patch positions, not a square grid")
        gh, gw = h // self.patch_size, w // self.patch_size
        patch_pos = pos[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)  # [1, D, M, M]
        off = self.cfg.interpolate_offset
        if off:
            # DINOv2's kludge: pass a scale factor, which also changes the sampling positions.
            kw = dict(scale_factor=((gh + off) / m, (gw + off) / m))
        else:
            kw = dict(size=(gh, gw))
        patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=self.cfg.interpolate_antialias, **kw)
        if patch_pos.shape[-2:] != (gh, gw):
            raise RuntimeError(f"pos_embed interpolation gave {tuple(patch_pos.shape[-2:])}, wanted {(gh, gw)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([pos[:, :1], patch_pos.to(pos.dtype)], dim=1)

    def prepare_tokens(self, x: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B,3,H,W] -> [B, 1 + T, D] tokens with positions added. ``masks`` [B,T] bool -> mask_token."""
        _, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {self.patch_size}")
        tokens = self.patch_embed(x)  # [B, T, D]
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return tokens + self.interpolate_pos_encoding(tokens.shape[1] - 1, h, w)

    def forward_features(self, x: torch.Tensor, masks: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """x [B,3,H,W] (ImageNet-normalised) -> dict of ``x_norm_clstoken [B,D]``,
        ``x_norm_patchtokens [B,T,D]``, ``x_prenorm [B,1+T,D]``."""
        t = self.prepare_tokens(x, masks)
        for blk in self.blocks:
            t = blk(t)
        tn = self.norm(t)
        return {
            "x_norm_clstoken": tn[:, 0],
            "x_norm_patchtokens": tn[:, 1:],
            "x_prenorm": t,
            "masks": masks,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,3,H,W] -> CLS [B, D]
        return self.head(self.forward_features(x)["x_norm_clstoken"])
