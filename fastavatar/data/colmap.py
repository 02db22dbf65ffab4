"""Parser for one VHAP/NeRSemble subject in COLMAP layout (read once, no torch Dataset logic).

Layout of a subject folder (``306/`` or the VHAP export name
``306_EXP-1_v16_DS4_whiteBg_staticOffset_maskBelowLine/``)::

    sparse/0/{cameras,images,points3D}.{bin|txt}   COLMAP model (PINHOLE cameras, w2c poses,
                                                   points3D = the 10144 FLAME-triangle centres)
    images/00000_XX.png                            RGB views (white background)
    fg_masks/00000_XX.png                          soft foreground masks (optional)
    transforms*.json                               VHAP/NeRF cameras (optional, OpenGL c2w)
    flame_param/00000.npz                          tracked FLAME parameters (optional)

Conventions: see :mod:`fastavatar.core.cameras` (OpenCV c2w, pixel K). Views are sorted by image file
name. Points are ordered by COLMAP point id, which is the FLAME triangle order (Gaussian i <->
point i <-> triangle i).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from fastavatar import NUM_TEMPLATE_GAUSSIANS
from fastavatar.core.cameras import opengl_to_opencv_c2w, scaled_size

PathLike = Union[str, Path]

SUBJECT_DIR_PATTERN = re.compile(r"^(\d+)(?:_.*)?$")
"""A subject folder name: leading digits (the subject id), optionally followed by ``_<anything>``."""

SUPPORTED_CAMERA_MODELS = ("SIMPLE_PINHOLE", "PINHOLE")


class SubjectDataError(ValueError):
    """A subject folder that is missing files or holds inconsistent data."""


def subject_id_from_dir(path: PathLike) -> Optional[str]:
    """``306`` and ``306_EXP-1_v16_...`` -> ``"306"``; anything else -> None."""
    match = SUBJECT_DIR_PATTERN.match(Path(path).name)
    return match.group(1) if match else None


def find_sparse_dir(subject_dir: Path) -> Path:
    """``sparse/0`` if it holds a model, else ``sparse`` (both layouts occur in the wild)."""
    for candidate in (subject_dir / "sparse" / "0", subject_dir / "sparse"):
        if any((candidate / f"cameras.{ext}").is_file() for ext in ("bin", "txt")):
            return candidate
    raise SubjectDataError(f"{subject_dir}: no COLMAP model (expected sparse/0/cameras.bin or cameras.txt)")


def check_colmap_binary_sizes(sparse_dir: Path) -> None:
    """Walk the record layout of ``points3D.bin`` / ``images.bin`` and check it fits the file,
    before pycolmap reads them (a truncated or corrupt count makes pycolmap allocate without
    bound). Raises :class:`SubjectDataError` naming the file."""
    import struct

    def walk(path: Path, record_head: int, count_at: int, count_size: int, has_name: bool) -> None:
        if not path.is_file():
            return
        data = path.read_bytes()
        size = len(data)
        if size < 8:
            raise SubjectDataError(f"{path}: truncated ({size} bytes; a COLMAP binary starts with an 8-byte count)")
        (n,) = struct.unpack_from("<Q", data, 0)
        offset = 8
        for i in range(n):
            if has_name:  # images.bin: 64 fixed bytes, a NUL-terminated name, then the 2D-point count
                if offset + 64 > size:
                    raise SubjectDataError(f"{path}: truncated in image record {i + 1} of {n} ({size} bytes)")
                end = data.find(b"\0", offset + 64)
                if end < 0:
                    raise SubjectDataError(f"{path}: truncated in the name of image record {i + 1} of {n}")
                head_end = end + 1
            else:
                head_end = offset + record_head
            if head_end + count_size > size:
                raise SubjectDataError(f"{path}: truncated in record {i + 1} of {n} ({size} bytes)")
            (items,) = struct.unpack_from("<Q", data, head_end)
            offset = head_end + count_size + items * count_at
            if offset > size:
                raise SubjectDataError(f"{path}: truncated in record {i + 1} of {n} ({size} bytes, needs > {offset})")

    # points3D.bin: id u64, xyz 3xf64, rgb 3xu8, error f64 (43 bytes), track length u64, track 8 bytes each
    walk(sparse_dir / "points3D.bin", 43, 8, 8, has_name=False)
    # images.bin: id u32, qvec 4xf64, tvec 3xf64, camera id u32 (64 bytes), name, count u64, points2D 24 bytes each
    walk(sparse_dir / "images.bin", 64, 24, 8, has_name=True)


@dataclass
class _View:
    name: str
    c2w: np.ndarray  # [4, 4] OpenCV
    K: np.ndarray  # [3, 3] at full resolution
    width: int
    height: int


class SubjectParser:
    """Everything about one subject, read once.

    Attributes:
        subject_dir: the folder.
        subject_id: leading digits of the folder name, e.g. ``"306"``.
        points: [P, 3] float32 FLAME-triangle centres (world, metres), P = 10144 normally.
        c2w: [V, 4, 4] float32 OpenCV camera-to-world.
        Ks: [V, 3, 3] float32 intrinsics, scaled by ``image_scale``.
        width, height: image size after scaling (all views share it; checked).
        image_names, image_paths, mask_paths (None where a mask is missing).
    """

    def __init__(
        self,
        subject_dir: PathLike,
        image_scale: float = 1.0,
        expected_points: Optional[int] = NUM_TEMPLATE_GAUSSIANS,
        cameras_from: str = "colmap",
        allow_resize: bool = False,
    ) -> None:
        self.subject_dir = Path(subject_dir)
        if not self.subject_dir.is_dir():
            raise SubjectDataError(f"{self.subject_dir}: subject folder not found")
        if not 0 < image_scale <= 1:  # also refuses NaN
            raise ValueError(f"--image_scale must be in (0, 1], got {image_scale}")
        self.allow_resize = bool(allow_resize)
        self.subject_id = subject_id_from_dir(self.subject_dir) or self.subject_dir.name
        self.image_scale = float(image_scale)
        self.sparse_dir = find_sparse_dir(self.subject_dir)
        check_colmap_binary_sizes(self.sparse_dir)
        views, points = self._read_colmap()
        if cameras_from == "transforms":
            views = self._read_transforms_json(views)
        elif cameras_from != "colmap":
            raise ValueError(f"cameras_from must be 'colmap' or 'transforms', got {cameras_from!r}")
        if expected_points is not None and len(points) != expected_points:
            raise SubjectDataError(
                f"{self.sparse_dir}: has {len(points)} points3D, the template expects {expected_points}"
            )
        self._views = views
        sizes = {(v.width, v.height) for v in views}
        if len(sizes) != 1:
            raise SubjectDataError(f"{self.sparse_dir}: views have different image sizes {sorted(sizes)}")
        full_w, full_h = sizes.pop()
        self.full_width, self.full_height = full_w, full_h
        self.width, self.height = scaled_size(full_w, full_h, self.image_scale)
        self.points = torch.from_numpy(points.astype(np.float32))
        self.c2w = torch.from_numpy(np.stack([v.c2w for v in views]).astype(np.float32))
        Ks = torch.from_numpy(np.stack([v.K for v in views]).astype(np.float32))
        # exact per-axis factors, since sizes are rounded to whole pixels
        Ks[:, 0, :] *= self.width / full_w
        Ks[:, 1, :] *= self.height / full_h
        self.Ks = Ks
        self.image_names: List[str] = [v.name for v in views]
        self.image_paths: List[Path] = [self.subject_dir / "images" / v.name for v in views]
        for path in self.image_paths:
            if not path.is_file():
                raise SubjectDataError(f"{self.subject_dir}: image listed in COLMAP is missing: {path}")
        self.mask_paths: List[Optional[Path]] = []
        for v in views:
            mask = self.subject_dir / "fg_masks" / v.name
            self.mask_paths.append(mask if mask.is_file() else None)
        self._check_image_files()
        flame_dir = self.subject_dir / "flame_param"
        flame_files = sorted(flame_dir.glob("*.npz")) if flame_dir.is_dir() else []
        self.flame_param_path: Optional[Path] = flame_files[0] if flame_files else None

    def _check_image_files(self) -> None:
        """Every image and mask must be a readable image of its camera's size (unless
        ``allow_resize``): checked now, from the file headers, so a bad file stops the run at the
        start rather than when its view is first drawn."""
        from fastavatar.data.image_files import image_size

        native = (self.full_width, self.full_height)
        for what, paths in (("image", self.image_paths), ("mask", self.mask_paths)):
            for path in paths:
                if path is None:
                    continue
                size = image_size(path, SubjectDataError, what)
                if size != native and not self.allow_resize:
                    raise SubjectDataError(
                        f"{path}: {what} is {size[0]}x{size[1]} but its COLMAP camera is {native[0]}x{native[1]}; "
                        f"pass --allow_resize to resize it anyway"
                    )

    # ------------------------------------------------------------------ reading
    def _read_colmap(self):
        import pycolmap

        try:
            recon = pycolmap.Reconstruction(str(self.sparse_dir))
        except Exception as exc:
            raise SubjectDataError(f"{self.sparse_dir}: cannot read COLMAP model ({exc})") from None
        views = []
        for image in recon.images.values():
            camera = recon.cameras[image.camera_id]
            model = camera.model.name
            if model not in SUPPORTED_CAMERA_MODELS:
                raise SubjectDataError(
                    f"{self.sparse_dir}: camera {image.camera_id} is {model}; only {SUPPORTED_CAMERA_MODELS} "
                    "(undistorted images) are supported"
                )
            w2c = np.eye(4)
            w2c[:3, :4] = image.cam_from_world().matrix()
            views.append(
                _View(
                    name=image.name,
                    c2w=np.linalg.inv(w2c),
                    K=np.asarray(camera.calibration_matrix(), dtype=np.float64),
                    width=int(camera.width),
                    height=int(camera.height),
                )
            )
        if not views:
            raise SubjectDataError(f"{self.sparse_dir}: COLMAP model has no images")
        views.sort(key=lambda v: v.name)
        ids = sorted(recon.points3D.keys())
        points = np.array([recon.points3D[i].xyz for i in ids], dtype=np.float64).reshape(-1, 3)
        return views, points

    def _read_transforms_json(self, views: List[_View]) -> List[_View]:
        """Replace COLMAP poses/intrinsics by VHAP ``transforms.json`` (OpenGL c2w) where names match."""
        path = self.subject_dir / "transforms.json"
        if not path.is_file():
            raise SubjectDataError(f"{path}: not found (needed for cameras_from='transforms')")
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise SubjectDataError(f"{path}: invalid JSON ({exc})") from None
        by_name = {Path(f["file_path"]).name: f for f in meta.get("frames", [])}
        out = []
        for v in views:
            frame = by_name.get(v.name)
            if frame is None:
                raise SubjectDataError(f"{path}: no frame for image {v.name}")
            c2w_gl = torch.tensor(frame["transform_matrix"], dtype=torch.float64)
            K = np.array(
                [[frame.get("fl_x", meta.get("fl_x")), 0, frame.get("cx", meta.get("cx"))],
                 [0, frame.get("fl_y", meta.get("fl_y")), frame.get("cy", meta.get("cy"))],
                 [0, 0, 1]],
                dtype=np.float64,
            )
            out.append(_View(v.name, opengl_to_opencv_c2w(c2w_gl).numpy(), K, int(frame.get("w", v.width)),
                             int(frame.get("h", v.height))))
        return out

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self._views)

    def view_index(self, name_or_index: Union[int, str]) -> int:
        """A view given as an index, an image name (``00000_08.png``) or a camera suffix (``08``)."""
        if isinstance(name_or_index, int) or str(name_or_index).isdigit() and len(str(name_or_index)) < 2:
            index = int(name_or_index)
            if not 0 <= index < len(self):
                raise IndexError(f"{self.subject_dir}: view {index} out of range 0..{len(self) - 1}")
            return index
        key = str(name_or_index)
        for i, name in enumerate(self.image_names):
            if name == key or Path(name).stem == key or Path(name).stem.endswith("_" + key):
                return i
        raise KeyError(f"{self.subject_dir}: no view named {key!r} (have {self.image_names[:3]}...)")

    def load_image(self, index: int, background: Sequence[float] = (1.0, 1.0, 1.0), use_mask: bool = True):
        """[H, W, 3] float32 tensor in 0..1 at ``image_scale``, composited onto ``background`` with the
        foreground mask when one exists (so any background colour is exact)."""
        native = None if self.allow_resize else (self.full_width, self.full_height)
        rgb = read_view_rgb(self.image_paths[index], (self.width, self.height), native)
        mask_path = self.mask_paths[index]
        if use_mask and mask_path is not None:
            mask = self.load_mask(index)
            bg = torch.tensor(background, dtype=torch.float32)
            rgb = rgb * mask + bg * (1.0 - mask)
        return rgb

    def load_mask(self, index: int) -> Optional[torch.Tensor]:
        """[H, W, 1] float32 foreground mask in 0..1, or None when the subject has none."""
        path = self.mask_paths[index]
        if path is None:
            return None
        native = None if self.allow_resize else (self.full_width, self.full_height)
        return read_view_mask(path, (self.width, self.height), native)[..., None]


def read_view_rgb(path: Path, size, native=None) -> torch.Tensor:
    """Read an image as [H, W, 3] float32 0..1 resized to ``size=(W, H)``; with ``native=(W, H)``
    the file must have that size (its camera's), else :class:`SubjectDataError`."""
    return _load_resized(path, size, "RGB", "image", native)


def read_view_mask(path: Path, size, native=None) -> torch.Tensor:
    """Read a mask as [H, W] float32 0..1 resized to ``size=(W, H)`` (``native``: as read_view_rgb)."""
    return _load_resized(path, size, "L", "mask", native)


def _load_resized(path: Path, size, mode: str, what: str, native=None) -> torch.Tensor:
    """PIL read + convert to ``mode`` + resize (box filter when shrinking, bilinear otherwise)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if native is not None and img.size != tuple(native):
                raise SubjectDataError(
                    f"{path}: {what} is {img.size[0]}x{img.size[1]} but its COLMAP camera is "
                    f"{native[0]}x{native[1]}; pass --allow_resize to resize it anyway"
                )
            img = img.convert(mode)
            if img.size != tuple(size):
                shrink = img.size[0] > size[0]
                img = img.resize(tuple(size), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except SubjectDataError:
        raise
    except (OSError, ValueError) as exc:
        raise SubjectDataError(f"{path}: cannot read {what} ({exc})") from None
    return torch.from_numpy(arr)


def discover_subjects(data_root: PathLike, subject_ids: Optional[Sequence[str]] = None, verbose: bool = False,
                      skipped: Optional[List[dict]] = None) -> List[Path]:
    """Subject folders under ``data_root`` sorted by numeric id.

    Accepts short names (``306``) and VHAP export names (``306_EXP-1_v16_...``); a folder counts only
    if it has ``sparse/`` and ``images/``; the others are reported (``verbose``) and appended to
    ``skipped`` as ``{"subject", "folder", "reason"}``. ``subject_ids`` (e.g. ``["306", "369"]``)
    selects a subset; ids are compared as integers so ``"74"`` matches ``074``; asking for a folder
    that was skipped is an error saying why.
    """
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data_root not found")
    if subject_ids is not None:
        not_ids = [s for s in subject_ids if not str(s).strip().isdigit()]
        if not_ids:
            raise SubjectDataError(f"--subjects: {not_ids} are not subject ids (ids are numbers, e.g. 306)")
    found = {}
    passed = {}
    for child in sorted(root.iterdir()):
        sid = subject_id_from_dir(child)
        if not child.is_dir() or sid is None:
            continue
        lacking = [name + "/" for name in ("sparse", "images") if not (child / name).is_dir()]
        if lacking:
            passed[int(sid)] = {"subject": sid, "folder": str(child), "reason": f"no {' or '.join(lacking)}"}
            continue
        if int(sid) in found:
            raise SubjectDataError(f"{root}: two folders for subject {sid}: {found[int(sid)].name}, {child.name}")
        found[int(sid)] = child
    if subject_ids is not None:
        wanted = [int(s) for s in subject_ids]
        for s in wanted:
            if s not in found and s in passed:
                raise SubjectDataError(f"{passed[s]['folder']}: not a usable subject folder ({passed[s]['reason']})")
        missing = [s for s in wanted if s not in found]
        if missing:
            raise SubjectDataError(f"{root}: subjects {missing} not found (have {sorted(found)})")
        found = {k: found[k] for k in wanted}
        passed = {}
    if verbose:
        print(f"[data] {root}: {len(found)} subjects {[found[k].name for k in sorted(found)]}")
        for info in passed.values():
            print(f"[data] skipped subject {info['subject']} ({info['folder']}): {info['reason']}")
    if skipped is not None:
        skipped.extend(passed.values())
    if not found:
        raise SubjectDataError(f"{root}: no subject folders (expected <id>/ or <id>_<name>/ with sparse/ and images/)")
    return [found[k] for k in sorted(found)]


def parse_subjects(roots: Sequence[Path], on_bad_subject: str = "skip", verbose: bool = True,
                   skipped: Optional[List[dict]] = None, **parser_kwargs) -> List["SubjectParser"]:
    """A :class:`SubjectParser` per folder. A folder that cannot be parsed is skipped with a line
    saying why (``on_bad_subject="skip"``, appended to ``skipped``) or stops the run (``"stop"``)."""
    if on_bad_subject not in ("skip", "stop"):
        raise ValueError(f"--on_bad_subject must be skip or stop, got {on_bad_subject!r}")
    parsers = []
    for root in roots:
        try:
            parsers.append(SubjectParser(root, **parser_kwargs))
        except SubjectDataError as exc:
            if on_bad_subject == "stop":
                raise SubjectDataError(f"{exc} (subject {Path(root).name}; --on_bad_subject skip trains without it)") from None
            info = {"subject": subject_id_from_dir(root) or Path(root).name, "folder": str(root), "reason": str(exc)}
            if verbose:
                print(f"[data] skipped subject {info['subject']}: {info['reason']}")
            if skipped is not None:
                skipped.append(info)
    if not parsers:
        raise SubjectDataError(f"no usable subject among {[Path(r).name for r in roots]}")
    return parsers
