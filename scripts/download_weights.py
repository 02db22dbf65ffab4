#!/usr/bin/env python
"""Download the model files that have a stable public URL, checked against pinned sha256, into the
places our loaders search; print exact instructions for the rest (official FastAvatar zip, FLAME).

    python scripts/download_weights.py                       # everything downloadable
    python scripts/download_weights.py --dry-run             # list what goes where, fetch nothing
    python scripts/download_weights.py --only lpips_alex buffalo_l
    python scripts/download_weights.py --verify              # check every placed file (also manual ones)

Names: buffalo_l, dinov2_vitb14, lpips_alex, lpips_vgg (downloaded); fastavatar, flame (manual).
An interrupted download resumes on the next run; files already there with the right sha256 are skipped.
"""

import argparse
import sys
from pathlib import Path


from fastavatar.apps.weights import ALL_NAMES, DEFAULT_WEIGHTS_DIR, run_download_weights  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=ALL_NAMES, help="only these entries")
    ap.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                    help="list URL -> destination for each entry and fetch nothing")
    ap.add_argument("--verify", action="store_true",
                    help="check placed files: sha256 for downloads, strict loading for the official weights and FLAME")
    ap.add_argument("--force", action="store_true", help="download again even when a file is present")
    ap.add_argument("--weights_dir", type=Path, default=DEFAULT_WEIGHTS_DIR,
                    help="folder the loaders read (LPIPS trunks always go to $TORCH_HOME/hub/checkpoints)")
    ap.add_argument("--retries", type=int, default=2, help="resume attempts within one run after a cut transfer")
    ap.add_argument("--no-progress", "--no_progress", dest="progress", action="store_false", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        return run_download_weights(args.only, args.weights_dir, dry_run=args.dry_run, verify=args.verify,
                                    force=args.force, show_progress=args.progress, retries=args.retries)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from fastavatar.cli import run_script

    raise SystemExit(run_script(main))
