"""FLAME head model: loading and forward (LBS). Teeth layout: :mod:`fastavatar.flame.teeth`;
triangle centres and the points3D check: :mod:`fastavatar.flame.points`
(``python -m fastavatar.flame.points --subject_dir data/nersemble/306 --flame_model ...``)."""

from fastavatar.flame.model import (  # noqa: F401
    DEFAULT_FLAME_PATH,
    FlameModel,
    FlameModelMissing,
    FlameOutput,
    flame_forward,
    lbs_transforms,
    load_flame_model,
    params_from_npz,
    pose_feature,
    skin_points,
)
