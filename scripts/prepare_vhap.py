#!/usr/bin/env python
"""Convert a VHAP NeRSemble export into our subject layout (COLMAP sparse/0 with the 10144
FLAME-triangle centres, images/, fg_masks/), ready for --data_root.

    python scripts/prepare_vhap.py --vhap_dir EXPORT --output_dir data/mine/306
    python scripts/prepare_vhap.py --vhap_dir EXPORT --output_dir data/mine/306 --image_scale 0.5 --link copy \
        --flame_model pretrained_weights/flame/flame2023.pkl
"""

import sys


from fastavatar.config import parse_config  # noqa: E402
from fastavatar.data.prepare_vhap import PrepareConfig, PrepareError, prepare_vhap  # noqa: E402


def main(argv=None) -> int:
    cfg = parse_config(PrepareConfig, argv, description=__doc__)
    try:
        prepare_vhap(cfg)
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from fastavatar.cli import run_script

    raise SystemExit(run_script(main))
