#!/usr/bin/env python
"""Single-view reconstruction with test-time refinement: calibrated (FLAME-guided) or camera-free.

Calibrated views of a dataset subject, scored on every other view:

    python scripts/inference_feedforward_full_guidance.py --data_root data/nersemble --sample_id 306
    python scripts/inference_feedforward_full_guidance.py --sample_id 306 --input_views all --image_scale 0.5

Any photo (or a folder of photos), no calibration: face landmarks -> camera by PnP -> framed like
the training views -> refined (camera, W, hypernetwork, per-Gaussian):

    python scripts/inference_feedforward_full_guidance.py --image photo.jpg --decoder_checkpoint DECODER.pth

(``--image PATH --help`` lists the camera-free mode's own options.)
"""

import sys


from fastavatar.config import parse_config  # noqa: E402
from fastavatar.inference.photo import PhotoConfig, run_photo_mode  # noqa: E402
from fastavatar.inference.guided import GuidedConfig, run_guided  # noqa: E402


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    photo_mode = any(a == "--image" or a.startswith("--image=") for a in args)
    try:
        if photo_mode:
            given = [flag for flag in ("--data_root", "--sample_id") if any(a.split("=")[0] == flag for a in args)]
            if given:
                raise ValueError(f"--image (camera-free mode) replaces {' and '.join(given)}; give one or the other")
            cfg = parse_config(PhotoConfig, args, description=__doc__)
            summary = run_photo_mode(cfg)
            print(f"[photo] {len(summary['photos'])} photo(s) reconstructed, {len(summary['failed'])} failed; "
                  f"outputs in {cfg.output_dir}")
            return 0 if not summary["failed"] else 1
        cfg = parse_config(GuidedConfig, args, description=__doc__)
        summary = run_guided(cfg)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    m = summary["mean_unseen"]
    print(f"[guided] mean over unseen views: PSNR {m['initial']['psnr']:.2f} -> {m['final']['psnr']:.2f} dB; "
          f"outputs in {cfg.output_dir}")
    return 0


if __name__ == "__main__":
    from fastavatar.cli import run_script

    sys.exit(run_script(main))
