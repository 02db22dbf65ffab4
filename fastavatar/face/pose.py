"""Camera of a plain photo from its landmarks: head pose and focal length by PnP.

The 3D side is the template landmarks (:mod:`fastavatar.face.template_landmarks`) placed on a
point set in template order; the 2D side the photo's detected landmarks. The principal point is
the image centre; the focal length, unknown, is found by a sweep (PnP at each focal, keep the
smallest robust reprojection error plus a prior term), refined by a finer sweep around the best.
For a face far from the camera (small depth range) the focal is weakly determined, and a prior
towards the training views' field of view (``prior_focal``) decides; only a photo with strong
perspective (a close-up selfie) moves it.

Conventions: OpenCV cameras (:mod:`fastavatar.core.cameras`), pixel centres at +0.5 (the
landmarks use the same continuous pixel coordinates, so K's principal point is (W/2, H/2)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

TRAINING_FOCAL_OVER_HEIGHT = 2048.2 / 802.0
"""Focal length / image height of the bundled training views (measured: 2047.5-2048.8 px at 550x802)."""


@dataclass
class PhotoCamera:
    """A pinhole camera for one photo, in the frame of the 3D landmarks."""

    w2c: np.ndarray  # [4,4] world-to-camera, OpenCV
    K: np.ndarray  # [3,3] pixels
    width: int
    height: int
    reprojection_px: float  # median landmark reprojection error (pixels)
    inliers: int  # landmarks within the robust threshold

    @property
    def c2w(self) -> np.ndarray:
        return np.linalg.inv(self.w2c)

    @property
    def focal(self) -> float:
        return float(self.K[0, 0])


def _intrinsics(f: float, width: int, height: int) -> np.ndarray:
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])


def _pnp(obj: np.ndarray, img: np.ndarray, K: np.ndarray, rvec0=None, tvec0=None):
    """PnP with SQPnP (global) then Levenberg-Marquardt; cv2's integer-centre pixels handled by the caller."""
    import cv2

    obj = np.ascontiguousarray(obj, dtype=np.float64)
    img = np.ascontiguousarray(img, dtype=np.float64)
    if rvec0 is None:
        ok, rvec, tvec = cv2.solvePnP(obj, img, K, None, flags=cv2.SOLVEPNP_SQPNP)
        if not ok:
            return None
    else:
        rvec, tvec = rvec0.copy(), tvec0.copy()
    rvec, tvec = cv2.solvePnPRefineLM(obj, img, K, None, rvec, tvec)
    return rvec, tvec


def _residuals(obj, img, K, rvec, tvec) -> np.ndarray:
    import cv2

    proj, _ = cv2.projectPoints(obj, rvec, tvec, K, None)
    return np.linalg.norm(proj[:, 0] - img, axis=1)


def estimate_camera(landmarks_2d: np.ndarray, landmarks_3d: np.ndarray, width: int, height: int,
                    focal: Optional[float] = None, prior_focal: Optional[float] = None, prior_weight: float = 1e-3,
                    num_focals: int = 25, focal_range=(0.5, 12.0)) -> PhotoCamera:
    """Pose (and focal, unless given) of a photo from matching landmarks.

    Args:
        landmarks_2d: [L,2] continuous pixel coords in the photo.
        landmarks_3d: [L,3] the same landmarks in the world (template) frame.
        width, height: photo size.
        focal: known focal length in pixels (then only the pose is solved).
        prior_focal: focal the score is pulled towards (default: the training views' field of view
            at this image height); ``prior_weight`` x |log(f / prior)| is added to the median reprojection
            error divided by the image height. The default 1e-3 makes halving or doubling the focal cost as
            much as 0.55 px of error on an 802 px photo: on the bundled views (faces at ~1.2 m) the landmarks
            cannot tell focal lengths apart by more than that, so the prior decides there (measured: rotation
            errors fell from 1-4 to 1-3 degrees on the frontal views against a free sweep, whose focal wandered
            to 1013-2065 px for a true 2048).
        num_focals, focal_range: the sweep, as multiples of the image height (log-spaced).
    Raises:
        ValueError: fewer than 6 finite landmark pairs, or PnP failed at every focal.
    """
    ok = np.isfinite(landmarks_2d).all(1) & np.isfinite(landmarks_3d).all(1)
    obj, img = landmarks_3d[ok], landmarks_2d[ok] - 0.5  # cv2 projects to integer-centred pixels
    if len(obj) < 6:
        raise ValueError(f"camera estimation needs at least 6 landmarks, got {len(obj)}")
    size = float(max(height, 1))
    prior = prior_focal if prior_focal is not None else TRAINING_FOCAL_OVER_HEIGHT * size

    def solve(f: float):
        K = _intrinsics(f, width, height)
        sol = _pnp(obj, img, K)
        if sol is None:
            return None
        res = _residuals(obj, img, K, *sol)
        # robust: trim the worst 20 % (silhouette-sliding or occluded landmarks), refit once
        keep = res <= np.quantile(res, 0.8)
        sol = _pnp(obj[keep], img[keep], K, *sol)
        res = _residuals(obj, img, K, *sol)
        err = float(np.median(res))
        score = err / size + (0.0 if focal is not None else prior_weight * abs(math.log(f / prior)))
        return score, f, K, sol, res

    if focal is not None:
        best = solve(float(focal))
    else:
        grid = np.geomspace(focal_range[0], focal_range[1], num_focals) * size
        cands = [c for c in (solve(f) for f in grid) if c is not None]
        if not cands:
            raise ValueError("camera estimation failed at every focal length tried")
        best = min(cands, key=lambda c: c[0])
        step = (focal_range[1] / focal_range[0]) ** (1.0 / (num_focals - 1))
        fine = np.geomspace(best[1] / step, best[1] * step, 9)
        cands = [c for c in (solve(f) for f in fine) if c is not None] + [best]
        best = min(cands, key=lambda c: c[0])
    if best is None:
        raise ValueError("camera estimation failed (PnP found no pose)")
    _, f, K, (rvec, tvec), res = best
    import cv2

    w2c = np.eye(4)
    w2c[:3, :3] = cv2.Rodrigues(rvec)[0]
    w2c[:3, 3] = tvec.ravel()
    threshold = max(3.0 * float(np.median(res)), 2.0)
    return PhotoCamera(w2c=w2c, K=K, width=int(width), height=int(height), reprojection_px=float(np.median(res)),
                       inliers=int((res < threshold).sum()))


def rotation_error_deg(R_a: np.ndarray, R_b: np.ndarray) -> float:
    """Geodesic angle between two rotations [3,3] (degrees)."""
    cos = (np.trace(R_a.T @ R_b) - 1.0) / 2.0
    return float(math.degrees(math.acos(float(np.clip(cos, -1.0, 1.0)))))


def yaw_pitch_roll_deg(w2c: np.ndarray) -> tuple:
    """Head angles seen by the camera (degrees), for messages: yaw about camera y, pitch about x, roll about z
    of the world-to-camera rotation (approximate decomposition R = Rz Ry Rx)."""
    R = w2c[:3, :3]
    yaw = math.degrees(math.asin(float(np.clip(-R[2, 0], -1.0, 1.0))))
    pitch = math.degrees(math.atan2(R[2, 1], R[2, 2]))
    roll = math.degrees(math.atan2(R[1, 0], R[0, 0]))
    return yaw, pitch, roll
