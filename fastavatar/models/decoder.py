"""The W-conditioned Gaussian decoder (FastAvatar's ``CondGaussianSplatting`` + ``Hypernet``).

A shared MLP maps ``[W (512) ; per-Gaussian embedding (32)]`` to per-Gaussian offsets that are
added, in raw parameter space, to a template of N Gaussians (N = 10144, one per FLAME+teeth
triangle). Positions are different: the decoder only returns a bounded delta
``0.1 * tanh(dmu)`` and the caller adds absolute positions (subject FLAME-face centroids,
or tracker-predicted points), see :meth:`GaussianDecoder.decode`.

State-dict keys and shapes are exactly those of the released ``CondGaussianSplatting``
(44 keys, ``shared/fixtures/official_checkpoint_layout.json``), so the official
``model_dict`` loads with ``strict=True``.

Differences from the released code (all compatible with its checkpoints):
- batch size B > 1 works (the original's ``w.expand`` only allowed B = 1);
- :meth:`GaussianDecoder.from_state_dict` rebuilds the module from a checkpoint alone; the
  original needed ``pretrained_weights/averaged_model.ply`` on disk to construct it;
- ``raw_deltas`` cover all Gaussians (the original kept only the last chunk's);
- ``init="zero_out"`` (optional): PyTorch default init plus zero-initialised output layers,
  so the decoder starts exactly at the template while the hidden layers and W still carry
  signal. The original ``xavier_normal_(gain=0.02)`` on 8 stacked layers makes outputs and
  gradients vanish (~1e-16 at init). ``init="original"`` stays the default for fidelity.
- construction is deterministic given ``seed`` and leaves the global RNG untouched.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Dict, List, Literal, Mapping, Optional, Union

import torch
import torch.nn as nn

from fastavatar.core.splats import SPLAT_KEYS, Splats, validate_splats

MEANS_DELTA_SCALE = 0.1
"""Bound on the position delta (world units, ~metres): means = points + 0.1 * tanh(dmu)."""

HEAD_OUT_DIMS = {"scale_head": 3, "rotation_head": 4, "opacity_head": 1, "means_head": 3}
"""Output width of each head except ``color_head`` (which is (sh_degree+1)^2 * 3)."""


@dataclass
class DecoderConfig:
    w_dim: int = 512  # identity code width
    embedding_dim: int = 32  # per-Gaussian embedding width (cols 0-2: normalised template means)
    hidden_dim: int = 256  # MLP width
    body_layers: int = 6  # Linear layers in the shared body
    head_layers: int = 1  # hidden Linear layers per head (before the output Linear)
    sh_degree: int = 3  # SH degree predicted by color_head
    gaussians_per_round: int = 10144  # chunk size over Gaussians (bounds memory; N=10144 -> 1 chunk)
    optimize_base_gaussians: bool = True  # base_* are Parameters (True) or buffers (False)
    init: Literal["original", "zero_out"] = "original"  # MLP init, see module docstring
    seed: int = 0  # seeds embedding noise and MLP init (global RNG untouched)
    means_delta_scale: float = MEANS_DELTA_SCALE  # position delta bound

    def to_dict(self) -> dict:
        return asdict(self)


def _sh_rest(sh_degree: int) -> int:
    return (sh_degree + 1) ** 2 - 1


def _mlp(in_dim: int, hidden: int, n_hidden: int, out_dim: Optional[int]) -> nn.Sequential:
    """``n_hidden`` x [Linear, ReLU] then an optional output Linear (indices 0,2,4,...)."""
    layers: List[nn.Module] = []
    d = in_dim
    for _ in range(n_hidden):
        layers += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    if out_dim is not None:
        layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class Hypernet(nn.Module):
    """Shared body + five heads. Names match the released ``Hypernet``."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        in_dim = cfg.w_dim + cfg.embedding_dim
        self.sh_dim = (cfg.sh_degree + 1) ** 2 * 3
        self.shared_body = _mlp(in_dim, cfg.hidden_dim, cfg.body_layers, None)
        h = cfg.hidden_dim
        self.scale_head = _mlp(h, h, cfg.head_layers, HEAD_OUT_DIMS["scale_head"])
        self.rotation_head = _mlp(h, h, cfg.head_layers, HEAD_OUT_DIMS["rotation_head"])
        self.color_head = _mlp(h, h, cfg.head_layers, self.sh_dim)
        self.opacity_head = _mlp(h, h, cfg.head_layers, HEAD_OUT_DIMS["opacity_head"])
        self.means_head = _mlp(h, h, cfg.head_layers, HEAD_OUT_DIMS["means_head"])
        self._init(cfg.init)

    def heads(self) -> Dict[str, nn.Sequential]:
        return {
            "scale_head": self.scale_head,
            "rotation_head": self.rotation_head,
            "color_head": self.color_head,
            "opacity_head": self.opacity_head,
            "means_head": self.means_head,
        }

    def _init(self, mode: str) -> None:
        if mode == "original":
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_normal_(m.weight, gain=0.02)
                    nn.init.zeros_(m.bias)
        elif mode == "zero_out":
            for head in self.heads().values():
                nn.init.zeros_(head[-1].weight)
                nn.init.zeros_(head[-1].bias)
        else:
            raise ValueError(f"unknown decoder init {mode!r}; use 'original' or 'zero_out'")

    def forward_conditioned(self, w: torch.Tensor, emb: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The MLP on ``cat([w expanded, emb])`` for w [B, w_dim] and emb [n, E] -> raw head outputs [B, n, ...],
        without building the [B, n, w_dim + E] input: the first layer's W part is one [B, hidden]
        product shared by every Gaussian (saves ~15% of the decoder's FLOPs and its largest buffer)."""
        first = self.shared_body[0]
        w_dim = w.shape[-1]
        w_part = w @ first.weight[:, :w_dim].T + first.bias  # [B, hidden]
        e_part = emb @ first.weight[:, w_dim:].T  # [n, hidden]
        f = torch.relu(e_part[None] + w_part[:, None])  # [B, n, hidden]
        f = self.shared_body[2:](f)
        return self._heads_forward(f)

    def _heads_forward(self, f: torch.Tensor) -> Dict[str, torch.Tensor]:
        color = self.color_head(f)
        lead = color.shape[:-1]
        return {
            "scale": self.scale_head(f),  # [..., 3]
            "rotation": self.rotation_head(f),  # [..., 4]
            "sh0": color[..., :3].reshape(*lead, 1, 3),  # [..., 1, 3]
            "shN": color[..., 3:].reshape(*lead, -1, 3),  # [..., K, 3]
            "means": self.means_head(f),  # [..., 3]
            "opacity": self.opacity_head(f).squeeze(-1),  # [...]
        }


class GaussianDecoder(nn.Module):
    """W [B, w_dim] -> per-Gaussian raw splat parameters on top of a template.

    Args:
        template: raw splats dict (``fastavatar.core.splats`` keys) with N Gaussians, e.g. from
            ``fastavatar.io.ply.load_ply("pretrained_weights/averaged_model.ply")``.
        config: :class:`DecoderConfig`.
    """

    def __init__(self, template: Splats, config: Optional[DecoderConfig] = None):
        super().__init__()
        cfg = config or DecoderConfig()
        self.config = cfg
        n = validate_splats(template, "decoder template")
        k = _sh_rest(cfg.sh_degree)
        tpl = {key: template[key].detach().to(torch.float32).clone() for key in SPLAT_KEYS}
        tpl["shN"] = _fit_sh_rest(tpl["shN"], k)
        self.num_gaussians = n

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            # Registration order reproduces the released state_dict order:
            # base_* (own tensors), then splats, gaussian_embeddings, conditioning_mlp.
            base = {
                "base_rotations": tpl["quats"],  # [N, 4]
                "base_scales": tpl["scales"],  # [N, 3] log
                "base_sh0": tpl["sh0"],  # [N, 1, 3]
                "base_shN": tpl["shN"],  # [N, K, 3]
                "base_opacity": tpl["opacities"],  # [N] logit
            }
            for name, value in base.items():
                if cfg.optimize_base_gaussians:
                    self.register_parameter(name, nn.Parameter(value.clone()))
                else:
                    self.register_buffer(name, value.clone())
            # Never-optimised template copy (released name/order: means, scales, quats, opacities, sh0, shN).
            # (an OrderedDict: ParameterDict sorts the keys of a plain dict)
            self.splats = nn.ParameterDict(
                OrderedDict((key, nn.Parameter(tpl[key].clone(), requires_grad=False))
                            for key in ("means", "scales", "quats", "opacities", "sh0", "shN"))
            )
            self.gaussian_embeddings = nn.Embedding(n, cfg.embedding_dim)
            with torch.no_grad():
                self.gaussian_embeddings.weight.copy_(_init_embeddings(tpl["means"], cfg.embedding_dim))
            self.conditioning_mlp = Hypernet(cfg)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_state_dict(
        cls, model_dict: Mapping[str, torch.Tensor], config: Optional[DecoderConfig] = None, **overrides
    ) -> "GaussianDecoder":
        """Build a decoder whose sizes are read from ``model_dict`` and load it (strict).

        Unlike the released code this needs no ``averaged_model.ply``: the template is
        taken from the checkpoint's own ``splats.*`` entries. Sizes not inferable from shapes
        (``gaussians_per_round``, ``optimize_base_gaussians``, ``init``, ``seed``) come from
        ``config`` / ``overrides``.
        """
        inferred = infer_decoder_config(model_dict)
        base = asdict(config) if config is not None else {}
        base.update(inferred)
        base.update(overrides)
        cfg = DecoderConfig(**base)
        template = {}
        for key in SPLAT_KEYS:
            if f"splats.{key}" not in model_dict:
                raise ValueError(f"decoder state dict has no 'splats.{key}' entry")
            template[key] = model_dict[f"splats.{key}"]
        model = cls(template, cfg)
        model.load_state_dict(model_dict, strict=True)
        return model

    # ------------------------------------------------------------------ forward
    def forward(self, w: torch.Tensor) -> Dict[str, object]:
        """w [B, w_dim] (or [w_dim]) -> dict with a leading batch dim B:

        - ``means_delta`` [B,N,3]: ``0.1 * tanh(dmu)``; add absolute positions yourself
        - ``quats`` [B,N,4] = base_rotations + dq (unnormalised, wxyz)
        - ``scales`` [B,N,3] = base_scales + ds (log)
        - ``sh0`` [B,N,1,3], ``shN`` [B,N,K,3] = base + dSH
        - ``opacities`` [B,N] = base_opacity + do (logit)
        - ``raw_deltas``: dict ``means`` (= means_delta), ``scales``, ``quats``, ``opacities``,
          ``sh0``, ``shN`` (the raw MLP offsets, for regularisers)
        """
        if w.dim() == 1:
            w = w.unsqueeze(0)
        if w.dim() != 2 or w.shape[1] != self.config.w_dim:
            raise ValueError(f"decoder expects w of shape [B, {self.config.w_dim}], got {tuple(w.shape)}")
        n = self.num_gaussians
        emb = self.gaussian_embeddings.weight  # [N, E]
        w = w.to(emb.dtype)
        step = max(1, int(self.config.gaussians_per_round))
        parts: Dict[str, List[torch.Tensor]] = {}
        for s in range(0, n, step):
            e = emb[s : s + step]  # [n, E]
            for key, value in self.conditioning_mlp.forward_conditioned(w, e).items():  # [B, n, ...]
                parts.setdefault(key, []).append(value)
        raw = {key: torch.cat(vals, dim=1) for key, vals in parts.items()}
        means_delta = torch.tanh(raw["means"]) * self.config.means_delta_scale
        return {
            "means_delta": means_delta,
            "quats": self.base_rotations + raw["rotation"],
            "scales": self.base_scales + raw["scale"],
            "sh0": self.base_sh0 + raw["sh0"],
            "shN": self.base_shN + raw["shN"],
            "opacities": self.base_opacity + raw["opacity"],
            "raw_deltas": {
                "means": means_delta,
                "scales": raw["scale"],
                "quats": raw["rotation"],
                "opacities": raw["opacity"],
                "sh0": raw["sh0"],
                "shN": raw["shN"],
            },
        }

    def decode(
        self, w: torch.Tensor, points: Optional[torch.Tensor] = None, batched: bool = False
    ) -> Union[List[Splats], Splats]:
        """W -> raw splats with absolute means ``points + means_delta``.

        Args:
            w: [B, w_dim] or [w_dim].
            points: [B,N,3] or [N,3] absolute positions; None -> the template means.
            batched: return one dict with leading dim B instead of a list of B dicts.
        """
        out = self.forward(w)
        return splats_from_output(out, points if points is not None else self.splats["means"], batched)

    def template_splats(self, points: Optional[torch.Tensor] = None) -> Splats:
        """The template alone (base parameters, no MLP offsets) at ``points`` [N,3] (default: the
        template means): the baseline a decoded head is compared with. Detached."""
        means = self.splats["means"] if points is None else points
        return {
            "means": means.detach(),
            "quats": self.base_rotations.detach(),
            "scales": self.base_scales.detach(),
            "opacities": self.base_opacity.detach(),
            "sh0": self.base_sh0.detach(),
            "shN": self.base_shN.detach(),
        }

    @property
    def template_means(self) -> torch.Tensor:  # [N, 3]
        return self.splats["means"]

    def mlp_parameters(self) -> List[nn.Parameter]:
        return list(self.conditioning_mlp.parameters())

    def base_parameters(self) -> List[torch.Tensor]:
        return [self.base_rotations, self.base_scales, self.base_sh0, self.base_shN, self.base_opacity]


def splats_from_output(
    out: Mapping[str, object], points: torch.Tensor, batched: bool = False
) -> Union[List[Splats], Splats]:
    """Decoder output + absolute positions ([B,N,3] or [N,3]) -> raw splats (list of B dicts,
    or one dict with a leading B dim when ``batched``)."""
    delta = out["means_delta"]  # [B, N, 3]
    b = delta.shape[0]
    if points.dim() == 2:
        points = points.unsqueeze(0)
    if points.shape[1:] != delta.shape[1:] or points.shape[0] not in (1, b):
        raise ValueError(f"points {tuple(points.shape)} do not match decoder output {tuple(delta.shape)}")
    means = points.to(delta) + delta
    full = {"means": means, **{k: out[k] for k in ("quats", "scales", "opacities", "sh0", "shN")}}
    if batched:
        return full
    return [{k: v[i] for k, v in full.items()} for i in range(b)]


def infer_decoder_config(model_dict: Mapping[str, torch.Tensor]) -> dict:
    """Sizes of a decoder from its state dict: w_dim, embedding_dim, hidden_dim, body_layers,
    head_layers, sh_degree."""
    required = ("gaussian_embeddings.weight", "conditioning_mlp.shared_body.0.weight",
                "conditioning_mlp.color_head.0.weight")
    missing = [k for k in required if k not in model_dict]
    if missing:
        raise ValueError(f"not a decoder state dict: missing {missing}")
    emb_dim = model_dict["gaussian_embeddings.weight"].shape[1]
    hidden, in_dim = model_dict["conditioning_mlp.shared_body.0.weight"].shape
    body = sum(1 for k in model_dict if k.startswith("conditioning_mlp.shared_body.") and k.endswith(".weight"))
    head = sum(1 for k in model_dict if k.startswith("conditioning_mlp.color_head.") and k.endswith(".weight"))
    color_key = f"conditioning_mlp.color_head.{2 * (head - 1)}.weight"
    sh_dim = model_dict[color_key].shape[0] if color_key in model_dict else 48
    coeffs = sh_dim // 3
    degree = int(round(coeffs ** 0.5)) - 1
    if (degree + 1) ** 2 * 3 != sh_dim:
        raise ValueError(f"decoder color_head outputs {sh_dim} values, not (d+1)^2*3 for any SH degree d")
    return dict(
        w_dim=int(in_dim - emb_dim),
        embedding_dim=int(emb_dim),
        hidden_dim=int(hidden),
        body_layers=int(body),
        head_layers=int(head - 1),
        sh_degree=int(degree),
    )


def _init_embeddings(means: torch.Tensor, dim: int) -> torch.Tensor:
    """[N,3] template means -> [N,dim]: cols 0-2 min-max normalised per axis to [0,1],
    the rest N(0, 0.02^2) from the current (seeded) RNG."""
    n = means.shape[0]
    emb = torch.randn(n, dim) * 0.02
    lo = means.min(dim=0).values
    span = (means.max(dim=0).values - lo).clamp_min(1e-8)
    k = min(3, dim)
    emb[:, :k] = ((means - lo) / span)[:, :k]
    return emb


def _fit_sh_rest(shn: torch.Tensor, k: int) -> torch.Tensor:
    """Truncate or zero-pad [N,K',3] higher-order SH to [N,k,3]."""
    if shn.shape[1] == k:
        return shn
    if shn.shape[1] > k:
        return shn[:, :k].contiguous()
    pad = torch.zeros(shn.shape[0], k - shn.shape[1], 3, dtype=shn.dtype)
    return torch.cat([shn, pad], dim=1)
