"""Tracked monocular videos: frames, foreground masks, per-frame FLAME parameters and cameras.

Two layouts are read (detected from the folder):

- **INSTA / GaussianBlendshapes** (metrical-tracker output; spec: gaussian-blendshapes.md §5):
  ``checkpoint/%05d.frame`` (``torch.save`` dicts: ``flame`` = shape [1,300], exp [1,100],
  jaw [1,6] and eyes [1,12] as 6D rotations (PyTorch3D convention), eyelids [1,2];
  ``opencv`` = R [1,3,3], t [1,3], K [1,3,3], world-to-camera in OpenCV convention) and
  ``images/%05d.png`` (RGBA; the alpha channel is the head mask). That tracker has no global
  FLAME rotation/translation (head pose lives in the camera), so ``rotation`` and
  ``translation`` are 0 and the camera moves instead. Eyelid coefficients are read but not
  used: our FLAME has no eyelid basis.
- **VHAP monocular export** (``export_as_nerf_dataset``): ``transforms.json`` whose ``frames``
  give ``file_path``, ``fg_mask_path``, ``flame_param_path`` (VHAP ``.npz``, axis-angle poses),
  ``transform_matrix`` (camera-to-world, OpenGL) and the intrinsics (``fl_x, fl_y, cx, cy, w, h``,
  per frame or top level); identity from ``canonical_flame_param.npz`` when present.

Everything comes out in our conventions: VHAP parameter names (:mod:`fastavatar.flame.model`),
OpenCV camera-to-world poses and pixel intrinsics (:mod:`fastavatar.core.cameras`). A broken
sequence (a missing frame, mask or parameter file, a parameter file without an image, an image
without a parameter file) raises :class:`SequenceError` with one line naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple, Union

import numpy as np
import torch

from fastavatar.core.cameras import c2w_to_w2c, opengl_to_opencv_c2w, scale_intrinsics, scaled_size
from fastavatar.data.image_files import image_size

DRIVING_KEYS = ("expr", "rotation", "neck_pose", "jaw_pose", "eyes_pose", "translation")
Layout = Literal["insta", "vhap"]


class SequenceError(ValueError):
    """A monocular sequence that cannot be read (message: one line naming the file)."""


@dataclass
class MonocularFrame:
    """One tracked frame (native resolution)."""

    name: str  # frame stem, e.g. "00042"
    image_path: Path  # RGB(A) frame
    mask_path: Optional[Path]  # foreground mask; None = the image's alpha channel (INSTA)
    params: Dict[str, torch.Tensor]  # driving parameters (DRIVING_KEYS), each [1, d] float32
    c2w: torch.Tensor  # [4, 4] camera-to-world, OpenCV
    K: torch.Tensor  # [3, 3] pixel intrinsics at width x height
    width: int  # native image width, pixels
    height: int  # native image height, pixels


@dataclass
class MonocularSequence:
    """A tracked monocular video: frames in time order plus the subject's FLAME identity."""

    root: Path  # sequence folder
    layout: Layout  # which layout it was read from
    frames: List[MonocularFrame]  # in time order
    shape: torch.Tensor  # [1, S] identity coefficients
    static_offset: Optional[torch.Tensor] = None  # [1, V, 3] VHAP per-vertex offset (None for INSTA)
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. "eyelids" [T, 2] (INSTA), unused

    def __len__(self) -> int:
        return len(self.frames)

    def identity(self) -> Dict[str, torch.Tensor]:
        """``shape`` (and ``static_offset``) as FLAME parameters, float64, batch of one."""
        out = {"shape": self.shape.double()}
        if self.static_offset is not None:
            out["static_offset"] = self.static_offset.double()
        return out

    def split(self, num_test: int) -> Tuple[List[int], List[int]]:
        """Train / test frame indices: the last ``num_test`` frames are the test set (as the paper's
        INSTA protocol, which holds out the last 350)."""
        if not 0 < num_test < len(self):
            raise SequenceError(f"{self.root}: cannot hold out {num_test} of {len(self)} frames")
        cut = len(self) - num_test
        return list(range(cut)), list(range(cut, len(self)))

    def camera(self, index: int, image_scale: float = 1.0):
        """(c2w [4,4], K [3,3], width, height) of frame ``index`` at ``image_scale``."""
        f = self.frames[index]
        width, height = scaled_size(f.width, f.height, image_scale)
        return f.c2w, scale_intrinsics(f.K, width / f.width), width, height

    def load(self, index: int, image_scale: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
        """(rgb [H,W,3], mask [H,W,1]) float32 0..1 of frame ``index`` at ``image_scale``."""
        f = self.frames[index]
        size = scaled_size(f.width, f.height, image_scale)
        rgba = _read_image(f.image_path, size, "RGBA" if f.mask_path is None else "RGB")
        if f.mask_path is None:
            return rgba[..., :3], rgba[..., 3:]
        return rgba, _read_image(f.mask_path, size, "L")[..., None]


def _read_image(path: Path, size, mode: str) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as img:
            if mode == "RGBA" and "A" not in img.getbands():
                raise SequenceError(f"{path}: INSTA frames must be RGBA (the alpha channel is the mask); "
                                    f"this one has bands {''.join(img.getbands())}")
            img = img.convert(mode)
            if img.size != tuple(size):
                img = img.resize(tuple(size), Image.Resampling.BOX if img.size[0] > size[0] else Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except OSError as exc:
        raise SequenceError(f"{path}: cannot read image ({exc})") from None
    return torch.from_numpy(arr)


# --------------------------------------------------------------------------------------------
# Rotations of metrical-tracker: 6D (PyTorch3D ``rotation_6d_to_matrix``) -> axis-angle
# --------------------------------------------------------------------------------------------


def rotation_6d_to_matrix(d6: torch.Tensor) -> torch.Tensor:
    """[..., 6] -> [..., 3, 3]: Gram-Schmidt on the two 3-vectors, which become the matrix's first two *rows*
    (PyTorch3D's convention, used by metrical-tracker and GaussianBlendshapes)."""
    a1, a2 = d6[..., :3], d6[..., 3:6]
    b1 = torch.nn.functional.normalize(a1, dim=-1)
    b2 = torch.nn.functional.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-2)


def matrix_to_axis_angle(rot: torch.Tensor) -> torch.Tensor:
    """[..., 3, 3] -> [..., 3] axis-angle (the log map; angle in [0, pi])."""
    from fastavatar.core.rotations import matrix_to_quat, quat_to_rotvec

    flat = rot.reshape(-1, 3, 3)
    return quat_to_rotvec(matrix_to_quat(flat)).reshape(rot.shape[:-2] + (3,))


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def detect_layout(root: Path) -> Layout:
    if (root / "checkpoint").is_dir():
        return "insta"
    if (root / "transforms.json").is_file():
        return "vhap"
    raise SequenceError(f"{root}: not a tracked monocular sequence (expected checkpoint/ + images/ "
                        f"(INSTA / metrical-tracker) or transforms.json (VHAP export))")


def load_monocular_sequence(root: Union[str, Path], layout: Optional[Layout] = None,
                            max_frames: Optional[int] = None) -> MonocularSequence:
    """Read a tracked monocular sequence (layout detected unless given). See the module docstring."""
    root = Path(root)
    if not root.is_dir():
        raise SequenceError(f"sequence folder not found: {root}")
    layout = layout or detect_layout(root)
    if layout == "insta":
        return _load_insta(root, max_frames)
    if layout == "vhap":
        return _load_vhap(root, max_frames)
    raise SequenceError(f"unknown sequence layout {layout!r} (insta or vhap)")


def _to_tensor(value, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double()
    try:
        return torch.as_tensor(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError):
        raise SequenceError(f"{where}: not numeric ({type(value).__name__})") from None


def _load_frame_file(path: Path) -> dict:
    """A metrical-tracker ``.frame`` (torch.save of nested dicts of tensors / numpy arrays), read
    with the restricted unpickler (:mod:`fastavatar.io.unpickle`: data only, no code)."""
    from fastavatar.io.unpickle import torch_load

    try:
        data = torch_load(path, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - reported as one line
        raise SequenceError(f"{path}: cannot read tracker frame ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or "flame" not in data or "opencv" not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise SequenceError(f"{path}: not a metrical-tracker frame (need 'flame' and 'opencv', got {keys})")
    return data


def _load_insta(root: Path, max_frames: Optional[int]) -> MonocularSequence:
    ckpt_dir, image_dir = root / "checkpoint", root / "images"
    if not image_dir.is_dir():
        raise SequenceError(f"{image_dir}: folder of frames not found")
    frame_files = sorted(ckpt_dir.glob("*.frame"))
    images = {p.stem: p for p in sorted(image_dir.glob("*.png"))}
    if not frame_files:
        raise SequenceError(f"{ckpt_dir}: no *.frame tracker files")
    stems = [p.stem for p in frame_files]
    missing = [s for s in stems if s not in images]
    if missing:
        raise SequenceError(f"{image_dir / (missing[0] + '.png')}: frame missing ({len(missing)} tracked frames "
                            f"have no image)")
    extra = sorted(set(images) - set(stems))
    if extra:
        raise SequenceError(f"{ckpt_dir / (extra[0] + '.frame')}: tracker parameters missing ({len(extra)} images "
                            f"have no .frame; {len(images)} images vs {len(stems)} tracked frames)")
    if max_frames is not None:
        frame_files = frame_files[:max_frames]
    frames, shape, eyelids = [], None, []
    for path in frame_files:
        data = _load_frame_file(path)
        flame, cv = data["flame"], data["opencv"]
        try:
            exp = _to_tensor(flame["exp"], str(path)).reshape(1, -1)
            jaw = _to_tensor(flame["jaw"], str(path)).reshape(1, 6)
            eyes = _to_tensor(flame["eyes"], str(path)).reshape(2, 6)
            rot, t, K = (_to_tensor(cv[k], str(path)) for k in ("R", "t", "K"))
            if shape is None:
                shape = _to_tensor(flame["shape"], str(path)).reshape(1, -1)
        except KeyError as exc:
            raise SequenceError(f"{path}: tracker frame lacks {exc.args[0]!r}") from None
        if "eyelids" in flame:
            eyelids.append(_to_tensor(flame["eyelids"], str(path)).reshape(-1))
        w2c = torch.eye(4, dtype=torch.float64)
        w2c[:3, :3], w2c[:3, 3] = rot.reshape(3, 3), t.reshape(3)
        image_path = images[path.stem]
        width, height = image_size(image_path, SequenceError)
        params = {
            "expr": exp,
            "jaw_pose": matrix_to_axis_angle(rotation_6d_to_matrix(jaw)).reshape(1, 3),
            "eyes_pose": matrix_to_axis_angle(rotation_6d_to_matrix(eyes)).reshape(1, 6),
            "rotation": torch.zeros(1, 3, dtype=torch.float64),
            "neck_pose": torch.zeros(1, 3, dtype=torch.float64),
            "translation": torch.zeros(1, 3, dtype=torch.float64),
        }
        frames.append(MonocularFrame(path.stem, image_path, None, {k: v.float() for k, v in params.items()},
                                     c2w_to_w2c(w2c).float(), K.reshape(3, 3).float(), width, height))
    extras = {"eyelids": torch.stack(eyelids).float()} if len(eyelids) == len(frames) else {}
    return MonocularSequence(root, "insta", frames, shape.float(), None, extras)


def _load_vhap(root: Path, max_frames: Optional[int]) -> MonocularSequence:
    from fastavatar.flame.model import params_from_npz

    meta_path = root / "transforms.json"
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise SequenceError(f"{meta_path}: invalid JSON ({exc})") from None
    entries = meta.get("frames") or []
    if not entries:
        raise SequenceError(f"{meta_path}: no frames")
    cams = {e.get("camera_index", 0) for e in entries}
    if len(cams) > 1:
        raise SequenceError(f"{meta_path}: {len(cams)} cameras; a monocular sequence has one (pick one camera's frames)")
    entries = sorted(entries, key=lambda e: (e.get("timestep_index", 0), e.get("file_path", "")))
    if max_frames is not None:
        entries = entries[:max_frames]
    frames = []
    for e in entries:
        for key in ("file_path", "fg_mask_path", "flame_param_path", "transform_matrix"):
            if key not in e:
                raise SequenceError(f"{meta_path}: frame {e.get('file_path', '?')} has no {key!r}")
        image_path, mask_path, param_path = root / e["file_path"], root / e["fg_mask_path"], root / e["flame_param_path"]
        for path, what in ((image_path, "frame"), (mask_path, "mask"), (param_path, "FLAME parameter file")):
            if not path.is_file():
                raise SequenceError(f"{path}: {what} missing (listed in {meta_path.name})")
        get = lambda k: e.get(k, meta.get(k))  # noqa: E731
        if any(get(k) is None for k in ("fl_x", "fl_y", "cx", "cy")):
            raise SequenceError(f"{meta_path}: frame {e['file_path']} has no intrinsics (fl_x, fl_y, cx, cy)")
        width, height = image_size(image_path, SequenceError)
        if get("w") is not None and (int(get("w")), int(get("h"))) != (width, height):
            raise SequenceError(f"{image_path}: image is {width}x{height} but {meta_path.name} says {get('w')}x{get('h')}")
        K = torch.tensor([[get("fl_x"), 0.0, get("cx")], [0.0, get("fl_y"), get("cy")], [0.0, 0.0, 1.0]])
        c2w = opengl_to_opencv_c2w(torch.tensor(e["transform_matrix"], dtype=torch.float64)).float()
        params = params_from_npz(param_path, dtype=torch.float32)
        driving = {k: params[k] for k in DRIVING_KEYS if k in params}
        frames.append(MonocularFrame(Path(e["file_path"]).stem, image_path, mask_path, driving, c2w, K, width, height))
    canonical = root / "canonical_flame_param.npz"
    first = params_from_npz(root / entries[0]["flame_param_path"], dtype=torch.float32)
    ident = params_from_npz(canonical, dtype=torch.float32) if canonical.is_file() else first
    if "shape" not in ident:
        raise SequenceError(f"{canonical if canonical.is_file() else root / entries[0]['flame_param_path']}: no 'shape'")
    return MonocularSequence(root, "vhap", frames, ident["shape"], ident.get("static_offset"))
