#!/usr/bin/env python
"""Benchmark animation (fastavatar.bench.animate). Prints JSON.

    python scripts/benchmark_animate.py [--num_gaussians 10144] [--num_expr 50 100] [--output bench.json]

Random full-size rigs (no FLAME file needed), analytic and learned: blendshapes + skinning per
frame ("drive"), blend + skin + render one frame end to end next to GaussianBlendshapes' 370 fps
("frame": our torch rasterizer on CPU, gsplat on CUDA when present), and seconds per learned-
blendshape training iteration ("train_step").
"""

import sys


from fastavatar.bench.animate import benchmark_main  # noqa: E402

if __name__ == "__main__":
    from fastavatar.cli import run_script

    sys.exit(run_script(lambda _argv: benchmark_main()))
