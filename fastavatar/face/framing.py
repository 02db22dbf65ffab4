"""Frame a photo the way the training views are framed, and composite it on white.

The bundled NeRSemble views (550x802, measured over the 48 views of 128/306/369): focal length
2048 px, principal point at the image centre, the head's point centroid at 1.19 m depth and
projected near (275, 360) px, so a head spans ~1730 px per metre at the head centre.

Given a photo's camera (pose and focal from :mod:`fastavatar.face.pose`), the framed image is a
pure similarity of the photo (scale ``s`` and a shift): exactly the photo seen by the **same
camera pose** with focal ``s * f`` and a moved principal point. ``s`` makes the head as many
pixels per metre as in the training views; the shift puts the head centre where they put it.
Pixels outside the photo become white.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from fastavatar.face.pose import PhotoCamera

TRAINING_WIDTH, TRAINING_HEIGHT = 550, 802
TRAINING_FOCAL = 2048.2  # px at 550x802
TRAINING_HEAD_DEPTH = 1.19  # m, camera-z of the subjects' point centroid (mean over the bundled views)
TRAINING_HEAD_PIXEL = (275.0, 360.0)  # where the centroid projects (x centred; y mean of the bundled views)


@dataclass
class FramedPhoto:
    """The photo in the training framing, at ``image_scale`` of 550x802."""

    rgb: np.ndarray  # [H, W, 3] uint8 framed photo, outside the photo = white (not composited)
    composite: np.ndarray  # [H, W, 3] float32 0..1: rgb * matte + white * (1 - matte)
    matte: np.ndarray  # [H, W] float32 0..1 foreground
    K: np.ndarray  # [3,3] intrinsics of the framed image (same pose as the photo camera)
    c2w: np.ndarray  # [4,4] OpenCV camera-to-world
    similarity: np.ndarray  # [2,3] photo pixels -> framed pixels (continuous coordinates)
    scale: float  # s: framed pixels per photo pixel


def framing_similarity(camera: PhotoCamera, head_center: np.ndarray, image_scale: float = 1.0):
    """(A [2,3] photo -> framed continuous pixels, K_framed [3,3], output (W, H)) for a photo camera.

    ``head_center`` [3] is the head's point centroid in the camera's world frame."""
    width = int(round(TRAINING_WIDTH * image_scale))
    height = int(round(TRAINING_HEIGHT * image_scale))
    x = camera.w2c[:3, :3] @ head_center + camera.w2c[:3, 3]
    if x[2] <= 0:
        raise ValueError("the estimated camera has the head behind it (landmarks or camera estimate failed)")
    u = camera.K[:2, :2] @ (x[:2] / x[2]) + camera.K[:2, 2]
    f_target = TRAINING_FOCAL * width / TRAINING_WIDTH * x[2] / TRAINING_HEAD_DEPTH
    s = f_target / camera.focal
    target = np.array(TRAINING_HEAD_PIXEL) * np.array([width / TRAINING_WIDTH, height / TRAINING_HEIGHT])
    b = target - s * u
    A = np.array([[s, 0.0, b[0]], [0.0, s, b[1]]])
    K = camera.K.copy()
    K[0, 0] *= s
    K[1, 1] *= s
    K[:2, 2] = s * camera.K[:2, 2] + b
    return A, K, (width, height)


def warp_photo(rgb: np.ndarray, A: np.ndarray, size) -> np.ndarray:
    """[H,W,3] uint8 photo -> framed [h,w,3] uint8 via the continuous-pixel similarity ``A`` (white outside).

    When shrinking, the photo is first resized with area averaging (warpAffine alone would alias),
    then the remaining similarity is applied bilinearly."""
    import cv2

    s = float(A[0, 0])
    if s < 1.0:
        small = cv2.resize(rgb, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        sx, sy = small.shape[1] / rgb.shape[1], small.shape[0] / rgb.shape[0]
        rest = A.copy()  # framed = A (photo) = rest (small), small = diag(sx, sy) photo
        rest[0, 0], rest[1, 1] = A[0, 0] / sx, A[1, 1] / sy
        return warp_photo_linear(small, rest, size)
    return warp_photo_linear(rgb, A, size)


def warp_photo_linear(rgb: np.ndarray, A: np.ndarray, size) -> np.ndarray:
    """Bilinear warp of [H,W,C] uint8 by the continuous-pixel affine ``A`` [2,3] to ``size`` (W, H); white outside."""
    import cv2

    A_idx = A.copy()
    A_idx[:, 2] = A[:, 2] + A[:, :2] @ np.array([0.5, 0.5]) - 0.5
    return cv2.warpAffine(rgb, A_idx, tuple(int(v) for v in size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(255, 255, 255))


def frame_photo(rgb: np.ndarray, camera: PhotoCamera, head_center: np.ndarray, image_scale: float = 1.0,
                matte_fn=None, matte: Optional[np.ndarray] = None) -> FramedPhoto:
    """Crop/scale ``rgb`` [H,W,3] uint8 to the training framing and composite it on white.

    ``matte_fn(framed_rgb) -> [h,w]`` computes the foreground on the framed image (the face
    stage's segmenter); or pass a photo-sized ``matte`` [H,W] to warp instead."""
    A, K, size = framing_similarity(camera, head_center, image_scale)
    framed = warp_photo(rgb, A, size)
    if matte is not None:
        m = warp_photo_linear((np.clip(matte, 0, 1) * 255).astype(np.uint8)[..., None].repeat(3, 2), A, size)
        m = m[..., 0].astype(np.float32) / 255.0
    elif matte_fn is not None:
        m = np.clip(np.asarray(matte_fn(framed), dtype=np.float32), 0.0, 1.0)
    else:
        m = np.ones(framed.shape[:2], dtype=np.float32)
    composite = framed.astype(np.float32) / 255.0 * m[..., None] + (1.0 - m[..., None])
    return FramedPhoto(rgb=framed, composite=composite, matte=m, K=K, c2w=camera.c2w, similarity=A,
                       scale=float(A[0, 0]))
