#!/usr/bin/env python
"""Feed-forward FastAvatar inference: one photo (or a folder) -> 3D Gaussian head.

Example:
    python scripts/inference_feedforward_no_guidance.py --image face.jpg --output_dir results/face

Writes splats.ply, w_vector.npy, dino_points.npy, dino_camera_pose.npy, summary.json, config.yaml,
images/. See fastavatar/inference/feedforward/ for the stages and the camera intrinsics used.
"""

import sys

from fastavatar.inference.feedforward import main

if __name__ == "__main__":
    from fastavatar.cli import run_script

    sys.exit(run_script(lambda _argv: main()))
