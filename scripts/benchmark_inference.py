#!/usr/bin/env python
"""Time feed-forward inference per stage (face, tracker, encoder, decoder, export) and end to end.

Prints JSON. Uses random weights of the real sizes when the checkpoints in pretrained_weights/ are
absent (the JSON says so). Example: python scripts/benchmark_inference.py --device cpu --repeats 5
"""

import sys

from fastavatar.bench.inference import benchmark_main

if __name__ == "__main__":
    from fastavatar.cli import run_script

    sys.exit(run_script(lambda _argv: benchmark_main()))
