#!/usr/bin/env python
"""Train the DINOv2 point + camera-pose tracker (heads by default; --no-freeze_backbone for all).

    python scripts/train_tracker.py --data_root data/nersemble --output_dir runs/tracker
    python scripts/train_tracker.py --random_backbone --max_epochs 1    # smoke run without weights
"""

import sys

from fastavatar.config import parse_config
from fastavatar.train.common import NonFiniteLossError
from fastavatar.train.tracker import TrackerTrainConfig, train_tracker


def main(argv=None) -> int:
    cfg = parse_config(TrackerTrainConfig, argv, description=__doc__)
    try:
        train_tracker(cfg)
    except (NonFiniteLossError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from fastavatar.cli import run_script

    sys.exit(run_script(main))
