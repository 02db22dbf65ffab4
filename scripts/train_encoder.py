#!/usr/bin/env python
"""Train the W encoder (ArcFace embedding -> decoder W) against a trained decoder's W table.

    python scripts/train_encoder.py --data_root data/nersemble \
        --decoder_load_path runs/decoder/checkpoints/latest.pth --output_dir runs/encoder
"""

import sys

from fastavatar.config import parse_config
from fastavatar.face.embedding import FaceModelsMissingError
from fastavatar.train.common import NonFiniteLossError
from fastavatar.train.encoder import EncoderTrainConfig, train_encoder


def main(argv=None) -> int:
    cfg = parse_config(EncoderTrainConfig, argv, description=__doc__)
    try:
        train_encoder(cfg)
    except (NonFiniteLossError, FaceModelsMissingError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from fastavatar.cli import run_script

    sys.exit(run_script(main))
