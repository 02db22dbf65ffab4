"""W-encoder checkpoints (``encoder_neutral_flame.pth``): ``model_dict``, ``optimizer_dict``,
``scheduler_dict``, ``epoch``, ``global_step``, ``config`` (+ ours: ``format``, ...)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from fastavatar.io.checkpoints.common import PathLike, load_checkpoint_file, require_kind, save_trained_model, short_error
from fastavatar.io.state_dict import check_state_dict
from fastavatar.models.w_encoder import WEncoder

W_ENCODER_FORMAT = "fastavatar-w-encoder-v1"


def _reference_keys():
    return WEncoder().state_dict()


def load_w_encoder(path: PathLike, device: Union[str, torch.device] = "cpu") -> WEncoder:
    """W-encoder checkpoint (released full or slim file, or ours) -> WEncoder in eval mode."""
    path = Path(path)
    ckpt = load_checkpoint_file(path)
    state = require_kind(ckpt, path, "w_encoder", ("model_dict", "state_dict"), _reference_keys)
    try:
        model = WEncoder.from_state_dict(state, load=False)
    except (RuntimeError, ValueError, IndexError, KeyError) as e:
        check_state_dict(_reference_keys(), state, path, "w_encoder", names_only=True)
        raise ValueError(f"{path}: could not load W-encoder ({short_error(e)})") from None
    check_state_dict(model, state, path, "w_encoder")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def save_w_encoder_checkpoint(
    path: PathLike,
    encoder: WEncoder,
    epoch: int,
    global_step: int,
    config: Any = None,
    optimizer_dict: Optional[Mapping[str, Any]] = None,
    scheduler_dict: Optional[Mapping[str, Any]] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> None:
    """Atomically write a W-encoder checkpoint (released keys + ours)."""
    save_trained_model(
        path, "model_dict", encoder, encoder.config.to_dict(), W_ENCODER_FORMAT,
        epoch, global_step, config, optimizer_dict, scheduler_dict, extra,
    )
