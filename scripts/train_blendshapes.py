#!/usr/bin/env python
"""Learn Gaussian blendshapes (GaussianBlendshapes) for one subject from a tracked monocular video.

    python scripts/build_rig.py --splats head/splats.ply --flame_model FLAME.pkl --output head/rig.npz
    python scripts/train_blendshapes.py --sequence video/ --rig head/rig.npz --output_dir learned/ \
        --num_test 350 --max_epochs 80 --steps_per_epoch 500
    python scripts/animate.py --splats learned/splats.ply --flame_params video/flame_param --output_dir anim/

--sequence is an INSTA/metrical-tracker folder (checkpoint/*.frame + RGBA images/) or a VHAP
export (transforms.json, images/, fg_masks/, flame_param/). Start from an analytic --rig, or
from --splats (a reconstruction of the subject, rigged here with --flame_model in the pose of
--source_frame). Writes output_dir/rig.npz (learned) + splats.ply, metrics.json (held-out
PSNR/SSIM against the starting rig), TensorBoard logs and resumable checkpoints (--resume).
"""

import sys


from fastavatar.cli import run_script  # noqa: E402
from fastavatar.config import parse_config  # noqa: E402


def main(argv=None) -> int:
    from fastavatar.train.blendshapes import BlendshapeTrainConfig, train_blendshapes

    train_blendshapes(parse_config(BlendshapeTrainConfig, argv, description=__doc__))
    return 0


if __name__ == "__main__":
    from fastavatar.train.common import NonFiniteLossError

    sys.exit(run_script(main, extra_errors=(NonFiniteLossError,)))
