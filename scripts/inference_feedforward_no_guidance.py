#!/usr/bin/env python
"""Feed-forward FastAvatar inference: one photo (or a folder) -> 3D Gaussian head.

Example:
    python scripts/inference_feedforward_no_guidance.py --image face.jpg --output_dir results/face

Writes splats.ply, w_vector.npy, dino_points.npy, dino_camera_pose.npy, summary.json, images/.
See fastavatar/inference/feedforward.py for the stages and the camera intrinsics used.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastavatar.inference.feedforward import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
