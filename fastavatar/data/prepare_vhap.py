"""Convert a VHAP NeRSemble export into the subject layout :class:`~fastavatar.data.SubjectParser` reads.

Input (one VHAP export folder, e.g. ``306_EXP-1_v16_DS4_whiteBg_staticOffset_maskBelowLine/``)::

    transforms.json (or transforms_{train,val,test}.json)   frames: file_path, fg_mask_path,
                                                            flame_param_path, transform_matrix (OpenGL
                                                            c2w), fl_x fl_y cx cy w h (per frame or top
                                                            level), timestep_index, camera_index, camera_id
    images/*.png, fg_masks/*.png, flame_param/*.npz, canonical_flame_param.npz, points3d.ply (optional)

Output (``output_dir``)::

    sparse/0/{cameras,images,points3D,rigs,frames}.bin   COLMAP via pycolmap: one PINHOLE camera per view
                                                         (id = the NeRSemble serial when numeric), w2c
                                                         OpenCV poses, points3D ids 1..P = FLAME(+teeth)
                                                         triangle centres in triangle order
    images/, fg_masks/                                   the chosen timestep's views, linked or copied
                                                         (resized when ``image_scale`` < 1)
    flame_param/<timestep>.npz, canonical_flame_param.npz, transforms.json (the chosen frames, same scale)

One timestep is converted (FastAvatar uses one expression per subject): ``timestep`` or, when
not given, the smallest in the export (the run says which).

Where the points come from (the run prints which):
- ``points_from="flame"``: our FLAME forward (:mod:`fastavatar.flame`) with the timestep's tracked
  parameters. A model with VHAP's teeth gives all 10144 centres; a plain FLAME file gives the 9976
  FLAME centres and the 168 teeth centres come from the export's ``points3d.ply``;
- ``points_from="ply"``: the export's ``points3d.ply`` as is (VHAP writes the same centres there);
- ``points_from="auto"``: ``flame`` when a FLAME file is found (``flame_model`` or the default
  location), ``ply`` otherwise.

Every inconsistency is a :class:`PrepareError` with a one-line message naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np

from fastavatar import NUM_TEMPLATE_GAUSSIANS
from fastavatar.data.image_files import image_size

PathLike = Union[str, os.PathLike]
TRANSFORMS_SPLITS = ("transforms_train.json", "transforms_val.json", "transforms_test.json")


class PrepareError(ValueError):
    """The export is missing a file or holds inconsistent data; one line, naming the file."""


@dataclass
class PrepareConfig:
    vhap_dir: str = field(default="", metadata={"help": "VHAP export folder (holds transforms.json, images/, ...)"})
    output_dir: str = field(default="", metadata={"help": "subject folder to write (e.g. data/mine/306)"})
    transforms: str = field(default="", metadata={"help": "transforms file inside vhap_dir (default: transforms.json, "
                                                          "else the union of transforms_{train,val,test}.json)"})
    timestep: Optional[int] = field(default=None, metadata={"help": "timestep_index to convert (default: the smallest)"})
    image_scale: float = field(default=1.0, metadata={"help": "resize images/masks by this factor (intrinsics follow)"})
    link: Literal["symlink", "hardlink", "copy"] = field(
        default="symlink", metadata={"help": "how full-size images/masks are placed (resized ones are always written)"})
    points_from: Literal["auto", "flame", "ply"] = field(
        default="auto", metadata={"help": "source of the points3D (see module doc)"})
    flame_model: str = field(default="", metadata={"help": "FLAME pkl/npz (default pretrained_weights/flame/flame2023.pkl)"})
    expected_points: int = field(default=NUM_TEMPLATE_GAUSSIANS, metadata={"help": "number of points3D FastAvatar needs"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing sparse/0 in output_dir"})


@dataclass
class Frame:
    """One view of the chosen timestep, as read from the transforms file."""

    name: str  # image file name, e.g. 00000_08.png
    image: Path  # source image
    mask: Optional[Path]  # source foreground mask (None when the export has none)
    flame_param: Optional[Path]  # tracked FLAME parameters of the timestep
    c2w_gl: np.ndarray  # [4,4] OpenGL camera-to-world
    K: np.ndarray  # [3,3] pixel intrinsics at full size
    width: int
    height: int
    camera_id: int  # COLMAP camera id
    record: dict  # the frame dict (written back to transforms.json)


@dataclass
class PrepareResult:
    output_dir: Path
    num_views: int  # cameras/images written
    num_points: int  # points3D written
    points_source: str  # one line saying where the points came from
    timestep: int  # the converted timestep_index
    width: int  # written image size
    height: int


# --------------------------------------------------------------------------------------------
# Reading the export
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PrepareError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PrepareError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("frames"), list):
        raise PrepareError(f"{path}: not a transforms file (no 'frames' list)")
    return data


def read_transforms(vhap_dir: Path, transforms: str = "") -> Tuple[Path, dict, List[dict]]:
    """(file named in errors, top-level metadata, frames) of the export's transforms."""
    if transforms:
        path = vhap_dir / transforms
        meta = _read_json(path)
        return path, meta, list(meta["frames"])
    path = vhap_dir / "transforms.json"
    if path.is_file():
        meta = _read_json(path)
        return path, meta, list(meta["frames"])
    splits = [vhap_dir / name for name in TRANSFORMS_SPLITS if (vhap_dir / name).is_file()]
    if not splits:
        raise PrepareError(f"{vhap_dir}: no transforms.json or transforms_{{train,val,test}}.json (not a VHAP export?)")
    meta, frames, seen = {}, [], set()
    for split in splits:
        data = _read_json(split)
        # per-split camera/timestep lists describe only that split: drop them from the union
        meta = {**{k: v for k, v in data.items() if k not in ("frames", "camera_indices", "timestep_indices")}, **meta}
        for frame in data["frames"]:
            key = frame.get("file_path")
            if key not in seen:
                seen.add(key)
                frames.append(frame)
    return splits[0], meta, frames


