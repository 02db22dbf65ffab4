#!/usr/bin/env python
"""Score reconstructions against calibrated views.

Score one reconstruction (renders + ground truth side by side, results.json, per_view.json):

    python scripts/evaluate.py --splats out/splats.ply --data_root data/nersemble --sample_id 128 --seen_views 8

Run the protocol over subjects (fit from the input view, score the unseen views; a table with the
template and feed-forward baselines):

    python scripts/evaluate.py --protocol --subjects 128 306 --decoder_checkpoint runs/decoder/checkpoints/latest.pth

Photo-mode protocol (leave one subject out: view 8 used as a plain photo, camera-free reconstruction,
scored on the other views beside the template and the calibrated fit; ``--photo --help`` for its flags):

    python scripts/evaluate.py --protocol --photo --subjects 128 306 369 --image_scale 0.25 \\
        --loo_decoders "outputs/loo/{subject}/decoder_run/checkpoints/latest.pth" --output_dir results/photo_protocol
"""

import sys

from fastavatar.eval.protocol import evaluate_main

if __name__ == "__main__":
    from fastavatar.cli import run_script

    if "--photo" in sys.argv[1:]:
        from fastavatar.eval.photo_protocol import photo_protocol_main

        sys.exit(run_script(lambda _argv: photo_protocol_main(sys.argv[1:], description=__doc__)))
    sys.exit(run_script(lambda _argv: evaluate_main(description=__doc__)))
