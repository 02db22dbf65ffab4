#!/usr/bin/env python
"""Build the animation rig (rig.npz) for a reconstructed head.

    python scripts/build_rig.py --splats out/splats.ply --output out/rig.npz          # any head: FLAME is fitted
    python scripts/build_rig.py --splats out/splats.ply --data_root data/nersemble --sample_id 306 --output out/rig.npz

Without --sample_id/--subject_dir/--flame_param, FLAME's shape, pose, global scale and rigid
transform are fitted to the Gaussian means (one Gaussian per FLAME triangle) and the fit residual
is printed (a warning when it is large). With a tracked subject, its VHAP parameters are used and
the binding is checked against its points3D (index binding when FLAME's triangle centres reproduce
them, nearest-triangle otherwise; the report says which). Every Gaussian is then moved to the rest
mesh and the expression blendshapes are precomputed (fastavatar.animate.rigging). Needs the FLAME
file (pretrained_weights/flame/flame2023.pkl or --flame_model).
"""

from __future__ import annotations

import sys



def main(argv=None) -> int:
    from fastavatar.animate.rigging import BuildRigConfig, build_rig_command
    from fastavatar.config import parse_config

    build_rig_command(parse_config(BuildRigConfig, argv, description=__doc__))
    return 0


if __name__ == "__main__":
    from fastavatar.cli import run_script

    sys.exit(run_script(main))
