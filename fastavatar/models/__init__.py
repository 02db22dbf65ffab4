"""Neural modules: the W-conditioned Gaussian decoder, the ArcFace->W encoder and the
DINOv2 point/pose tracker. State-dict names match the released FastAvatar checkpoints."""

from fastavatar.models.decoder import DecoderConfig, GaussianDecoder, splats_from_output
from fastavatar.models.tracker import DinoTracker, TrackerConfig
from fastavatar.models.vit import DinoVisionTransformer, ViTConfig
from fastavatar.models.w_encoder import WEncoder, WEncoderConfig

__all__ = [
    "DecoderConfig",
    "DinoTracker",
    "DinoVisionTransformer",
    "GaussianDecoder",
    "TrackerConfig",
    "ViTConfig",
    "WEncoder",
    "WEncoderConfig",
    "splats_from_output",
]
