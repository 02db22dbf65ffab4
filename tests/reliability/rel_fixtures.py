"""Files the reliability suite feeds to the scripts: tiny real checkpoints, damaged copies of
them, malicious ones, bad PLYs and broken subject folders. Everything is built here; nothing is
downloaded."""

from __future__ import annotations

import shutil
import struct
import zipfile
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import torch

from rel_payloads import make_payload

BAD_CHECKPOINT_KINDS = ("payload", "truncated", "empty", "text", "bitflip", "nan", "wrong_shape", "other_kind")


def tiny_template(n: int = 6, seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"means": torch.randn(n, 3, generator=g) * 0.05, "quats": torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
            "scales": torch.full((n, 3), -4.0), "opacities": torch.zeros(n), "sh0": torch.rand(n, 1, 3, generator=g),
            "shN": torch.zeros(n, 15, 3)}


def save_tiny_decoder(path: Path, hidden_dim: int = 16, subjects=("306",)) -> Path:
    from fastavatar.io.checkpoints import save_decoder_checkpoint
    from fastavatar.models.decoder import DecoderConfig, GaussianDecoder

    decoder = GaussianDecoder(tiny_template(), DecoderConfig(hidden_dim=hidden_dim, body_layers=1, gaussians_per_round=6))
    w = torch.randn(len(subjects), decoder.config.w_dim) * 0.1
    save_decoder_checkpoint(path, decoder, w, {s: i for i, s in enumerate(subjects)}, epoch=1, global_step=1,
                            config={"hidden_dim": hidden_dim})
    return Path(path)


def member_data_offset(path: Path, suffix: str) -> tuple:
    """(offset of the member's data in the file, its size) for the first member ending in ``suffix``."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(suffix))
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


def make_bad_checkpoint(kind: str, path: Path, good: Path, marker: Path) -> Path:
    """A damaged / hostile variant of the checkpoint ``good`` at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "payload":  # a pickle that runs a command (the probe's cProfile.run)
        torch.save({"model_dict": make_payload("cprofile_run", marker)}, path)
    elif kind == "truncated":
        raw = Path(good).read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "bitflip":
        shutil.copyfile(good, path)
        offset, size = member_data_offset(path, "data/0")
        raw = bytearray(path.read_bytes())
        raw[offset + size // 2] ^= 0x01
        path.write_bytes(bytes(raw))
    elif kind == "nan":
        from fastavatar.io.unpickle import torch_load

        obj = torch_load(good)
        first = next(k for k, v in obj["model_dict"].items() if v.is_floating_point())
        obj["model_dict"][first] = obj["model_dict"][first].clone().fill_(float("nan"))
        obj.pop("integrity", None)  # a NaN file that is otherwise consistent
        torch.save(obj, path)
    elif kind == "wrong_shape":  # a consistent file whose weights do not fit their own layout
        from fastavatar.io.unpickle import torch_load

        obj = torch_load(good)
        key = next(k for k in obj["model_dict"] if k.startswith("conditioning_mlp.") and k.endswith("weight"))
        obj["model_dict"][key] = torch.zeros(3, 3)
        obj.pop("integrity", None)
        torch.save(obj, path)
    elif kind == "other_kind":  # a tracker checkpoint where a decoder is expected
        torch.save({"model_state_dict": {"encoder.points_projector.0.weight": torch.zeros(2, 2)}, "epoch": 1}, path)
    else:
        raise ValueError(kind)
    return path


# ---------------------------------------------------------------------------- PLYs
def _ply_bytes(table: np.ndarray, names, fmt: str = "binary_little_endian") -> bytes:
    header = ["ply", f"format {fmt} 1.0", f"element vertex {len(table)}"]
    header += [f"property float {n}" for n in names] + ["end_header"]
    head = ("\n".join(header) + "\n").encode()
    if fmt == "ascii":
        return head + "".join(" ".join(f"{v:g}" for v in row) + "\n" for row in table).encode()
    return head + np.ascontiguousarray(table, "<f4").tobytes()


def ply_names(rest: int = 45, rot: bool = True):
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(rest)]
    names += ["opacity", "scale_0", "scale_1", "scale_2"] + ([f"rot_{i}" for i in range(4)] if rot else [])
    return names


def good_ply_table(n: int = 50, rest: int = 45, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    names = ply_names(rest)
    t = rng.normal(0, 0.05, (n, len(names))).astype(np.float32)
    t[:, names.index("scale_0"): names.index("scale_0") + 3] = -4.0
    t[:, names.index("rot_0")] = 1.0
    return t


BAD_PLY_KINDS = ("text", "empty", "truncated", "missing_rot", "rest_44", "nan_rows", "all_nan", "zero_vertices")


def make_bad_ply(kind: str, path: Path) -> Path:
    path = Path(path)
    names = ply_names()
    t = good_ply_table()
    if kind == "text":
        path.write_text("hello, not a ply\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        raw = _ply_bytes(t, names)
        path.write_bytes(raw[: len(raw) - 1000])
    elif kind == "missing_rot":
        path.write_bytes(_ply_bytes(t[:, :-4], ply_names(rot=False)))
    elif kind == "rest_44":
        keep = [i for i, n in enumerate(names) if n != "f_rest_44"]
        path.write_bytes(_ply_bytes(t[:, keep], [names[i] for i in keep]))
    elif kind == "nan_rows":
        t[3, 0] = np.nan
        t[7, 5] = np.inf
        path.write_bytes(_ply_bytes(t, names))
    elif kind == "all_nan":
        t[:] = np.nan
        path.write_bytes(_ply_bytes(t, names))
    elif kind == "zero_vertices":
        path.write_bytes(_ply_bytes(t[:0], names))
    else:
        raise ValueError(kind)
    return path


def save_sh0_ply(path: Path) -> Path:
    """A valid SH-degree-0 PLY (no f_rest_*)."""
    names = ply_names(rest=0)
    Path(path).write_bytes(_ply_bytes(good_ply_table(rest=0), names))
    return Path(path)


# ---------------------------------------------------------------------------- subject folders
def copy_subject(src: Path, dst: Path, edit: Callable[[Path], None] = None) -> Path:
    """Copy a bundled subject folder (images, masks, sparse/) and apply ``edit`` to the copy."""
    shutil.copytree(src, dst)
    if edit is not None:
        edit(dst)
    return dst
