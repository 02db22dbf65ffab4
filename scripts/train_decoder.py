#!/usr/bin/env python
"""Train the Gaussian decoder (hypernetwork + per-subject W) on multi-view captures.

    python scripts/train_decoder.py --data_root data/nersemble --image_scale 0.25 --max_epochs 2
    torchrun --nproc_per_node=4 scripts/train_decoder.py --data_root /path/to/nersemble_export
"""

import sys

from fastavatar.config import parse_config
from fastavatar.train.common import NonFiniteLossError
from fastavatar.train.decoder import DecoderTrainConfig, train_decoder


def main(argv=None) -> int:
    cfg = parse_config(DecoderTrainConfig, argv, description=__doc__)
    try:
        run_dir = train_decoder(cfg)
    except (NonFiniteLossError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"[train] done: {run_dir}")
    return 0


if __name__ == "__main__":
    from fastavatar.cli import run_script

    sys.exit(run_script(main))
