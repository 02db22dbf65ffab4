#!/usr/bin/env python
"""Train the W encoder (ArcFace embedding -> decoder W) against a trained decoder's W table.

    python scripts/train_encoder.py --config configs/encoder.yaml \
        --decoder_load_path runs/decoder/checkpoints/latest.pth --output_dir runs/encoder
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastavatar.config import parse_config  # noqa: E402
from fastavatar.face.embedding import FaceModelsMissingError  # noqa: E402
from fastavatar.train.common import NonFiniteLossError  # noqa: E402
from fastavatar.train.encoder import EncoderTrainConfig, train_encoder  # noqa: E402


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