def _intrinsics(frame: dict, meta: dict, path: Path) -> Tuple[np.ndarray, int, int]:
    values = {}
    for key in ("fl_x", "fl_y", "cx", "cy", "w", "h"):
        value = frame.get(key, meta.get(key))
        if value is None:
            raise PrepareError(f"{path}: frame {frame.get('file_path')!r} has no {key} (nor does the file's top level)")
        values[key] = float(value)
    K = np.array([[values["fl_x"], 0.0, values["cx"]], [0.0, values["fl_y"], values["cy"]], [0.0, 0.0, 1.0]])
    return K, int(round(values["w"])), int(round(values["h"]))


def select_frames(vhap_dir: Path, cfg: PrepareConfig) -> Tuple[int, List[Frame], Path, dict]:
    """The chosen timestep's frames, checked (files exist, one frame per camera, sizes agree)."""
    tpath, meta, records = read_transforms(vhap_dir, cfg.transforms)
    if not records:
        raise PrepareError(f"{tpath}: has no frames")
    timesteps = sorted({int(r.get("timestep_index", 0)) for r in records})
    timestep = timesteps[0] if cfg.timestep is None else int(cfg.timestep)
    if timestep not in timesteps:
        raise PrepareError(f"{tpath}: no frames for timestep {timestep} (have {timesteps[:10]})")
    chosen = [r for r in records if int(r.get("timestep_index", 0)) == timestep]
    # every timestep should see the same cameras; a camera missing at one timestep means lost frames
    cams_by_t: Dict[int, set] = {}
    for r in records:
        cams_by_t.setdefault(int(r.get("timestep_index", 0)), set()).add(r.get("camera_index", r.get("camera_id")))
    cams = cams_by_t[timestep]
    listed = meta.get("camera_indices")
    if listed is not None and len(set(listed)) != len(cams):
        raise PrepareError(f"{tpath}: inconsistent counts: timestep {timestep} has frames of {len(cams)} cameras "
                           f"but camera_indices lists {len(set(listed))}")
    for t, c in cams_by_t.items():
        if c != cams:
            missing = sorted(map(str, cams ^ c))
            raise PrepareError(f"{tpath}: inconsistent counts: timestep {t} has {len(c)} cameras, timestep {timestep} "
                               f"has {len(cams)} (differing: {missing[:6]})")
    if len(chosen) != len(cams):
        raise PrepareError(f"{tpath}: timestep {timestep} has {len(chosen)} frames for {len(cams)} cameras (duplicates)")
    frames: List[Frame] = []
    names = set()
    for r in chosen:
        if "file_path" not in r or "transform_matrix" not in r:
            raise PrepareError(f"{tpath}: a frame has no file_path or transform_matrix")
        image = vhap_dir / r["file_path"]
        if not image.is_file():
            raise PrepareError(f"{image}: missing frame (listed in {tpath.name})")
        name = image.name
        if name in names:
            raise PrepareError(f"{tpath}: two frames of timestep {timestep} use the image name {name}")
        names.add(name)
        mask = vhap_dir / r["fg_mask_path"] if r.get("fg_mask_path") else None
        if mask is not None and not mask.is_file():
            raise PrepareError(f"{mask}: missing foreground mask (listed in {tpath.name})")
        flame = vhap_dir / r["flame_param_path"] if r.get("flame_param_path") else None
        if flame is not None and not flame.is_file():
            raise PrepareError(f"{flame}: missing FLAME parameters (listed in {tpath.name})")
        K, w, h = _intrinsics(r, meta, tpath)
        actual = image_size(image, PrepareError)
        if actual != (w, h):
            raise PrepareError(f"{image}: image is {actual[0]}x{actual[1]} but {tpath.name} says {w}x{h}")
        ms = image_size(mask, PrepareError, "mask") if mask is not None else (w, h)
        if ms != (w, h):
            raise PrepareError(f"{mask}: mask is {ms[0]}x{ms[1]} but its image is {w}x{h}")
        c2w = np.asarray(r["transform_matrix"], dtype=np.float64)
        if c2w.shape != (4, 4) or not np.isfinite(c2w).all():
            raise PrepareError(f"{tpath}: frame {name} has a bad transform_matrix (shape {list(c2w.shape)})")
        cam = str(r.get("camera_id", ""))
        camera_id = int(cam) if cam.isdigit() else int(r.get("camera_index", len(frames))) + 1
        frames.append(Frame(name, image, mask, flame, c2w, K, w, h, camera_id, r))
    sizes = {(f.width, f.height) for f in frames}
    if len(sizes) != 1:
        raise PrepareError(f"{tpath}: cameras of timestep {timestep} have different image sizes {sorted(sizes)}; "
                           "SubjectParser needs one size")
    if len({f.camera_id for f in frames}) != len(frames):
        raise PrepareError(f"{tpath}: camera ids repeat within timestep {timestep}")
    frames.sort(key=lambda f: f.name)
    return timestep, frames, tpath, meta


