#!/usr/bin/env python
"""Time feed-forward inference per stage (face, tracker, encoder, decoder, export) and end to end.

Prints JSON. Uses random weights of the real sizes when the checkpoints in pretrained_weights/ are
absent (the JSON says so). Example: python scripts/benchmark_inference.py --device cpu --repeats 5
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastavatar.inference.feedforward import benchmark_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(benchmark_main())
