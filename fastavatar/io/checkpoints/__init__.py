"""Checkpoint readers and writers, one module per model (the only part of :mod:`fastavatar.io`
that knows the networks, so it sits above :mod:`fastavatar.models`).

Reads the released FastAvatar files unchanged (through the restricted unpickler: their pickled
configs load as inert :class:`~fastavatar.io.unpickle.StandInObject` data) and writes files that
keep the released top-level keys while loading with ``torch.load(..., weights_only=True)``.
"""

from fastavatar.data.subject_ids import make_w_ids_to_idx, normalize_subject_id, rows_to_subject_ids, subject_ids_to_rows
from fastavatar.io.checkpoints.common import checkpoint_config, load_checkpoint_file
from fastavatar.io.checkpoints.decoder import DECODER_FORMAT, load_decoder, save_decoder_checkpoint
from fastavatar.io.checkpoints.tracker import (
    TRACKER_FORMAT,
    load_backbone_weights,
    load_tracker,
    read_tracker_sidecars,
    save_tracker_checkpoint,
)
from fastavatar.io.checkpoints.w_encoder import W_ENCODER_FORMAT, load_w_encoder, save_w_encoder_checkpoint
from fastavatar.io.plain import to_plain
from fastavatar.io.unpickle import StandInObject
from fastavatar.io.state_dict import check_state_dict, detect_checkpoint_kind, state_dict_mismatch

__all__ = [
    "DECODER_FORMAT",
    "StandInObject",
    "TRACKER_FORMAT",
    "W_ENCODER_FORMAT",
    "check_state_dict",
    "checkpoint_config",
    "detect_checkpoint_kind",
    "load_backbone_weights",
    "load_checkpoint_file",
    "load_decoder",
    "load_tracker",
    "load_w_encoder",
    "make_w_ids_to_idx",
    "normalize_subject_id",
    "read_tracker_sidecars",
    "rows_to_subject_ids",
    "save_decoder_checkpoint",
    "save_tracker_checkpoint",
    "save_w_encoder_checkpoint",
    "state_dict_mismatch",
    "subject_ids_to_rows",
    "to_plain",
]
