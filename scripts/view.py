#!/usr/bin/env python
"""Open a local web viewer (viser) for a splats.ply; with a rig, sliders animate it live.

    python scripts/view.py out/splats.ply [--rig out/rig.npz] [--host 127.0.0.1] [--port 8080]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", type=Path, help="splats PLY (standard 3DGS layout)")
    ap.add_argument("--rig", type=Path, default=None, help="rig.npz (default: rig.npz beside the PLY, if present)")
    ap.add_argument("--no_rig", action="store_true", help="ignore a rig beside the PLY")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--num_expr_sliders", type=int, default=10)
    ap.add_argument("--start_at_source", action="store_true", help="start the sliders at the source frame's expression")
    args = ap.parse_args(argv)

    from fastavatar.animate.rig import load_rig
    from fastavatar.io.ply import load_ply
    from fastavatar.apps.viewer import ViewerConfig, locate_rig, serve

    splats = load_ply(args.path)
    rig_path = None if args.no_rig else locate_rig(args.path, args.rig)
    rig = load_rig(rig_path, num_gaussians=splats["means"].shape[0]) if rig_path is not None else None
    cfg = ViewerConfig(host=args.host, port=args.port, num_expr_sliders=args.num_expr_sliders,
                       start_at_source=args.start_at_source)
    serve(splats, rig, cfg, block=True)
    return 0


if __name__ == "__main__":
    from fastavatar.animate.rig import run_rig_script

    raise SystemExit(run_rig_script(main))
