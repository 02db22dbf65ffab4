"""Checkpoint integrity: is the file whole, are its tensors finite, are they what we wrote?

* :func:`verify_archive` reads every member of a torch zip checkpoint and checks its CRC-32
  (torch's own reader does not), so a truncated, empty, text or bit-flipped file is a one-line
  :class:`CheckpointError` before anything is unpickled.
* :func:`stamp` adds an ``integrity`` entry to a checkpoint we are about to save:
  ``{"format_version": FORMAT_VERSION, "tensor_sha256": hex, "num_tensors": n}``; the digest
  covers every tensor in the object (key path, dtype, shape and bytes, in the object's order).
  :func:`verify_stamp` recomputes it on load. Released files carry no stamp and are accepted.
* :func:`check_finite` refuses NaN / Inf tensors, naming the first one.
* :func:`read_checkpoint` does all of it around :func:`fastavatar.io.unpickle.torch_load`.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator, Mapping, Tuple, Union

import torch

from fastavatar.io.unpickle import RestrictedUnpicklingError, torch_load

PathLike = Union[str, os.PathLike]
INTEGRITY_KEY = "integrity"
FORMAT_VERSION = 1  # bump when the meaning of the integrity entry (or our layouts) changes
_ZIP_MAGIC = b"PK\x03\x04"
_CHUNK = 1 << 22


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file."""


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


# ---------------------------------------------------------------------------- the file
def verify_archive(path: PathLike) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a complete torch checkpoint file.

    Zip checkpoints (torch >= 1.6) are read member by member and every CRC-32 is checked;
    legacy (pickle-stream) checkpoints have no checksum and are only checked for a pickle
    header. Reads the whole file once.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head.startswith(_ZIP_MAGIC):
        _verify_zip(path, size)
        return
    if head[:1] == b"\x80":  # a pickle stream: legacy torch.save format
        return
    if _looks_like_text(head):
        preview = head[:24].decode("utf-8", "replace").splitlines()[0] if head.strip() else ""
        raise CheckpointError(f"{path}: a text file ({preview!r}...), not a torch checkpoint")
    raise CheckpointError(f"{path}: not a torch checkpoint (unrecognised header {head[:4].hex()})")


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


def _verify_zip(path: Path, size: int) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            for info in infos:
                if info.header_offset + info.compress_size > size:
                    raise CheckpointError(f"{path}: truncated ({size} bytes): member {info.filename} runs past the end")
                with zf.open(info) as member:  # zipfile checks the CRC-32 when a member is read to its end
                    while member.read(_CHUNK):
                        pass
    except CheckpointError:
        raise
    except zipfile.BadZipFile as exc:
        msg = str(exc)
        if "CRC" in msg:
            raise CheckpointError(f"{path}: damaged: {msg.rstrip('.')} (the file was modified or corrupted)") from None
        if "not a zip file" in msg.lower():
            raise CheckpointError(
                f"{path}: truncated or damaged ({size} bytes): the zip directory at its end is missing"
            ) from None
        raise CheckpointError(f"{path}: damaged zip archive ({msg})") from None
    except (zlib.error, EOFError, OSError, ValueError, NotImplementedError) as exc:
        raise CheckpointError(f"{path}: damaged zip archive ({_short(exc)})") from None


# ---------------------------------------------------------------------------- tensors
def iter_tensors(obj: Any, prefix: str = "") -> Iterator[Tuple[str, torch.Tensor]]:
    """(key path, tensor) for every tensor in nested dicts / lists / tuples, in their order.
    Paths look like ``model_dict/splats.means`` or ``optimizer_states/mlp/state/0/exp_avg``."""
    if isinstance(obj, torch.Tensor):
        yield prefix or "<root>", obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            if prefix == "" and k == INTEGRITY_KEY:
                continue
            yield from iter_tensors(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from iter_tensors(v, f"{prefix}/{i}" if prefix else str(i))


def tensor_sha256(obj: Any) -> Tuple[str, int]:
    """(sha256 hex digest, number of tensors) over key paths, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    n = 0
    for name, t in iter_tensors(obj):
        t = t.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        n += 1
    return h.hexdigest(), n


def stamp(obj: dict) -> dict:
    """Add the integrity entry to a checkpoint dict about to be saved (returns ``obj``)."""
    digest, n = tensor_sha256(obj)
    obj[INTEGRITY_KEY] = {"format_version": FORMAT_VERSION, "tensor_sha256": digest, "num_tensors": n}
    return obj


def verify_stamp(obj: Any, path: PathLike) -> bool:
    """Check the integrity entry if there is one; False when the file has none (released files)."""
    if not isinstance(obj, Mapping) or INTEGRITY_KEY not in obj:
        return False
    entry = obj[INTEGRITY_KEY]
    if not isinstance(entry, Mapping) or not isinstance(entry.get("tensor_sha256"), str):
        raise CheckpointError(f"{path}: malformed {INTEGRITY_KEY!r} entry")
    version = entry.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is newer than this fastavatar reads ({FORMAT_VERSION})"
        )
    digest, n = tensor_sha256(obj)
    if digest != entry["tensor_sha256"]:
        raise CheckpointError(
            f"{path}: tensor checksum mismatch ({n} tensors, sha256 {digest[:12]}... but the file records "
            f"{entry['tensor_sha256'][:12]}...): the file was modified or corrupted"
        )
    return True


def check_finite(obj: Any, path: PathLike) -> None:
    """Raise :class:`CheckpointError` naming the first floating tensor with NaN or Inf."""
    for name, t in iter_tensors(obj):
        if (t.is_floating_point() or t.is_complex()) and t.numel():
            finite = torch.isfinite(t.detach())
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise CheckpointError(
                    f"{path}: tensor {name} {list(t.shape)} has {bad} non-finite value(s) (NaN/Inf); refusing to load"
                )


def read_checkpoint(path: PathLike, map_location: Any = "cpu", allow_non_finite: bool = False) -> Any:
    """Verify, unpickle (restricted), check the stamp and finiteness; one-line errors only.

    Raises FileNotFoundError for a missing file and :class:`CheckpointError` for everything else.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    verify_archive(path)
    try:
        obj = torch_load(path, map_location=map_location)
    except RestrictedUnpicklingError as exc:
        raise CheckpointError(f"{path}: refused: {str(exc).replace(f'{path}: ', '')}") from None
    except Exception as exc:  # noqa: BLE001 - any failure inside torch.load is reported as one line
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_short(exc)})") from None
    verify_stamp(obj, path)
    if not allow_non_finite:
        check_finite(obj, path)
    return obj


__all__ = [
    "CheckpointError",
    "FORMAT_VERSION",
    "INTEGRITY_KEY",
    "check_finite",
    "iter_tensors",
    "read_checkpoint",
    "stamp",
    "tensor_sha256",
    "verify_archive",
    "verify_stamp",
]
