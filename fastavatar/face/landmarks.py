"""Camera-free face stage: face detection, 468 dense landmarks and a foreground matte.

Three small Apache-2.0 models from mediapipe 0.10.21 are vendored in ``fastavatar/face/assets``
(see ``assets/NOTICE.md`` for provenance and sha256) and run on ``ai-edge-litert`` (the
``face`` extra: ``pip install -e ".[face]"``), which works with this project's numpy 2 /
protobuf 5+ stack where the mediapipe package itself (numpy<2, protobuf<5) does not. Everything
around the networks is ours: BlazeFace anchor generation and decoding, weighted non-maximum
suppression, rotated region-of-interest crops, landmark back-projection and matte resampling.

Conventions:
- images are ``[H, W, 3] uint8`` RGB (load them with :func:`fastavatar.face.images.load_rgb`);
- image coordinates are **continuous pixels**, pixel (i, j) covering ``[j, j+1) x [i, i+1)``
  (centre at +0.5, as in :mod:`fastavatar.core.cameras`);
- landmarks are ``[468, 3]``: x, y in image pixels, z in pixels at the same scale (relative depth,
  smaller = closer to the camera), the mediapipe face-mesh topology (``FACE_MESH_*`` indices).

A region of interest (``Roi``) is a square of side ``size`` centred on ``center`` and rotated by
``angle`` (radians, image x-axis towards image y-axis). Its local x-axis is the eye line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from fastavatar.face.embedding import FaceError

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DETECTOR_FILE = "face_detection_short_range.tflite"
FAR_DETECTOR_FILE = "face_detection_full_range_sparse.tflite"
LANDMARK_FILE = "face_landmark.tflite"
SEGMENTER_FILE = "selfie_segmentation.tflite"

INSTALL_HINT = 'pip install -e ".[face]"'
"""What to install when the tflite runtime is absent."""

NUM_LANDMARKS = 468
"""Points of the mediapipe face mesh (the model without the attention/iris refinement)."""

FACE_MESH_RIGHT_EYE_OUTER = 33  # subject's right eye, outer corner (image left on a frontal photo)
FACE_MESH_LEFT_EYE_OUTER = 263  # subject's left eye, outer corner
FACE_MESH_NOSE_TIP = 1
FACE_MESH_CHIN = 152
FACE_MESH_FOREHEAD = 10

DETECTION_KEYPOINTS = ("right_eye", "left_eye", "nose", "mouth", "right_ear", "left_ear")
"""The six BlazeFace keypoints, in output order (subject's right/left)."""


class FaceRuntimeMissingError(ImportError):
    """The tflite runtime (``ai-edge-litert``) is not installed; the message says what to install."""


@dataclass
class Detection:
    """One detected face (image pixels)."""

    box: np.ndarray  # [4] x0, y0, x1, y1
    score: float  # detector confidence in [0, 1]
    keypoints: np.ndarray  # [6, 2] x, y (DETECTION_KEYPOINTS order)

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)


