"""Loading what feed-forward inference needs: the three checkpoints and the insightface models."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from fastavatar.face.embedding import FaceEmbedder
from fastavatar.io.checkpoints.common import WEIGHTS_README


class MissingFileError(FileNotFoundError):
    """A required checkpoint is not on disk."""


@dataclass
class FeedForwardModels:
    """Everything inference needs, on ``device``, in eval mode."""

    embedder: Any  # FaceEmbedder (or None when only timing the torch stages)
    w_encoder: torch.nn.Module
    decoder: torch.nn.Module
    tracker: torch.nn.Module
    device: torch.device
    notes: Dict[str, str] = field(default_factory=dict)


def require_files(paths: Dict[str, Path]) -> None:
    """One-line ``MissingFileError`` naming every missing checkpoint and where to put it."""
    missing = [f"{name} {path}" for name, path in paths.items() if not Path(path).is_file()]
    if missing:
        raise MissingFileError(
            f"missing checkpoint(s): {', '.join(missing)}; download the FastAvatar weights into "
            f"pretrained_weights/ (see {WEIGHTS_README}) or pass the paths with --encoder_checkpoint, "
            f"--decoder_checkpoint, --dino_checkpoint"
        )


def load_models(
    encoder_checkpoint: Path,
    decoder_checkpoint: Path,
    dino_checkpoint: Path,
    insightface_root: Optional[str] = None,
    device: torch.device = torch.device("cpu"),
    det_size: int = 640,
) -> FeedForwardModels:
    """Load the three checkpoints (released or ours) and the insightface models."""
    from fastavatar.io.checkpoints import load_decoder, load_tracker, load_w_encoder

    require_files({"encoder": Path(encoder_checkpoint), "decoder": Path(decoder_checkpoint),
                   "dino": Path(dino_checkpoint)})
    embedder = FaceEmbedder(insightface_root, device=str(device), det_size=(det_size, det_size))
    w_encoder = load_w_encoder(encoder_checkpoint, device)
    decoder, _, _ = load_decoder(decoder_checkpoint, device)
    tracker = load_tracker(dino_checkpoint, device)
    return FeedForwardModels(embedder, w_encoder.eval(), decoder.eval(), tracker.eval(), torch.device(device))
