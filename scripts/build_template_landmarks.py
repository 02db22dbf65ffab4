#!/usr/bin/env python
"""Regenerate fastavatar/face/assets/template_landmarks.npz: the 468 face-mesh landmarks on the template.

    python scripts/build_template_landmarks.py --data_root data/nersemble --subjects 128 306 369
"""

import argparse
import json
import sys



def main(argv=None) -> int:
    from fastavatar.face.template_landmarks import TEMPLATE_LANDMARKS_FILE

    ap = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_root", default="data/nersemble", help="folder of calibrated subject folders")
    ap.add_argument("--subjects", nargs="+", default=["128", "306", "369"], help="subjects to triangulate")
    ap.add_argument("--output", default=str(TEMPLATE_LANDMARKS_FILE), help="output .npz")
    ap.add_argument("--threshold_px", type=float, default=12.0, help="RANSAC inlier threshold (full-res pixels)")
    args = ap.parse_args(argv)
    try:
        from fastavatar.inference.landmark_views import build_template_landmark_file

        report = build_template_landmark_file(args.data_root, args.subjects, args.output, args.threshold_px)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    from fastavatar.cli import run_script

    sys.exit(run_script(main))
