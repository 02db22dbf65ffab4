#!/usr/bin/env python
"""Benchmark the test-time refinement (W phase, MLP phase) and print JSON.

Seconds per refinement iteration of each phase at the given image scales with the official decoder
size on subject 306's view 8, and the full default refinement (150 W + 150 MLP steps), run
(``--full``) or extrapolated. Uses ``--decoder_checkpoint`` when given, otherwise random weights.

    python scripts/benchmark_refine.py --scales 0.25 1.0 --iters 5
"""

import sys

from fastavatar.bench.refine import benchmark_refine_main

if __name__ == "__main__":
    from fastavatar.cli import run_script

    sys.exit(run_script(lambda _argv: benchmark_refine_main(description=__doc__)))