@dataclass
class Roi:
    """Rotated square crop: image point = center + size * R(angle) @ (q / S - 1/2) for crop point q in [0, S]^2."""

    center: np.ndarray  # [2] image pixels
    size: float  # side in image pixels
    angle: float  # radians

    def crop_to_image(self, crop_side: int) -> np.ndarray:
        """[2, 3] affine mapping continuous crop coords (side ``crop_side``) to continuous image coords."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        k = self.size / crop_side
        lin = k * np.array([[c, -s], [s, c]])
        offset = self.center - lin @ np.array([crop_side / 2.0, crop_side / 2.0])
        return np.concatenate([lin, offset[:, None]], axis=1)


@dataclass
class FaceObservation:
    """What the face stage found in one photo."""

    detection: Detection  # the face used (the largest)
    num_faces: int  # faces found (after suppression)
    landmarks: np.ndarray  # [468, 3] image pixels (see module docstring)
    landmark_score: float  # face-presence probability of the landmark model on its crop
    roi: Roi  # the landmark crop
    matte: Optional[np.ndarray] = None  # [H, W] float32 in [0, 1] (person foreground), if asked for
    warnings: List[str] = field(default_factory=list)  # one-line notes (several faces, near-profile, ...)


# ---------------------------------------------------------------------------------------------- runtime
def _interpreter(path: Path, num_threads: int):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise FaceRuntimeMissingError(
            f"the camera-free face stage needs the tflite runtime 'ai-edge-litert': {INSTALL_HINT}") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: face model file missing (it ships inside the fastavatar package; "
                                "reinstall with pip install -e .)")
    interp = Interpreter(model_path=str(path), num_threads=num_threads)
    interp.allocate_tensors()
    return interp


class _TfliteModel:
    """One single-input tflite network: ``__call__(x [1,S,S,3] float32) -> list of outputs``."""

    def __init__(self, path: Path, num_threads: int) -> None:
        self.interp = _interpreter(path, num_threads)
        self.input = self.interp.get_input_details()[0]
        self.outputs = self.interp.get_output_details()
        self.side = int(self.input["shape"][1])

    def __call__(self, x: np.ndarray) -> List[np.ndarray]:
        self.interp.set_tensor(self.input["index"], np.ascontiguousarray(x, dtype=np.float32))
        self.interp.invoke()
        return [self.interp.get_tensor(o["index"]).copy() for o in self.outputs]


def runtime_available() -> bool:
    """Whether ``ai-edge-litert`` can be imported."""
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- geometry
def warp_to_crop(rgb: np.ndarray, roi: Roi, side: int) -> np.ndarray:
    """[H,W,3] uint8 image -> [side, side, 3] float32 in [0, 1]: the rotated ROI, bilinear, outside = black."""
    import cv2

    m = roi.crop_to_image(side)
    # cv2 uses integer pixel centres: shift both sides by 0.5
    m_idx = m.copy()
    m_idx[:, 2] = m[:, 2] + m[:, :2] @ np.array([0.5, 0.5]) - 0.5
    crop = cv2.warpAffine(rgb, m_idx, (side, side), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    return crop.astype(np.float32) / 255.0


def crop_points_to_image(points: np.ndarray, roi: Roi, side: int) -> np.ndarray:
    """[K, 2] continuous crop coords -> [K, 2] continuous image coords."""
    m = roi.crop_to_image(side)
    return points @ m[:, :2].T + m[:, 2]


def whole_image_roi(width: int, height: int) -> Roi:
    """The letterbox ROI: the whole image centred in a square of side max(W, H), unrotated."""
    return Roi(center=np.array([width / 2.0, height / 2.0]), size=float(max(width, height)), angle=0.0)


SHORT_RANGE_ANCHORS = ((8, 2), (16, 6))
"""(stride, anchors per cell) of the short-range BlazeFace (128 px input): 16x16x2 + 8x8x6 = 896 anchors
(the three stride-16 SSD layers of 2 anchors each share one feature map)."""

FULL_RANGE_ANCHORS = ((4, 1),)
"""(stride, anchors per cell) of the full-range BlazeFace (192 px input): 48x48x1 = 2304 anchors."""


def blazeface_anchors(side: int = 128, layout=SHORT_RANGE_ANCHORS) -> np.ndarray:
    """[A, 2] anchor centres (normalised) of a BlazeFace SSD head.

    One feature map per ``(stride, per_cell)`` entry of ``layout``; anchors of a cell are
    consecutive, cells in row-major order; all anchors have unit size (the box regressors are
    absolute, in input pixels)."""
    centres = []
    for stride, per_cell in layout:
        n = side // stride
        ys, xs = np.meshgrid((np.arange(n) + 0.5) / n, (np.arange(n) + 0.5) / n, indexing="ij")
        cell = np.stack([xs.ravel(), ys.ravel()], axis=1)
        centres.append(np.repeat(cell, per_cell, axis=0))
    return np.concatenate(centres, axis=0)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of one box a [4] with boxes b [K, 4] (x0, y0, x1, y1)."""
    x0 = np.maximum(a[0], b[:, 0])
    y0 = np.maximum(a[1], b[:, 1])
    x1 = np.minimum(a[2], b[:, 2])
    y1 = np.minimum(a[3], b[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda r: np.clip(r[..., 2] - r[..., 0], 0, None) * np.clip(r[..., 3] - r[..., 1], 0, None)  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-12)


def weighted_nms(boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray, iou_threshold: float
                 ) -> List[Tuple[np.ndarray, np.ndarray, float]]:
    """Blend overlapping detections: each cluster (IoU > threshold with the best remaining box)
    becomes one detection whose box and keypoints are the score-weighted mean, with the best score.

    boxes [K,4], keypoints [K,6,2], scores [K] -> list of (box [4], keypoints [6,2], score)."""
    order = np.argsort(-scores)
    boxes, keypoints, scores = boxes[order], keypoints[order], scores[order]
    alive = np.ones(len(scores), dtype=bool)
    out = []
    for i in range(len(scores)):
        if not alive[i]:
            continue
        members = alive & (box_iou(boxes[i], boxes) > iou_threshold)
        members[i] = True
        w = scores[members][:, None]
        box = (boxes[members] * w).sum(0) / w.sum()
        kps = (keypoints[members] * w[:, :, None]).sum(0) / w.sum()
        out.append((box, kps, float(scores[i])))
        alive &= ~members
    return out


def roi_from_points(points: np.ndarray, angle: float, scale: float) -> Roi:
    """Square ROI around [K,2] image points, aligned to ``angle``: the points' extent measured in the
    rotated frame, longer side times ``scale``."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    local = points @ rot  # image -> rotated frame (R^T p)
    lo, hi = local.min(0), local.max(0)
    centre = rot @ ((lo + hi) / 2.0)
    return Roi(center=centre, size=float((hi - lo).max() * scale), angle=angle)


def eye_angle(right_eye: np.ndarray, left_eye: np.ndarray) -> float:
    """In-plane rotation of the eye line (radians): 0 when the subject's left eye lies straight to the
    right of the right eye in the image (upright, frontal)."""
    d = left_eye - right_eye
    return math.atan2(float(d[1]), float(d[0]))


# ---------------------------------------------------------------------------------------------- stage
@dataclass
class FaceStageConfig:
    min_detection_score: float = 0.5  # BlazeFace score threshold (mediapipe's default)
    nms_iou: float = 0.3  # weighted-NMS overlap threshold (mediapipe's default)
    min_face_px: float = 40.0  # smallest accepted face box side in the photo (pixels)
    min_landmark_score: float = 0.5  # face-presence probability below which the landmarks are rejected
    roi_scale: float = 1.5  # landmark crop side / face extent (mediapipe's default)
    landmark_passes: int = 2  # landmark crops: 1 from the detection, then re-centred on the landmarks
    profile_ratio: float = 4.0  # nose-to-eye-corner distance ratio above which the run warns of a near-profile face
    num_threads: int = 2  # tflite interpreter threads


class FaceStage:
    """Detector + landmarks + matte, loaded once (each model ~0.2-1.2 MB; runs in a few ms on CPU)."""

    def __init__(self, config: Optional[FaceStageConfig] = None, assets_dir: Optional[Path] = None) -> None:
        self.config = config or FaceStageConfig()
        assets = Path(assets_dir) if assets_dir is not None else ASSETS_DIR
        n = self.config.num_threads
        self.detector = _TfliteModel(assets / DETECTOR_FILE, n)
        self.far_detector = _TfliteModel(assets / FAR_DETECTOR_FILE, n)
        self.landmarker = _TfliteModel(assets / LANDMARK_FILE, n)
        self.segmenter = _TfliteModel(assets / SEGMENTER_FILE, n)
        self.anchors = blazeface_anchors(self.detector.side, SHORT_RANGE_ANCHORS)
        self.far_anchors = blazeface_anchors(self.far_detector.side, FULL_RANGE_ANCHORS)

    # ------------------------------------------------------------------ detection
    def detect(self, rgb: np.ndarray) -> List[Detection]:
        """All faces in [H,W,3] uint8 RGB, largest first: the short-range detector (faces that fill a
        good part of the photo, like the training views), then the full-range one when it finds none
        (group photos, faces farther away)."""
        dets = self._detect_with(rgb, self.detector, self.anchors)
        if not dets:
            dets = self._detect_with(rgb, self.far_detector, self.far_anchors)
        return dets

    def _detect_with(self, rgb: np.ndarray, model: "_TfliteModel", anchors: np.ndarray) -> List[Detection]:
        h, w = rgb.shape[:2]
        side = model.side
        roi = whole_image_roi(w, h)
        x = warp_to_crop(rgb, roi, side) * 2.0 - 1.0  # BlazeFace input range [-1, 1]
        outs = model(x[None])
        raw = next(o for o in outs if o.shape[-1] == 16)[0]  # [A, 16]: box (cx, cy, w, h) + 6 keypoints
        logits = next(o for o in outs if o.shape[-1] == 1)[0, :, 0]
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float64), -100.0, 100.0)))
        keep = scores >= self.config.min_detection_score
        if not keep.any():
            return []
        raw, scores, anchors = raw[keep], scores[keep], anchors[keep]
        centre = raw[:, 0:2] / side + anchors
        size = raw[:, 2:4] / side
        boxes_n = np.concatenate([centre - size / 2.0, centre + size / 2.0], axis=1)
        kps_n = raw[:, 4:16].reshape(-1, 6, 2) / side + anchors[:, None, :]
        # normalised crop coords -> image pixels (the letterbox is an axis-aligned similarity)
        to_img = lambda p: crop_points_to_image(p.reshape(-1, 2) * side, roi, side)  # noqa: E731
        boxes = to_img(boxes_n).reshape(-1, 4)
        kps = to_img(kps_n).reshape(-1, 6, 2)
        dets = [Detection(box=b, score=s, keypoints=k)
                for b, k, s in weighted_nms(boxes, kps, scores, self.config.nms_iou)]
        return sorted(dets, key=lambda d: -d.area)

    # ------------------------------------------------------------------ landmarks
    def landmarks_in_roi(self, rgb: np.ndarray, roi: Roi) -> Tuple[np.ndarray, float]:
        """[468, 3] image-pixel landmarks and the face-presence probability for one crop."""
        side = self.landmarker.side
        x = warp_to_crop(rgb, roi, side)  # landmark model input range [0, 1]
        outs = self.landmarker(x[None])
        flat = next(o for o in outs if o.size == NUM_LANDMARKS * 3).reshape(NUM_LANDMARKS, 3)
        flag = next(o for o in outs if o.size == 1)
        score = float(1.0 / (1.0 + math.exp(-float(np.clip(flag.ravel()[0], -100, 100)))))
        xy = crop_points_to_image(flat[:, :2], roi, side)
        z = flat[:, 2:3] * (roi.size / side)
        return np.concatenate([xy, z], axis=1).astype(np.float32), score

    def landmarks(self, rgb: np.ndarray, detection: Detection) -> Tuple[np.ndarray, float, Roi]:
        """Landmarks for one detection: a crop from the detection's eyes and box, then
        ``landmark_passes - 1`` crops re-centred and re-rotated on the previous landmarks."""
        cfg = self.config
        angle = eye_angle(detection.keypoints[0], detection.keypoints[1])
        box = detection.box
        corners = np.array([[box[0], box[1]], [box[2], box[1]], [box[0], box[3]], [box[2], box[3]]])
        # the detector box is axis-aligned: use its centre and longer side, rotated to the eyes
        roi = Roi(center=corners.mean(0), size=float(max(detection.width, detection.height) * cfg.roi_scale),
                  angle=angle)
        lms, score = self.landmarks_in_roi(rgb, roi)
        for _ in range(max(cfg.landmark_passes, 1) - 1):
            if score < cfg.min_landmark_score:
                break
            angle = eye_angle(lms[FACE_MESH_RIGHT_EYE_OUTER, :2], lms[FACE_MESH_LEFT_EYE_OUTER, :2])
            roi = roi_from_points(lms[:, :2], angle, cfg.roi_scale)
            lms, score = self.landmarks_in_roi(rgb, roi)
        return lms, score, roi

    # ------------------------------------------------------------------ matte
    def matte(self, rgb: np.ndarray) -> np.ndarray:
        """[H, W] float32 foreground (person) probability for [H,W,3] uint8 RGB."""
        import cv2

        h, w = rgb.shape[:2]
        side = self.segmenter.side
        roi = whole_image_roi(w, h)
        x = warp_to_crop(rgb, roi, side)
        prob = self.segmenter(x[None])[0].reshape(side, side).astype(np.float32)
        if prob.min() < 0.0 or prob.max() > 1.0:  # logits (not the case for the shipped model)
            prob = 1.0 / (1.0 + np.exp(-prob))
        m = roi.crop_to_image(side)  # crop -> image, continuous
        m_idx = m.copy()
        m_idx[:, 2] = m[:, 2] + m[:, :2] @ np.array([0.5, 0.5]) - 0.5
        inv = cv2.invertAffineTransform(m_idx)  # image (index) -> crop (index)
        return cv2.warpAffine(prob, inv, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_REPLICATE)

    # ------------------------------------------------------------------ all of it
    def analyse(self, rgb: np.ndarray, name: str = "photo", with_matte: bool = True) -> FaceObservation:
        """Detect, pick the largest face, find its landmarks (and the matte).

        Raises:
            FaceError: one line naming ``name``: no face, face too small, landmarks failed.
        """
        cfg = self.config
        dets = self.detect(rgb)
        if not dets:
            raise FaceError(f"{name}: no face found (the detector expects a face that fills a good part of the photo; "
                            "crop closer if the face is small)")
        det = dets[0]
        notes = []
        if len(dets) > 1:
            notes.append(f"{name}: {len(dets)} faces found; using the largest ({det.width:.0f}x{det.height:.0f} px, "
                         f"score {det.score:.2f})")
        side = min(det.width, det.height)
        if side < cfg.min_face_px:
            raise FaceError(f"{name}: the face is only {side:.0f} px across; need at least {cfg.min_face_px:.0f} px "
                            "(use a larger or closer photo)")
        lms, score, roi = self.landmarks(rgb, det)
        if score < cfg.min_landmark_score:
            raise FaceError(f"{name}: face found but the landmarks failed (presence {score:.2f} < "
                            f"{cfg.min_landmark_score}); an extreme profile or a heavily occluded face cannot be used")
        ratio = profile_ratio(lms)
        if ratio > cfg.profile_ratio:
            notes.append(f"{name}: strongly turned face (one eye corner {ratio:.1f}x farther from the nose than the "
                         "other); the hidden side's landmarks are guesses, expect a weaker camera estimate")
        matte = self.matte(rgb) if with_matte else None
        return FaceObservation(detection=det, num_faces=len(dets), landmarks=lms, landmark_score=score, roi=roi,
                               matte=matte, warnings=notes)


def profile_ratio(landmarks: np.ndarray) -> float:
    """Larger / smaller image distance from the nose tip to the two outer eye corners (1 when frontal)."""
    nose = landmarks[FACE_MESH_NOSE_TIP, :2]
    a = float(np.linalg.norm(landmarks[FACE_MESH_RIGHT_EYE_OUTER, :2] - nose))
    b = float(np.linalg.norm(landmarks[FACE_MESH_LEFT_EYE_OUTER, :2] - nose))
    return max(a, b) / max(min(a, b), 1e-6)
