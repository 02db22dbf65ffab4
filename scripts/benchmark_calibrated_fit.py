#!/usr/bin/env python
"""Check the calibrated single-view fit targets from two leave-one-out protocol tables; prints JSON.

    python scripts/train_loo_decoders.py
    python scripts/evaluate.py --config configs/protocol_loo.yaml --no-per_gaussian --output_dir results/protocol_loo_today
    python scripts/evaluate.py --config configs/protocol_loo.yaml          # -> results/protocol_loo_pg
    python scripts/benchmark_calibrated_fit.py
"""

import sys

from fastavatar.bench.calibrated import calibrated_targets_main

if __name__ == "__main__":
    from fastavatar.cli import run_script

    sys.exit(run_script(lambda argv: calibrated_targets_main(argv, __doc__)))
