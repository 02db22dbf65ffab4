#!/usr/bin/env python
"""End-to-end demo on the bundled data (CPU, a few minutes): template -> decoder training ->
reconstruction of a held-out subject from a plain photo (camera-free) and from its calibrated view ->
renders, turntables and metrics beside the baselines. Needs the [face] extra (pip install -e ".[face]").

    python scripts/demo.py                      # defaults from fastavatar/apps/demo.py
    python scripts/demo.py --output_dir outputs/demo --w_steps 100   # any option of fastavatar/apps/demo.py
"""

import sys

from fastavatar.config import parse_config
from fastavatar.apps.demo import DemoConfig, run_demo


def main(argv=None) -> int:
    cfg = parse_config(DemoConfig, argv, description=__doc__)
    run_demo(cfg)
    return 0


if __name__ == "__main__":
    from fastavatar.cli import run_script

    sys.exit(run_script(main))
