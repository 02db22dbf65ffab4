#!/usr/bin/env python
"""Train the leave-one-out decoders the evaluation protocols score held-out subjects with:
for each of 128, 306, 369, the demo's template + decoder trained on the other two (camera 08 held out,
1/4 scale), into outputs/loo/<held_out>/decoder_run/checkpoints/latest.pth (about 4 min each on a
free 2-core CPU).

    python scripts/train_loo_decoders.py                   # all three, sequentially
    python scripts/train_loo_decoders.py --held_out 306    # one
"""

import sys

from fastavatar.config import parse_config
from fastavatar.apps.loo import LooConfig, train_loo_decoders


def main(argv=None) -> int:
    cfg = parse_config(LooConfig, argv, description=__doc__)
    for held_out, ckpt in train_loo_decoders(cfg).items():
        print(f"{held_out}: {ckpt}")
    return 0


if __name__ == "__main__":
    from fastavatar.cli import run_script

    sys.exit(run_script(main))
