"""Tracker checkpoints (``dino_encoder.pth``: ``model_state_dict``, ``encoder.``-prefixed) and the
bare DINOv2 backbone file (``dinov2_vitb14_pretrain.pth``).

Released tracker runs keep part of their config in ``metadata.json`` / ``args.json`` sidecars
(:func:`read_tracker_sidecars`); the sizes are read off the state dict (:func:`infer_tracker_config`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

from fastavatar.io.checkpoints.common import PathLike, load_checkpoint_file, require_kind, save_trained_model, short_error
from fastavatar.io.plain import plain_config
from fastavatar.io.state_dict import check_state_dict, detect_checkpoint_kind, state_of
from fastavatar.models.tracker import DinoTracker, TrackerConfig
from fastavatar.models.vit import VIT_PRESETS, DinoVisionTransformer, ViTConfig

TRACKER_FORMAT = "fastavatar-tracker-v1"
BACKBONE_WEIGHTS_NAME = "dinov2_vitb14_pretrain.pth"


def _reference_keys() -> Dict[str, torch.Tensor]:
    vit = ViTConfig(img_size=14, embed_dim=8, depth=12, num_heads=1)
    return DinoTracker(TrackerConfig(vit=vit, max_points=1, hidden_dim=4)).state_dict()


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


def load_backbone_weights(backbone: DinoVisionTransformer, path: Union[str, os.PathLike]) -> None:
    """Load DINOv2-named weights (facebookresearch/dinov2, or a tracker's ``encoder.dino.*``)
    into ``backbone``, strict; clear error when the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"DINOv2 backbone weights not found: {path} — download {BACKBONE_WEIGHTS_NAME} "
            f"(facebookresearch/dinov2 ViT-B/14) and put it in pretrained_weights/ (see pretrained_weights/README.md)"
        )
    state = load_checkpoint_file(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if isinstance(state, dict) and any(k.startswith("encoder.dino.") for k in state):
        state = {k[len("encoder.dino."):]: v for k, v in state.items() if k.startswith("encoder.dino.")}
    check_state_dict(backbone, state, path, "DINOv2 backbone")
    backbone.load_state_dict(state, strict=True)


def load_tracker(
    path: PathLike,
    device: Union[str, torch.device] = "cpu",
    backbone_only_ok: bool = False,
    config: Optional[TrackerConfig] = None,
    use_sidecars: bool = True,
) -> DinoTracker:
    """Tracker checkpoint -> DinoTracker in eval mode.

    Accepts the released ``dino_encoder.pth`` (``model_state_dict``, optional metadata.json /
    args.json sidecars, see :func:`read_tracker_sidecars`) and ours. With
    ``backbone_only_ok=True`` a bare DINOv2 backbone file (e.g. ``dinov2_vitb14_pretrain.pth``)
    is also accepted: the backbone is loaded and the heads stay randomly initialised (a
    starting point for tracker training).
    """
    path = Path(path)
    ckpt = load_checkpoint_file(path)
    kind = detect_checkpoint_kind(ckpt)
    if kind == "dinov2_backbone" and backbone_only_ok:
        tracker = DinoTracker(config or TrackerConfig())
        state = state_of(ckpt, ("model", "state_dict"))
        check_state_dict(tracker.backbone, state, path, "dinov2_backbone")
        tracker.backbone.load_state_dict(state, strict=True)
        return tracker.to(device).eval()
    state = require_kind(ckpt, path, "tracker", ("model_state_dict", "state_dict"), _reference_keys)
    base = config
    if base is None and isinstance(ckpt.get("model_config"), Mapping):
        base = TrackerConfig.from_dict(ckpt["model_config"])
    # Sidecars belong to released runs; our files carry their config and mean shape themselves.
    ours = isinstance(ckpt, Mapping) and ckpt.get("format") == TRACKER_FORMAT
    sidecars = read_tracker_sidecars(path) if (use_sidecars and not ours) else {}
    mean_shape = sidecars.pop("mean_shape", None)
    if base is None:
        base = TrackerConfig.from_dict({**sidecars, "dropout": 0.0})
    try:
        cfg = infer_tracker_config(state, base)
        tracker = DinoTracker(cfg)
    except (ValueError, KeyError, IndexError) as e:
        raise ValueError(f"{path}: could not build tracker ({short_error(e)})") from None
    check_state_dict(tracker, state, path, "tracker")
    tracker.load_state_dict(state, strict=True)
    if mean_shape is not None:
        tracker.set_mean_shape(torch.tensor(mean_shape, dtype=torch.float32))
    return tracker.to(device).eval()


def save_tracker_checkpoint(
    path: PathLike,
    tracker: DinoTracker,
    epoch: int,
    global_step: int,
    config: Any = None,
    optimizer_dict: Optional[Mapping[str, Any]] = None,
    scheduler_dict: Optional[Mapping[str, Any]] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> None:
    """Atomically write a tracker checkpoint (``model_state_dict`` as released + ours)."""
    save_trained_model(
        path, "model_state_dict", tracker, plain_config(tracker.config.to_dict(), str(path)), TRACKER_FORMAT,
        epoch, global_step, config, optimizer_dict, scheduler_dict, extra,
    )
