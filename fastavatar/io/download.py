"""Resumable, checksum-verified HTTP downloads written atomically (standard library only).

:func:`download` fetches one URL into ``dest``:

- bytes go to ``<dest>.part`` beside the target; an interrupted transfer keeps that file and the
  next call resumes it with an HTTP ``Range`` request (a server that ignores ``Range`` and answers
  200 restarts the file from byte 0);
- the sha256 of the whole file is checked before ``<dest>.part`` is renamed onto ``dest``
  (``os.replace``, same folder), so ``dest`` is either absent or complete and verified; a file
  that fails the check is deleted, never installed;
- a ``dest`` that already has the pinned sha256 is left alone (``status == "present"``); one with
  a different sha256 is an error unless ``force`` (then it is replaced only once the new file is
  verified);
- every failure is a :class:`DownloadError` with a one-line message naming the URL or the file.

:func:`extract_zip_members` installs chosen members of a downloaded zip the same way.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

PathLike = Union[str, os.PathLike]

CHUNK_BYTES = 1 << 20
USER_AGENT = "fastavatar-download/1"


class DownloadError(RuntimeError):
    """A download or install step failed; the message is one line and names the URL or file."""


@dataclass
class DownloadResult:
    path: Path  # the installed file
    status: str  # "present" (already there, verified), "downloaded", "resumed"
    sha256: str  # hex digest of the installed file
    bytes_fetched: int  # bytes received over the network by this call


def sha256_file(path: PathLike, chunk: int = CHUNK_BYTES) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def partial_path(dest: PathLike) -> Path:
    """Where the bytes of an unfinished download of ``dest`` are kept."""
    dest = Path(dest)
    return dest.with_name(dest.name + ".part")


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and make sure a file can be created in it (else DownloadError)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"{folder}: cannot create the folder ({exc.strerror or exc})") from None
    probe = folder / f".fastavatar-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
    except OSError as exc:
        raise DownloadError(f"{folder}: not writable ({exc.strerror or exc})") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def _hash_existing(path: Path) -> "hashlib._Hash":
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest


def _progress_bar(enabled: bool, total: Optional[int], initial: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                dynamic_ncols=True, leave=False)


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (URLs come from our registry)


def _fetch_once(url: str, part: Path, timeout: float, show_progress: bool, desc: str) -> int:
    """Append the rest of ``url`` to ``part`` (resuming at its size). Returns bytes received.

    Raises DownloadError on HTTP errors and on a transfer cut short (``part`` is kept).
    """
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # The partial file is already at least as long as the resource: let the checksum decide.
            return 0
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"{url}: cannot connect ({reason})") from None
    received = 0
    with response:
        status = getattr(response, "status", 200)
        if offset and status != 206:
            offset = 0  # the server ignored Range: start over
        elif offset and status == 206:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {offset}-"):
                raise DownloadError(f"{url}: server resumed at the wrong offset ({content_range!r}, wanted {offset})")
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        bar = _progress_bar(show_progress, total, offset, desc)
        try:
            with open(part, "ab" if offset else "wb") as fh:
                while True:
                    try:
                        block = response.read(CHUNK_BYTES)
                    except (OSError, HTTPException) as exc:
                        raise DownloadError(
                            f"{url}: transfer interrupted after {offset + received} bytes ({exc.__class__.__name__}); "
                            f"run again to resume from {part}"
                        ) from None
                    if not block:
                        break
                    fh.write(block)
                    received += len(block)
                    if bar is not None:
                        bar.update(len(block))
        except OSError as exc:
            raise DownloadError(f"{part}: cannot write ({exc.strerror or exc})") from None
        finally:
            if bar is not None:
                bar.close()
    if total is not None and offset + received < total:
        raise DownloadError(
            f"{url}: transfer interrupted after {offset + received} of {total} bytes; run again to resume from {part}"
        )
    return received


def download(
    url: str,
    dest: PathLike,
    sha256: str,
    *,
    force: bool = False,
    retries: int = 2,
    timeout: float = 60.0,
    show_progress: bool = True,
) -> DownloadResult:
    """Fetch ``url`` to ``dest`` verified against ``sha256`` (see the module docstring).

    ``retries``: how many times an interrupted transfer is resumed within this call before giving
    up (the partial file is kept either way, so a later call continues it).
    """
    dest = Path(dest)
    sha256 = sha256.lower()
    if dest.exists() and not force:
        got = sha256_file(dest)
        if got == sha256:
            return DownloadResult(dest, "present", got, 0)
        raise DownloadError(
            f"{dest}: exists but its sha256 is {got[:12]}..., expected {sha256[:12]}...; move it away or pass --force"
        )
    check_writable(dest.parent)
    part = partial_path(dest)
    resumed = part.exists() and part.stat().st_size > 0
    fetched = 0
    attempt = 0
    while True:
        try:
            fetched += _fetch_once(url, part, timeout, show_progress, dest.name)
            break
        except DownloadError as exc:
            interrupted = "interrupted" in str(exc) and part.exists()
            if not interrupted or attempt >= retries:
                raise
            attempt += 1
            resumed = True
    got = _hash_existing(part).hexdigest()
    if got != sha256:
        size = part.stat().st_size
        part.unlink()
        raise DownloadError(
            f"{url}: sha256 mismatch ({size} bytes, got {got[:12]}..., expected {sha256[:12]}...); the file was deleted"
        )
    try:
        os.replace(part, dest)
    except OSError as exc:
        raise DownloadError(f"{dest}: cannot install ({exc.strerror or exc})") from None
    return DownloadResult(dest, "resumed" if resumed else "downloaded", got, fetched)


def extract_zip_members(
    archive: PathLike,
    members: Mapping[str, Optional[str]],
    folder: PathLike,
    *,
    force: bool = False,
) -> Dict[str, str]:
    """Install the zip members whose base names are the keys of ``members`` into ``folder``.

    ``members`` maps a base name (e.g. ``det_10g.onnx``) to its pinned sha256 (None: not pinned).
    Each member is written to a temp file beside its target, checked, then renamed. A member that
    is already there with the pinned sha256 is kept. Returns {name: "present" | "extracted"}.
    """
    archive, folder = Path(archive), Path(folder)
    check_writable(folder)
    try:
        zf = zipfile.ZipFile(archive)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DownloadError(f"{archive}: not a readable zip ({exc})") from None
    out: Dict[str, str] = {}
    with zf:
        by_base = {}
        for info in zf.infolist():
            if not info.is_dir():
                by_base.setdefault(Path(info.filename).name, info)
        for name, pinned in members.items():
            target = folder / name
            if target.exists() and not force and (pinned is None or sha256_file(target) == pinned):
                out[name] = "present"
                continue
            info = by_base.get(name)
            if info is None:
                raise DownloadError(f"{archive}: has no member {name}")
            tmp = target.with_name(f".{name}.extracting")
            try:
                with zf.open(info) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK_BYTES)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise DownloadError(f"{target}: cannot write ({exc.strerror or exc})") from None
            if pinned is not None and sha256_file(tmp) != pinned:
                tmp.unlink()
                raise DownloadError(f"{archive}: member {name} does not have the pinned sha256 {pinned[:12]}...")
            os.replace(tmp, target)
            out[name] = "extracted"
    return out
