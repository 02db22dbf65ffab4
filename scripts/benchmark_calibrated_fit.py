#!/usr/bin/env python
"""Check the calibrated single-view fit targets from two leave-one-out protocol tables; prints JSON.

    python scripts/train_loo_decoders.py
    python scripts/evaluate.py --protocol --subjects 128 306 369 --image_scale 0.25 --w_lr 1e-2 --mlp_lr 1e-3 \\
        --decoder_checkpoint 'outputs/loo/{subject}/decoder_run/checkpoints/latest.pth' --no-per_gaussian \\
        --output_dir results/protocol_loo_today
    python scripts/evaluate.py --protocol --subjects 128 306 369 --image_scale 0.25 --w_lr 1e-2 --mlp_lr 3e-3 \\
        --decoder_checkpoint 'outputs/loo/{subject}/decoder_run/checkpoints/latest.pth' --output_dir results/protocol_loo
    python scripts/benchmark_calibrated_fit.py
"""

import sys

from fastavatar.bench.calibrated import calibrated_targets_main

if __name__ == "__main__":
    from fastavatar.cli import run_script

    sys.exit(run_script(lambda argv: calibrated_targets_main(argv, __doc__)))
