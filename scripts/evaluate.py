#!/usr/bin/env python
"""Score reconstructions against calibrated views.

Score one reconstruction (renders + ground truth side by side, results.json, per_view.json):

    python scripts/evaluate.py --splats out/splats.ply --data_root data/nersemble --sample_id 128 --seen_views 8

Run the protocol over subjects (fit from the input view, score the unseen views; a table with the
template and feed-forward baselines):

    python scripts/evaluate.py --protocol --subjects 128 306 --decoder_checkpoint runs/decoder/checkpoints/latest.pth
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from fastavatar.config import build_parser, config_from_dict
    from fastavatar.guided import GuidedConfig

    parser = build_parser(GuidedConfig, description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--splats", type=Path, default=None, help="a splats.ply to score (single-reconstruction mode)")
    parser.add_argument("--seen_views", type=int, nargs="*", default=[], help="views the reconstruction saw")
    parser.add_argument("--protocol", action="store_true", help="run the fit-and-score protocol over --subjects")
    parser.add_argument("--subjects", nargs="*", default=["128", "306"], help="subjects for --protocol")
    args = vars(parser.parse_args(argv))
    splats_path, seen, protocol, subjects = (args.pop(k) for k in ("splats", "seen_views", "protocol", "subjects"))
    yaml_path = args.pop("config", None)
    values = {}
    if yaml_path:
        from fastavatar.config import load_yaml

        values.update(load_yaml(yaml_path))
    values.update(args)
    cfg = config_from_dict(GuidedConfig, values)
    try:
        if protocol:
            from fastavatar.guided import run_protocol

            table = run_protocol(cfg, subjects)
            print((Path(cfg.output_dir) / "table.md").read_text())
            return 0 if table["subjects"] else 1
        if splats_path is None:
            parser.error("give --splats PLY (one reconstruction) or --protocol")
        from fastavatar.data import SubjectParser, discover_subjects
        from fastavatar.evaluate import evaluate_reconstruction
        from fastavatar.losses import load_lpips
        from fastavatar.ply import load_ply
        from fastavatar.train.common import resolve_device

        device = resolve_device(cfg.device)
        subject = SubjectParser(discover_subjects(cfg.data_root, [cfg.sample_id])[0], image_scale=cfg.image_scale)
        results = evaluate_reconstruction(load_ply(splats_path, device), subject, Path(cfg.output_dir), seen,
                                          load_lpips(cfg.lpips_net, device), cfg.backend, device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for key in ("unseen", "seen", "all"):
        if results[key]:
            m = results[key]
            lp = "n/a" if m["lpips"] is None else f"{m['lpips']:.4f}"
            print(f"[evaluate] {key:6s} PSNR {m['psnr']:.2f} dB  SSIM {m['ssim']:.4f}  LPIPS {lp}")
    print(f"[evaluate] wrote {cfg.output_dir}/results.json and per_view.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
