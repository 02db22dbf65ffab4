#!/usr/bin/env python
"""Build the animation rig (rig.npz) for a reconstructed head.

    python scripts/build_rig.py --splats out/splats.ply --data_root data/nersemble --sample_id 306 \
        --flame_model pretrained_weights/flame/flame2023.pkl --output out/rig.npz

Binds every Gaussian to its FLAME triangle on the subject's tracked source frame (index binding
when FLAME's triangle centres reproduce the subject's points3D, nearest-triangle otherwise; the
report says which), moves it to the rest mesh and precomputes expression blendshapes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splats", type=Path, required=True, help="reconstruction PLY (standard 3DGS layout)")
    ap.add_argument("--data_root", type=Path, default=Path("data/nersemble"), help="folder of subject folders")
    ap.add_argument("--sample_id", type=str, default="306", help="subject folder name under --data_root")
    ap.add_argument("--subject_dir", type=Path, default=None, help="subject folder (overrides data_root/sample_id)")
    ap.add_argument("--flame_param", type=Path, default=None, help="source-frame VHAP npz (default: subject's flame_param/00000.npz)")
    ap.add_argument("--flame_model", type=Path, default=None, help="FLAME pkl/npz (default pretrained_weights/flame/flame2023.pkl)")
    ap.add_argument("--num_expr", type=int, default=100, help="expression bases to precompute")
    ap.add_argument("--rest_mode", choices=("source", "mesh"), default="source", help="see fastavatar.animate.blendshapes")
    ap.add_argument("--tol", type=float, default=1e-5, help="index-binding tolerance (metres)")
    ap.add_argument("--output", type=Path, default=None, help="rig path (default: rig.npz beside the PLY)")
    args = ap.parse_args(argv)

    from fastavatar.animate import build_rig, save_rig
    from fastavatar.data import SubjectParser
    from fastavatar.flame import load_flame_model, params_from_npz
    from fastavatar.flame.points import compare_centres
    from fastavatar.io.ply import load_ply

    subject_dir = args.subject_dir or args.data_root / args.sample_id
    parser = SubjectParser(subject_dir, expected_points=None)
    param_path = args.flame_param or parser.flame_param_path
    if param_path is None:
        raise SystemExit(f"{subject_dir}: no flame_param/*.npz; pass --flame_param")
    model = load_flame_model(args.flame_model)
    splats = load_ply(args.splats)
    params = params_from_npz(param_path)
    anchors = parser.points.double()
    print(f"FLAME centres vs {subject_dir}/sparse/0/points3D: {compare_centres(model, params, anchors).summary()}")
    if anchors.shape[0] != splats["means"].shape[0]:
        print(f"note: {anchors.shape[0]} points3D but {splats['means'].shape[0]} Gaussians; binding by nearest triangle")
        anchors = None
    rig = build_rig(model, splats, params, anchors=anchors, num_expr=args.num_expr,
                    tol=args.tol, rest_mode=args.rest_mode)
    output = args.output or args.splats.with_name("rig.npz")
    save_rig(output, rig)
    print(f"binding: {rig.binding_mode} (index check max error {rig.index_max_error:.3e} m, tol {args.tol:g}); "
          f"{rig.num_gaussians} Gaussians, {rig.num_expr} expression bases, rest={rig.rest_mode}")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    from fastavatar.animate.rig import run_rig_script

    raise SystemExit(run_rig_script(main))