# --------------------------------------------------------------------------------------------
# Points
# --------------------------------------------------------------------------------------------


def read_points_ply(path: Path) -> np.ndarray:
    """xyz [P, 3] float64 of a point PLY (VHAP's ``points3d.ply``)."""
    from plyfile import PlyData

    try:
        vertex = PlyData.read(str(path))["vertex"]
        return np.stack([np.asarray(vertex[k], dtype=np.float64) for k in ("x", "y", "z")], axis=1)
    except (OSError, KeyError, ValueError) as exc:
        raise PrepareError(f"{path}: cannot read points ({exc})") from None


def compute_points(vhap_dir: Path, frames: Sequence[Frame], cfg: PrepareConfig) -> Tuple[np.ndarray, str]:
    """(points [P, 3] float64, one line saying where they came from)."""
    from fastavatar.flame.model import DEFAULT_FLAME_PATH, FlameModelMissing, load_flame_model

    ply_path = vhap_dir / "points3d.ply"
    ply = read_points_ply(ply_path) if ply_path.is_file() else None
    flame_path = Path(cfg.flame_model) if cfg.flame_model else DEFAULT_FLAME_PATH
    source = cfg.points_from
    if source == "auto":
        source = "flame" if (cfg.flame_model or flame_path.is_file()) else "ply"
    if source == "ply":
        if ply is None:
            raise PrepareError(
                f"{ply_path}: not found, and no FLAME file at {flame_path} (put FLAME there or pass --flame_model)")
        why = "" if cfg.points_from == "ply" else f" (no FLAME file at {flame_path})"
        return ply, f"points3D: {len(ply)} points from {ply_path}{why}"
    if cfg.flame_model and not flame_path.is_file():
        raise PrepareError(f"{flame_path}: FLAME model file not found (--flame_model)")
    params = {f.flame_param for f in frames}
    if None in params or len(params) != 1:
        raise PrepareError(f"{frames[0].record.get('file_path')}: frames of one timestep must name one flame_param file "
                           f"(found {sorted(str(p) for p in params)})")
    params_path = params.pop()
    try:
        model = load_flame_model(flame_path)
    except FlameModelMissing as exc:
        raise PrepareError(str(exc)) from None
    except ValueError as exc:
        raise PrepareError(str(exc).splitlines()[0]) from None
    from fastavatar.flame.model import params_from_npz
    from fastavatar.flame.points import flame_centres

    try:
        centres = flame_centres(model, params_from_npz(params_path)).double().numpy()
    except (ValueError, RuntimeError) as exc:
        raise PrepareError(f"{params_path}: cannot evaluate FLAME ({str(exc).splitlines()[0]})") from None
    n = cfg.expected_points
    if len(centres) == n:
        return centres, f"points3D: {n} triangle centres of {flame_path} (FLAME + teeth) with {params_path.name}"
    if len(centres) > n:
        raise PrepareError(f"{flame_path}: {len(centres)} faces, more than the {n} points FastAvatar needs")
    if ply is None or len(ply) < n:
        raise PrepareError(
            f"{flame_path}: {len(centres)} faces (no VHAP teeth) and no {n}-point {ply_path.name} to take the "
            f"other {n - len(centres)} from; use a teeth-extended FLAME .npz (see fastavatar.flame.teeth)")
    points = np.concatenate([centres, ply[len(centres):n]])
    return points, (f"points3D: {len(centres)} triangle centres of {flame_path} with {params_path.name}, "
                    f"and the last {n - len(centres)} (teeth) from {ply_path.name}")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_colmap(sparse_dir: Path, frames: Sequence[Frame], Ks: Sequence[np.ndarray], width: int, height: int,
                 points: np.ndarray) -> None:
    """Write a binary COLMAP model: PINHOLE cameras, OpenCV w2c images (ids 1.. by name), points 1..P."""
    import pycolmap
    import torch

    from fastavatar.core.cameras import opengl_to_opencv_c2w

    rec = pycolmap.Reconstruction()
    for image_id, (frame, K) in enumerate(zip(frames, Ks), start=1):
        camera = pycolmap.Camera(model="PINHOLE", width=width, height=height,
                                 params=[K[0, 0], K[1, 1], K[0, 2], K[1, 2]], camera_id=frame.camera_id)
        rec.add_camera_with_trivial_rig(camera)
        c2w = opengl_to_opencv_c2w(torch.from_numpy(frame.c2w_gl)).numpy()
        R = c2w[:3, :3].T
        t = -R @ c2w[:3, 3]
        pose = pycolmap.Rigid3d(pycolmap.Rotation3d(R), t)
        rec.add_image_with_trivial_frame(pycolmap.Image(name=frame.name, camera_id=frame.camera_id,
                                                        image_id=image_id), pose)
    white = np.array([255, 255, 255], dtype=np.uint8)
    for xyz in points:
        rec.add_point3D(np.asarray(xyz, dtype=np.float64), pycolmap.Track(), white)
    sparse_dir.mkdir(parents=True, exist_ok=True)
    rec.write_binary(str(sparse_dir))


