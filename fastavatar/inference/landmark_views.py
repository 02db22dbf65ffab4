"""Dense face landmarks in a calibrated subject's views (for the template landmark file, its test,
and the photo-mode protocol's camera check).

Landmarks are detected on the raw view images (the white-background photos as they are on disk,
at full resolution) with :class:`fastavatar.face.landmarks.FaceStage`.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from fastavatar.data import SubjectParser
from fastavatar.face.embedding import FaceError
from fastavatar.face.images import load_rgb
from fastavatar.face.landmarks import NUM_LANDMARKS, FaceStage
from fastavatar.face.template_landmarks import SubjectLandmarkViews


def detect_view_landmarks(parser: SubjectParser, stage: FaceStage) -> Tuple[np.ndarray, List[Optional[str]]]:
    """[V, 468, 2] landmarks in the views' full-resolution pixels (NaN where the face stage failed),
    and per view ``None`` or the one-line reason it failed."""
    out = np.full((len(parser), NUM_LANDMARKS, 2), np.nan)
    notes: List[Optional[str]] = []
    for v, path in enumerate(parser.image_paths):
        image = load_rgb(path, max_side=0)
        try:
            obs = stage.analyse(image.rgb, str(path), with_matte=False)
        except FaceError as exc:
            notes.append(str(exc))
            continue
        out[v] = obs.landmarks[:, :2] / image.scale
        notes.append(None)
    return out, notes


def full_resolution_intrinsics(parser: SubjectParser) -> np.ndarray:
    """[V,3,3] intrinsics at the files' own resolution (the parser's Ks are at ``image_scale``)."""
    Ks = parser.Ks.double().numpy().copy()
    Ks[:, 0, :] *= parser.full_width / parser.width
    Ks[:, 1, :] *= parser.full_height / parser.height
    return Ks


def subject_landmark_views(parser: SubjectParser, stage: FaceStage) -> SubjectLandmarkViews:
    """Everything :func:`fastavatar.face.template_landmarks.build_template_landmarks` needs from one subject."""
    lms, _ = detect_view_landmarks(parser, stage)
    return SubjectLandmarkViews(subject_id=parser.subject_id, points=parser.points.double().numpy(),
                                c2w=parser.c2w.double().numpy(), Ks=full_resolution_intrinsics(parser), landmarks=lms)


def build_template_landmark_file(data_root: str, subjects: List[str], output, threshold_px: float = 12.0,
                                 stage: Optional[FaceStage] = None) -> dict:
    """Detect, triangulate and anchor the landmarks of ``subjects`` under ``data_root``; write ``output``.

    Returns the build report (per-subject median reprojection error in full-resolution pixels, ...)."""
    from pathlib import Path

    from fastavatar.data import discover_subjects
    from fastavatar.face.template_landmarks import TEMPLATE_LANDMARKS_VERSION, build_template_landmarks

    stage = stage or FaceStage()
    dirs = discover_subjects(data_root, subjects)
    views = [subject_landmark_views(SubjectParser(d), stage) for d in dirs]
    template, report = build_template_landmarks(views, threshold_px=threshold_px)
    report = {"version": TEMPLATE_LANDMARKS_VERSION, "subjects": [v.subject_id for v in views],
              "threshold_px": threshold_px,
              "views_without_landmarks": {v.subject_id: int((~np.isfinite(v.landmarks).all(axis=(1, 2))).sum())
                                          for v in views},
              **report}
    template.save(Path(output), meta=report)
    return report
