#!/usr/bin/env python
"""Build the canonical template (averaged_model.ply): fit each training subject's Gaussians
(one per FLAME triangle, positions at points3D) with our renderer, average them, write a PLY
and its resolved config beside it (averaged_model.config.yaml).

    python scripts/build_template.py --data_root data/nersemble --subjects 306 369 --output runs/template.ply
"""

import sys

from fastavatar.train.template import build_template_main

if __name__ == "__main__":
    from fastavatar.cli import run_script

    sys.exit(run_script(lambda _argv: build_template_main(description=__doc__)))
