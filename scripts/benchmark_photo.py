#!/usr/bin/env python
"""Benchmark photo -> splats of the camera-free mode with the given decoder and an official-size one; prints JSON.

    python scripts/benchmark_photo.py --config configs/photo_cpu.yaml --image data/nersemble/128/images/00000_08.png \\
        --decoder_checkpoint outputs/loo/128/decoder_run/checkpoints/latest.pth
"""

import json
import sys



def main(argv=None) -> int:
    from fastavatar.bench.photo import benchmark_photo
    from fastavatar.config import parse_config
    from fastavatar.inference.photo import PhotoConfig

    cfg = parse_config(PhotoConfig, argv, description=__doc__)
    try:
        print(json.dumps(benchmark_photo(cfg), indent=1))
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from fastavatar.cli import run_script

    sys.exit(run_script(main))
