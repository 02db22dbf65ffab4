"""Feed-forward single-photo inference ("no guidance"): photo -> 3D Gaussian head in one pass.

Stages (as in the original ``inference_feedforward_no_guidance.py``):
1. face embedding: insightface ``buffalo_l`` detector + ArcFace (:mod:`fastavatar.face`);
2. tracker: DINOv2 on the whole photo squashed to 224x224 -> ``points [10144,3]`` and a
   camera-to-world pose ``[4,4]`` (OpenCV);
3. W encoder: embedding -> ``w [1,512]``;
4. decoder: ``w`` -> per-Gaussian offsets on the template; ``means = points + 0.1 tanh(dmu)``;
5. export: ``splats.ply`` (standard 3DGS), ``w_vector.npy``, ``dino_points.npy``,
   ``dino_camera_pose.npy``, ``summary.json`` and (new) renders in ``images/``.

Intrinsics of the predicted camera: see :mod:`fastavatar.inference.feedforward.outputs`.

Speed: stages 1 and 2 are independent, so the face stage (onnxruntime, which releases the
GIL) runs in a worker thread while the tracker runs (``--overlap_face_and_tracker``, default
on; identical results). ``scripts/benchmark_inference.py`` (:mod:`fastavatar.bench.inference`) times every stage.

Differences from the original: models load from any path (no hard-coded
``averaged_model.ply``), the DINO backbone is built offline, ``--no-save_ply`` works, the
largest face is used (not the highest-scoring one), a folder of photos is processed in batch
mode (a failing photo is reported and skipped), renders are written, and the resolved
options are saved as ``config.yaml`` in the output folder.

Modules: :mod:`.config` (options), :mod:`.loading` (checkpoints + face models),
:mod:`.pipeline` (one photo, no files), :mod:`.outputs` (files of one photo), :mod:`.batch`
(a photo or a folder, and the CLI).
"""

from fastavatar.inference.feedforward.batch import main, run
from fastavatar.inference.feedforward.config import FeedForwardConfig
from fastavatar.inference.feedforward.loading import FeedForwardModels, MissingFileError, load_models
from fastavatar.inference.feedforward.outputs import predicted_intrinsics, splat_statistics, write_outputs
from fastavatar.inference.feedforward.pipeline import FeedForwardResult, run_photo

__all__ = [
    "FeedForwardConfig",
    "FeedForwardModels",
    "FeedForwardResult",
    "MissingFileError",
    "load_models",
    "main",
    "predicted_intrinsics",
    "run",
    "run_photo",
    "splat_statistics",
    "write_outputs",
]
