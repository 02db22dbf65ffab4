"""Test helper: random state dicts in the released FastAvatar checkpoint layouts.

Key names and shapes come from tests/fixtures/official_checkpoint_layout.json (a copy of the
key->shape manifests obtained by instantiating the released classes). Shapes can be shrunk
(N Gaussians, ViT width, head width) for fast CPU tests; key names never change.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Dict, List

import torch

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "official_checkpoint_layout.json"
OFFICIAL_N = 10144

# Released ViT-B/14 and head sizes, and the small stand-ins the tiny tracker tests use.
TINY_VIT = dict(img_size=28, patch_size=14, embed_dim=32, depth=12, num_heads=2)
TINY_HEAD_HIDDEN = 48


@lru_cache(maxsize=None)
def load_layout() -> dict:
    return json.loads(FIXTURE.read_text())


def official_shapes(kind: str) -> Dict[str, List[int]]:
    """kind: 'decoder' | 'encoder' | 'dino' -> ordered {key: shape} of the released state dict."""
    section = load_layout()[kind]
    return dict(section["model_state_dict" if kind == "dino" else "model_dict"])


def _shape_map(kind: str, n: int, tiny_vit: bool) -> Dict[int, int]:
    m = {OFFICIAL_N: n}
    if kind == "dino":
        m[3 * OFFICIAL_N] = 3 * n
        if tiny_vit:
            e = TINY_VIT["embed_dim"]
            g = TINY_VIT["img_size"] // TINY_VIT["patch_size"]
            m.update({768: e, 2304: 3 * e, 3072: 4 * e, 1370: 1 + g * g, 1024: TINY_HEAD_HIDDEN})
    return m


def shrunk_shapes(kind: str, n: int = OFFICIAL_N, tiny_vit: bool = False) -> Dict[str, List[int]]:
    m = _shape_map(kind, n, tiny_vit)
    return {k: [m.get(d, d) for d in shape] for k, shape in official_shapes(kind).items()}


def random_state(kind: str, n: int = OFFICIAL_N, tiny_vit: bool = False, seed: int = 0,
                 weight_std: float = 0.1) -> Dict[str, torch.Tensor]:
    """Random tensors for every released key (BN running_var > 0, num_batches_tracked int64)."""
    g = torch.Generator().manual_seed(seed)
    out: Dict[str, torch.Tensor] = {}
    for key, shape in shrunk_shapes(kind, n, tiny_vit).items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7, dtype=torch.long)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        elif key == "temperature":
            out[key] = torch.tensor(1.3)
        elif key.endswith("gamma"):
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[key] = torch.randn(shape, generator=g) * weight_std
    return out


def random_decoder_state(n: int = 64, seed: int = 0) -> Dict[str, torch.Tensor]:
    sd = random_state("decoder", n=n, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    # plausible template values (not required, but keeps numbers in a sane range)
    sd["splats.means"] = torch.randn(n, 3, generator=g) * 0.1
    sd["base_scales"] = torch.randn(n, 3, generator=g) * 0.2 - 5.0
    sd["splats.scales"] = sd["base_scales"].clone()
    return sd


def random_template(n: int = 64, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A raw splats dict (fastavatar.core.splats keys) with N Gaussians."""
    g = torch.Generator().manual_seed(seed)
    return {
        "means": torch.randn(n, 3, generator=g) * 0.1,
        "quats": torch.randn(n, 4, generator=g),
        "scales": torch.randn(n, 3, generator=g) * 0.2 - 5.0,
        "opacities": torch.randn(n, generator=g),
        "sh0": torch.randn(n, 1, 3, generator=g),
        "shN": torch.randn(n, 15, 3, generator=g) * 0.1,
    }


def tiny_tracker_config(n: int = 16, **overrides):
    from fastavatar.models.tracker import TrackerConfig
    from fastavatar.models.vit import ViTConfig

    return TrackerConfig(vit=ViTConfig(**TINY_VIT), max_points=n, hidden_dim=TINY_HEAD_HIDDEN, **overrides)

