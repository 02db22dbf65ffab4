#!/usr/bin/env python
"""Open a local web viewer (viser) for a splats.ply; with a rig, sliders animate it live.

    python scripts/view.py out/splats.ply [--rig out/rig.npz] [--host 127.0.0.1] [--port 8080]
"""

import sys

from fastavatar.apps.viewer import view_main


def main(argv=None) -> int:
    return view_main(argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
