"""ArcFace identity embedding of the face in a photo (insightface ``buffalo_l`` via onnxruntime).

Pipeline (same models and preprocessing as the original's ``FaceAnalysis(name='buffalo_l')``):
1. load the photo robustly (:func:`fastavatar.face.images.load_rgb`; 8-bit, EXIF-oriented,
   huge images downscaled) and convert to BGR like ``cv2.imread``;
2. SCRFD detector ``det_10g.onnx`` at ``det_size=(640, 640)``, ``det_thresh=0.5`` (the
   original's library defaults) -> boxes + 5 landmarks;
3. choose the **largest** face (box area). The original used ``faces[0]``, i.e. the face with
   the highest detection score; on single-person photos both agree, on group photos or with a
   small background face ours picks the subject instead of whichever face scored highest;
4. 5-point similarity alignment to 112x112 (insightface ``norm_crop``) and ArcFace
   ``w600k_r50.onnx`` -> the **raw** (unnormalised) 512-d embedding, exactly what the
   original fed to the W encoder (which L2-normalises it itself).

Differences from the original, on purpose:
- only the detection and recognition models are loaded (the original also loaded the
  2d106/3d68 landmark and gender/age models, whose outputs were never used);
- the model folder is explicit and nothing is ever downloaded: a missing pack raises
  :class:`FaceModelsMissingError` naming the files and where to put them;
- onnxruntime uses CUDA when asked for and available, CPU otherwise (no ``ctx_id=0``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Protocol, Sequence, Tuple, Union

import numpy as np

from fastavatar.face.images import DEFAULT_MAX_SIDE, ImageError, LoadedImage, load_rgb

PathLike = Union[str, os.PathLike]

DETECTOR_FILE = "det_10g.onnx"
RECOGNIZER_FILE = "w600k_r50.onnx"
EMBEDDING_DIM = 512

DEFAULT_INSIGHTFACE_ROOTS = (
    Path("pretrained_weights/insightface/buffalo_l"),
    Path("~/.insightface/models/buffalo_l"),
)
"""Searched in order when no ``--insightface_root`` is given."""

BUFFALO_L_HINT = (
    "get buffalo_l.zip from the insightface model zoo (github.com/deepinsight/insightface releases) and unzip "
    "det_10g.onnx and w600k_r50.onnx into pretrained_weights/insightface/buffalo_l (see pretrained_weights/README.md), "
    "or pass --insightface_root DIR"
)


class FaceError(ValueError):
    """No usable face in a photo; the message is one line and names the file."""


class FaceModelsMissingError(FileNotFoundError):
    """The insightface model files are not on disk (nothing is downloaded)."""


def resolve_insightface_root(root: Optional[PathLike] = None) -> Path:
    """The folder holding ``det_10g.onnx`` and ``w600k_r50.onnx``.

    ``root`` wins when given; otherwise the first of :data:`DEFAULT_INSIGHTFACE_ROOTS` that has
    both files. Raises :class:`FaceModelsMissingError` (one line) naming what is missing.
    """
    candidates = [Path(root).expanduser()] if root is not None else [p.expanduser() for p in DEFAULT_INSIGHTFACE_ROOTS]
    for folder in candidates:
        if all((folder / name).is_file() for name in (DETECTOR_FILE, RECOGNIZER_FILE)):
            return folder
    folder = candidates[0]
    missing = [name for name in (DETECTOR_FILE, RECOGNIZER_FILE) if not (folder / name).is_file()]
    searched = " or ".join(str(c) for c in candidates)
    raise FaceModelsMissingError(
        f"insightface buffalo_l models not found: missing {', '.join(missing)} in {searched}; {BUFFALO_L_HINT}"
    )


def onnx_providers(device: str = "cpu") -> List[str]:
    """onnxruntime providers for ``device``: CUDA (+CPU fallback) when asked and available."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if str(device).startswith("cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class FaceDetector(Protocol):
    """Anything that finds faces: ``detect(bgr[H,W,3] uint8) -> (boxes[K,5], kps[K,5,2])``.

    ``boxes`` rows are ``x0, y0, x1, y1, score`` in pixels of the given image.
    """

    def detect(self, bgr: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]: ...