def _place(src: Path, dst: Path, link: str) -> None:
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    if link == "symlink":
        os.symlink(src.resolve(), dst)
    elif link == "hardlink":
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


def _resize(src: Path, dst: Path, size: Tuple[int, int], mode: str) -> None:
    from PIL import Image

    with Image.open(src) as img:
        img.convert(mode).resize(size, Image.Resampling.BOX).save(dst)


def prepare_vhap(cfg: PrepareConfig, echo=print) -> PrepareResult:
    """Convert ``cfg.vhap_dir`` into ``cfg.output_dir`` (see the module docstring)."""
    from fastavatar.core.cameras import scaled_size

    if not cfg.vhap_dir:
        raise PrepareError("--vhap_dir is required")
    if not cfg.output_dir:
        raise PrepareError("--output_dir is required")
    vhap_dir, out = Path(cfg.vhap_dir), Path(cfg.output_dir)
    if not vhap_dir.is_dir():
        raise PrepareError(f"{vhap_dir}: VHAP export folder not found")
    if not 0 < cfg.image_scale <= 1:
        raise PrepareError(f"--image_scale must be in (0, 1], got {cfg.image_scale}")
    if out.resolve() == vhap_dir.resolve():
        raise PrepareError(f"{out}: output_dir must differ from vhap_dir")
    sparse_dir = out / "sparse" / "0"
    if sparse_dir.exists() and not cfg.overwrite:
        raise PrepareError(f"{sparse_dir}: already exists (pass --overwrite to replace it)")

    timestep, frames, tpath, meta = select_frames(vhap_dir, cfg)
    stated = "" if cfg.timestep is not None else " (the smallest in the export; choose with --timestep)"
    echo(f"[prepare_vhap] {tpath}: timestep {timestep}{stated}, {len(frames)} views")
    points, points_source = compute_points(vhap_dir, frames, cfg)
    if cfg.expected_points and len(points) != cfg.expected_points:
        raise PrepareError(f"{points_source.split(' from ')[-1]}: gives {len(points)} points, FastAvatar needs "
                           f"{cfg.expected_points}")
    if not np.isfinite(points).all():
        raise PrepareError(f"{points_source}: non-finite coordinates")
    echo(f"[prepare_vhap] {points_source}")

    full_w, full_h = frames[0].width, frames[0].height
    width, height = scaled_size(full_w, full_h, cfg.image_scale)
    Ks = []
    for f in frames:
        K = f.K.copy()
        K[0, :] *= width / full_w
        K[1, :] *= height / full_h
        Ks.append(K)

    # images and masks first, COLMAP model last: sparse/0 appears only when everything else is in place
    (out / "images").mkdir(parents=True, exist_ok=True)
    has_masks = all(f.mask is not None for f in frames)
    if has_masks:
        (out / "fg_masks").mkdir(parents=True, exist_ok=True)
    for f in frames:
        if (width, height) == (full_w, full_h):
            _place(f.image, out / "images" / f.name, cfg.link)
            if has_masks:
                _place(f.mask, out / "fg_masks" / f.name, cfg.link)
        else:
            _resize(f.image, out / "images" / f.name, (width, height), "RGB")
            if has_masks:
                _resize(f.mask, out / "fg_masks" / f.name, (width, height), "L")
    params = frames[0].flame_param
    if params is not None:
        (out / "flame_param").mkdir(exist_ok=True)
        shutil.copy2(params, out / "flame_param" / params.name)
    canonical = vhap_dir / "canonical_flame_param.npz"
    if canonical.is_file():
        shutil.copy2(canonical, out / canonical.name)
    records = []
    for f, K in zip(frames, Ks):
        rec = dict(f.record, fl_x=K[0, 0], fl_y=K[1, 1], cx=K[0, 2], cy=K[1, 2], w=width, h=height,
                   file_path=f"images/{f.name}")
        if has_masks:
            rec["fg_mask_path"] = f"fg_masks/{f.name}"
        if params is not None:
            rec["flame_param_path"] = f"flame_param/{params.name}"
        records.append(rec)
    top = {k: v for k, v in meta.items() if k not in ("frames", "fl_x", "fl_y", "cx", "cy", "w", "h")}
    top.update(timestep_indices=[timestep], frames=records)
    from fastavatar.io.atomic import atomic_write_json

    atomic_write_json(out / "transforms.json", top)
    os.chmod(out / "transforms.json", 0o644)  # the temp file was created private

    # write the model under a temp name, then swap it in (an old model is removed only after that)
    tmp = out / "sparse" / f".0.tmp-{os.getpid()}"
    old = out / "sparse" / f".0.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_colmap(tmp, frames, Ks, width, height, points)
        if sparse_dir.exists():
            os.replace(sparse_dir, old)
        os.replace(tmp, sparse_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    echo(f"[prepare_vhap] wrote {sparse_dir} ({len(frames)} PINHOLE cameras {width}x{height}, {len(points)} points3D), "
         f"images/{' and fg_masks/' if has_masks else ''} ({'resized' if cfg.image_scale < 1 else cfg.link})")
    return PrepareResult(out, len(frames), len(points), points_source, timestep, width, height)
