#!/usr/bin/env python
"""Animate a reconstructed head with FLAME expressions and poses.

    python scripts/animate.py --splats out/splats.ply --rig out/rig.npz --flame_params seq/ --output_dir anim/

Without --flame_params a built-in demo plays (expression sweep, jaw open, head turn). The camera is
view --camera of a subject folder (--data_root/--sample_id or --subject_dir), an orbit around the head
(--orbit), or a frontal default. Writes animation.mp4 (GIF when imageio-ffmpeg is missing),
summary.json and, with --save_ply, frames/NNNNN.ply.
"""

import sys

from fastavatar.apps.animate import animate_main


def main(argv=None) -> int:
    return animate_main(argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
