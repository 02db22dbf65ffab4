"""Decoder checkpoints (``decoder_neutral_flame.pth``).

Released keys: ``model_dict``, ``w_vectors [S,512]``, ``w_ids_to_idx {'%03d' id: row}``,
``epoch``, ``global_step``, ``config``; ours add ``optimizer_states``, ``model_config``,
``extra`` and ``format: "fastavatar-decoder-v1"``.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from fastavatar.core.splats import SPLAT_KEYS
from fastavatar.data.subject_ids import normalize_subject_id
from fastavatar.io.atomic import atomic_torch_save
from fastavatar.io.integrity import stamp
from fastavatar.io.checkpoints.common import PathLike, cpu_state, load_checkpoint_file, require_kind, short_error
from fastavatar.io.plain import plain_config
from fastavatar.io.state_dict import check_state_dict
from fastavatar.models.decoder import DecoderConfig, GaussianDecoder, infer_decoder_config

DECODER_FORMAT = "fastavatar-decoder-v1"


def reference_decoder_keys() -> Dict[str, torch.Tensor]:
    """State dict of a one-Gaussian decoder with the released key names (for error messages)."""
    tpl = {"means": torch.zeros(1, 3), "quats": torch.zeros(1, 4), "scales": torch.zeros(1, 3),
           "opacities": torch.zeros(1), "sh0": torch.zeros(1, 1, 3), "shN": torch.zeros(1, 15, 3)}
    return GaussianDecoder(tpl, DecoderConfig(gaussians_per_round=1)).state_dict()


def load_decoder(
    path: PathLike, device: Union[str, torch.device] = "cpu", config: Optional[DecoderConfig] = None
) -> Tuple[GaussianDecoder, Optional[torch.Tensor], Optional[Dict[str, int]]]:
    """Decoder checkpoint (released or ours) -> (decoder in eval mode, w_vectors [S,512] or None,
    w_ids_to_idx or None). Needs no template PLY: sizes and template come from the file."""
    path = Path(path)
    ckpt = load_checkpoint_file(path)
    state = require_kind(ckpt, path, "decoder", ("model_dict", "state_dict"), reference_decoder_keys)
    base = config
    if base is None and isinstance(ckpt.get("model_config"), Mapping):
        known = DecoderConfig.__dataclass_fields__
        base = DecoderConfig(**{k: v for k, v in ckpt["model_config"].items() if k in known})
    try:
        cfg = DecoderConfig(**{**(asdict(base) if base is not None else {}), **infer_decoder_config(state)})
        decoder = GaussianDecoder({k: state[f"splats.{k}"] for k in SPLAT_KEYS}, cfg)
    except (ValueError, KeyError, RuntimeError) as e:
        check_state_dict(reference_decoder_keys(), state, path, "decoder", names_only=True)
        raise ValueError(f"{path}: inconsistent decoder state dict ({short_error(e)})") from None
    check_state_dict(decoder, state, path, "decoder")
    decoder.load_state_dict(state, strict=True)
    w_vectors = ckpt.get("w_vectors") if isinstance(ckpt, Mapping) else None
    if w_vectors is not None:
        w_vectors = torch.as_tensor(w_vectors).detach().float().clone()
        if w_vectors.dim() != 2 or w_vectors.shape[1] != decoder.config.w_dim:
            raise ValueError(
                f"{path}: w_vectors has shape {list(w_vectors.shape)}, expected [S, {decoder.config.w_dim}]"
            )
        w_vectors = w_vectors.to(device)
    ids = ckpt.get("w_ids_to_idx") if isinstance(ckpt, Mapping) else None
    if ids is not None:
        ids = {normalize_subject_id(k): int(v) for k, v in dict(ids).items()}
        if w_vectors is not None and ids and max(ids.values()) >= w_vectors.shape[0]:
            raise ValueError(
                f"{path}: w_ids_to_idx refers to row {max(ids.values())} but w_vectors has {w_vectors.shape[0]} rows"
            )
    return decoder.to(device).eval(), w_vectors, ids


def save_decoder_checkpoint(
    path: PathLike,
    decoder: GaussianDecoder,
    w_vectors: Optional[torch.Tensor],
    w_ids_to_idx: Optional[Mapping[str, int]],
    epoch: int,
    global_step: int,
    config: Any = None,
    optimizer_states: Optional[Mapping[str, Any]] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> None:
    """Atomically write a decoder checkpoint (released keys + ours; weights_only-loadable)."""
    if w_vectors is not None and (w_vectors.dim() != 2 or w_vectors.shape[1] != decoder.config.w_dim):
        raise ValueError(f"{path}: w_vectors must be [S, {decoder.config.w_dim}], got {list(w_vectors.shape)}")
    ids = {normalize_subject_id(k): int(v) for k, v in dict(w_ids_to_idx).items()} if w_ids_to_idx is not None else None
    if ids and w_vectors is not None and max(ids.values()) >= w_vectors.shape[0]:
        raise ValueError(
            f"{path}: w_ids_to_idx refers to row {max(ids.values())} but w_vectors has {w_vectors.shape[0]} rows"
        )
    obj = {
        "model_dict": cpu_state(decoder),
        "w_vectors": w_vectors.detach().cpu().clone() if w_vectors is not None else None,
        "w_ids_to_idx": ids,
        "epoch": int(epoch),
        "global_step": int(global_step),
        "config": plain_config(config, str(path)),
        "optimizer_states": dict(optimizer_states) if optimizer_states is not None else None,
        "model_config": decoder.config.to_dict(),
        "format": DECODER_FORMAT,
        "extra": plain_config(extra, str(path), allow_tensors=True) if extra is not None else None,
    }
    atomic_torch_save(stamp(obj), path)
