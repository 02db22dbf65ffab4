#!/usr/bin/env python
"""Tune the single-view refinement by a nested leave-one-subject-out choice (fastavatar/eval/tuning.py).

Each held-out subject is fitted from its input view with the decoder trained without it, once per
grid point; each subject's reported score uses the setting chosen on the other subjects.

    python scripts/train_loo_decoders.py        # the leave-one-out decoders, once
    python scripts/tune_refinement.py --grid '{"mlp_steps": [0, 30], "pg_steps": [100, 200, 300]}'
"""

import sys

from fastavatar.eval.tuning import tune_main

if __name__ == "__main__":
    from fastavatar.cli import run_script

    sys.exit(run_script(lambda _argv: tune_main(description=__doc__)))
