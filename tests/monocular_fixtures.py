"""Write tracked monocular sequences in the INSTA (metrical-tracker) and VHAP-export layouts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch


def _png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _u8(image: torch.Tensor) -> np.ndarray:
    return (image.detach().clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def matrix_to_6d(rot: torch.Tensor) -> torch.Tensor:
    """PyTorch3D ``matrix_to_rotation_6d``: the first two rows, [..., 6]."""
    return rot[..., :2, :].reshape(rot.shape[:-2] + (6,))


def write_insta(root: Path, images: List[torch.Tensor], masks: List[torch.Tensor], params: List[Dict[str, torch.Tensor]],
                w2cs: List[torch.Tensor], K: torch.Tensor, shape: torch.Tensor, num_expr: int = 100) -> Path:
    """INSTA layout: checkpoint/%05d.frame (torch.save of numpy arrays, as metrical-tracker) + images/%05d.png (RGBA)."""
    from fastavatar.core.cameras import axis_angle_to_matrix

    (root / "checkpoint").mkdir(parents=True, exist_ok=True)
    for i, (image, mask, p, w2c) in enumerate(zip(images, masks, params, w2cs)):
        rgba = torch.cat([image, mask], -1)
        _png(root / "images" / f"{i:05d}.png", _u8(rgba))
        exp = torch.zeros(1, num_expr)
        e = p["expr"].reshape(1, -1)[:, :num_expr]
        exp[:, : e.shape[1]] = e
        jaw = matrix_to_6d(axis_angle_to_matrix(p["jaw_pose"].reshape(1, 3).double()))
        eyes = matrix_to_6d(axis_angle_to_matrix(p["eyes_pose"].reshape(2, 3).double())).reshape(1, 12)
        frame = {
            "flame": {"exp": exp.numpy(), "shape": shape.reshape(1, -1).numpy().astype(np.float32),
                      "jaw": jaw.float().numpy(), "eyes": eyes.float().numpy(), "eyelids": np.zeros((1, 2), np.float32),
                      "tex": np.zeros((1, 50), np.float32)},
            "camera": {"fl": np.array([[float(K[0, 0])]], np.float32)},
            "opencv": {"R": w2c[:3, :3].reshape(1, 3, 3).numpy().astype(np.float32),
                       "t": w2c[:3, 3].reshape(1, 3).numpy().astype(np.float32),
                       "K": K.reshape(1, 3, 3).numpy().astype(np.float32)},
            "img_size": np.array([image.shape[0], image.shape[1]]),
            "frame_id": i,
        }
        torch.save(frame, root / "checkpoint" / f"{i:05d}.frame")
    return root


def write_vhap(root: Path, images: List[torch.Tensor], masks: List[torch.Tensor], params: List[Dict[str, torch.Tensor]],
               c2ws: List[torch.Tensor], K: torch.Tensor, shape: torch.Tensor,
               static_offset: Optional[torch.Tensor] = None) -> Path:
    """VHAP export layout: transforms.json (OpenGL c2w), images/, fg_masks/, flame_param/, canonical_flame_param.npz."""
    from fastavatar.core.cameras import opengl_to_opencv_c2w

    root.mkdir(parents=True, exist_ok=True)
    h, w = images[0].shape[:2]
    frames = []
    for i, (image, mask, p, c2w) in enumerate(zip(images, masks, params, c2ws)):
        _png(root / "images" / f"{i:05d}_00.png", _u8(image))
        _png(root / "fg_masks" / f"{i:05d}_00.png", _u8(mask[..., 0]))
        (root / "flame_param").mkdir(exist_ok=True)
        arrays = {k: v.reshape(1, -1).numpy() for k, v in p.items()}
        arrays["shape"] = shape.reshape(-1).numpy()
        np.savez(root / "flame_param" / f"{i:05d}.npz", **arrays)
        c2w_gl = opengl_to_opencv_c2w(c2w.double())  # the flip is its own inverse
        frames.append({"timestep_index": i, "camera_index": 0, "file_path": f"images/{i:05d}_00.png",
                       "fg_mask_path": f"fg_masks/{i:05d}_00.png", "flame_param_path": f"flame_param/{i:05d}.npz",
                       "transform_matrix": c2w_gl.tolist(), "w": w, "h": h})
    meta = {"fl_x": float(K[0, 0]), "fl_y": float(K[1, 1]), "cx": float(K[0, 2]), "cy": float(K[1, 2]), "w": w, "h": h,
            "frames": frames}
    (root / "transforms.json").write_text(json.dumps(meta))
    canonical = {"shape": shape.reshape(-1).numpy(), "expr": np.zeros((1, 100))}
    if static_offset is not None:
        canonical["static_offset"] = static_offset.numpy()
    np.savez(root / "canonical_flame_param.npz", **canonical)
    return root
