#!/usr/bin/env python
"""End-to-end demo on the bundled data (CPU, a few minutes): template -> decoder training ->
single-view reconstruction of a held-out subject -> renders, turntable and metrics.

    python scripts/demo.py                      # defaults from fastavatar/demo.py
    python scripts/demo.py --config configs/demo.yaml --output_dir outputs/demo
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastavatar.config import parse_config  # noqa: E402
from fastavatar.apps.demo import DemoConfig, run_demo  # noqa: E402


def main(argv=None) -> int:
    cfg = parse_config(DemoConfig, argv, description=__doc__)
    run_demo(cfg)
    return 0


if __name__ == "__main__":
    from fastavatar.cli import run_script

    sys.exit(run_script(main))