class SCRFDDetector:
    """insightface SCRFD (``det_10g.onnx``) through ``insightface.model_zoo.get_model``."""

    def __init__(
        self,
        model_path: PathLike,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        det_size: Tuple[int, int] = (640, 640),
        det_thresh: float = 0.5,
    ) -> None:
        model = _get_insightface_model(model_path, providers)
        if getattr(model, "taskname", None) != "detection":
            raise FaceModelsMissingError(f"{model_path}: not an SCRFD face detector (got {type(model).__name__})")
        ctx_id = 0 if "CUDAExecutionProvider" in providers else -1
        model.prepare(ctx_id, input_size=tuple(det_size), det_thresh=det_thresh)
        self.model = model
        self.det_size = tuple(det_size)
        self.det_thresh = det_thresh

    def detect(self, bgr: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        boxes, kps = self.model.detect(bgr, input_size=self.det_size, max_num=0)
        return boxes, kps


def _get_insightface_model(model_path: PathLike, providers: Sequence[str]):
    """``insightface.model_zoo.get_model`` on a local file, never downloading."""
    import onnxruntime
    from insightface.model_zoo import get_model

    model_path = Path(model_path)
    if not model_path.is_file():
        raise FaceModelsMissingError(f"{model_path}: file not found; {BUFFALO_L_HINT}")
    onnxruntime.set_default_logger_severity(3)
    try:
        model = get_model(str(model_path), providers=list(providers), download=False)
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        raise FaceModelsMissingError(f"{model_path}: cannot load ONNX model ({str(exc).splitlines()[0]})") from None
    if model is None:
        raise FaceModelsMissingError(f"{model_path}: insightface does not recognise this ONNX model")
    return model


@dataclass
class FaceResult:
    """The chosen face of one photo."""

    embedding: np.ndarray  # [512] float32, raw ArcFace output (not normalised)
    bbox: np.ndarray  # [4] float32, x0 y0 x1 y1 in pixels of the file (after EXIF orientation)
    kps: np.ndarray  # [5, 2] float32, landmarks in the same pixels
    det_score: float  # detector confidence of the chosen face
    num_faces: int  # faces found in the photo
    image_size: Tuple[int, int] = field(default=(0, 0))  # (width, height) of the file, oriented


@dataclass
class _Face:
    """Minimal stand-in for ``insightface.app.common.Face`` (what ``ArcFaceONNX.get`` needs)."""

    kps: np.ndarray
    embedding: Optional[np.ndarray] = None


def select_largest(boxes: np.ndarray) -> int:
    """Index of the face with the largest box area. ``boxes`` [K, >=4]."""
    areas = (boxes[:, 2] - boxes[:, 0]).clip(min=0) * (boxes[:, 3] - boxes[:, 1]).clip(min=0)
    return int(np.argmax(areas))


class FaceEmbedder:
    """Photo -> ArcFace embedding of its largest face.

    Args:
        insightface_root: folder with ``det_10g.onnx`` and ``w600k_r50.onnx`` (see
            :func:`resolve_insightface_root`).
        device: ``"cpu"`` or ``"cuda"`` (onnxruntime provider choice).
        det_size: detector input size (width, height); the original used (640, 640).
        det_thresh: detection score threshold; the original used 0.5.
        max_side: photos are downscaled to this longer side before detection.
        detector: optional :class:`FaceDetector` replacing SCRFD (then ``det_10g.onnx`` is not
            needed).
    """

    def __init__(
        self,
        insightface_root: Optional[PathLike] = None,
        device: str = "cpu",
        det_size: Tuple[int, int] = (640, 640),
        det_thresh: float = 0.5,
        max_side: int = DEFAULT_MAX_SIDE,
        detector: Optional[FaceDetector] = None,
    ) -> None:
        providers = onnx_providers(device)
        if detector is None:
            root = resolve_insightface_root(insightface_root)
            detector = SCRFDDetector(root / DETECTOR_FILE, providers, det_size, det_thresh)
            rec_path = root / RECOGNIZER_FILE
        else:
            rec_path = _find_recognizer(insightface_root)
        recognizer = _get_insightface_model(rec_path, providers)
        if getattr(recognizer, "taskname", None) != "recognition":
            raise FaceModelsMissingError(f"{rec_path}: not an ArcFace recognition model")
        recognizer.prepare(0 if "CUDAExecutionProvider" in providers else -1)
        self.detector = detector
        self.recognizer = recognizer
        self.recognizer_path = Path(rec_path)
        self.max_side = max_side
        self.det_size = tuple(det_size)
        self.det_thresh = det_thresh
        self.model_id = self._model_identity(detector)

    def _model_identity(self, detector) -> str:
        """A string that changes whenever the embedding of a given photo could change."""
        parts = [_file_identity(self.recognizer_path)]
        if isinstance(detector, SCRFDDetector):
            parts.append(_file_identity(Path(detector.model.model_file)))
        else:
            parts.append(f"detector={type(detector).__module__}.{type(detector).__qualname__}")
        parts.append(f"det_size={self.det_size},thresh={self.det_thresh},max_side={self.max_side},select=largest")
        return "|".join(parts)

    def embed_file(self, path: PathLike) -> FaceResult:
        """Embedding of the largest face in the photo at ``path``.

        Raises:
            ImageError: unreadable photo.
            FaceError: no face found.
        """
        image = load_rgb(path, max_side=self.max_side)
        return self.embed_loaded(image)

    def embed_loaded(self, image: LoadedImage) -> FaceResult:
        bgr = image.bgr
        try:
            boxes, kps = self.detector.detect(bgr)
        except Exception as exc:  # onnxruntime/cv2 failures on odd inputs -> one line
            raise FaceError(f"{image.path}: face detection failed ({str(exc).splitlines()[0]})") from None
        if boxes is None or len(boxes) == 0:
            raise FaceError(f"{image.path}: no face detected (threshold {self.det_thresh})")
        if kps is None:
            raise FaceError(f"{image.path}: the detector returned no landmarks, cannot align the face")
        index = select_largest(np.asarray(boxes))
        face = _Face(kps=np.asarray(kps[index], dtype=np.float32))
        embedding = np.asarray(self.recognizer.get(bgr, face), dtype=np.float32).reshape(-1)
        if embedding.shape != (EMBEDDING_DIM,):
            raise FaceError(f"{image.path}: recognition model returned shape {embedding.shape}, expected (512,)")
        if not np.isfinite(embedding).all():
            raise FaceError(f"{image.path}: recognition model returned a non-finite embedding")
        inv = 1.0 / image.scale
        return FaceResult(
            embedding=embedding,
            bbox=(np.asarray(boxes[index, :4], dtype=np.float32) * inv),
            kps=face.kps * inv,
            det_score=float(boxes[index, 4]) if boxes.shape[1] > 4 else 1.0,
            num_faces=int(len(boxes)),
            image_size=tuple(image.original_size),
        )


def _find_recognizer(root: Optional[PathLike]) -> Path:
    candidates = [Path(root).expanduser()] if root is not None else [p.expanduser() for p in DEFAULT_INSIGHTFACE_ROOTS]
    for folder in candidates:
        if (folder / RECOGNIZER_FILE).is_file():
            return folder / RECOGNIZER_FILE
    raise FaceModelsMissingError(
        f"insightface model not found: missing {RECOGNIZER_FILE} in {' or '.join(map(str, candidates))}; {BUFFALO_L_HINT}"
    )


def _file_identity(path: Path) -> str:
    stat = path.stat()
    return f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"


__all__ = [
    "FaceEmbedder",
    "FaceResult",
    "FaceError",
    "FaceModelsMissingError",
    "FaceDetector",
    "SCRFDDetector",
    "ImageError",
    "resolve_insightface_root",
    "select_largest",
    "onnx_providers",
]
