"""On-disk cache of face embeddings: each photo is embedded once per model.

Key = sha1(absolute path, mtime_ns, size, embedder model identity). Editing or replacing a
photo, or switching the insightface models / detector settings, gives a new key. Entries are
small ``.npz`` files written atomically. "No face" results are cached too (as the error
message), so a photo without a face is not re-detected on every epoch.

The cache lives in a run folder or in :func:`default_cache_dir` (``$FASTAVATAR_CACHE`` or
``~/.cache/fastavatar/embeddings``), **never inside a data folder**: :class:`EmbeddingCache`
refuses a cache dir that lies inside any ``forbidden_roots`` it is given.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from fastavatar.face.embedding import FaceEmbedder, FaceError, FaceResult
from fastavatar.io.atomic import atomic_write_bytes

PathLike = Union[str, os.PathLike]


def default_cache_dir() -> Path:
    """``$FASTAVATAR_CACHE/embeddings`` if set, else ``~/.cache/fastavatar/embeddings``."""
    env = os.environ.get("FASTAVATAR_CACHE")
    base = Path(env).expanduser() if env else Path("~/.cache/fastavatar").expanduser()
    return base / "embeddings"


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


class EmbeddingCache:
    """Embeddings keyed by (file path, mtime, size, model identity).

    Args:
        cache_dir: folder for the entries (created on first write).
        model_id: the embedder's :attr:`FaceEmbedder.model_id`.
        forbidden_roots: data folders the cache must not live in (raises ``ValueError``).
    """

    def __init__(self, cache_dir: PathLike, model_id: str, forbidden_roots: Iterable[PathLike] = ()) -> None:
        self.cache_dir = Path(cache_dir).expanduser()
        for root in forbidden_roots:
            if _is_within(self.cache_dir, Path(root)):
                raise ValueError(f"embedding cache dir {self.cache_dir} is inside the data folder {root}; use a run or cache dir")
        self.model_id = model_id
        self.hits = 0
        self.misses = 0

    def key(self, path: PathLike) -> str:
        path = Path(path).resolve()
        stat = path.stat()
        text = f"{path}\n{stat.st_mtime_ns}\n{stat.st_size}\n{self.model_id}"
        return hashlib.sha1(text.encode("utf-8")).hexdigest()

    def _entry(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.npz"

    def get(self, path: PathLike) -> Optional[Union[FaceResult, FaceError]]:
        """The cached result (a ``FaceResult`` or the cached ``FaceError``), or None."""
        entry = self._entry(self.key(path))
        if not entry.is_file():
            return None
        try:
            with np.load(entry, allow_pickle=False) as data:
                if "error" in data:
                    return FaceError(str(data["error"]))
                return FaceResult(
                    embedding=data["embedding"].astype(np.float32),
                    bbox=data["bbox"],
                    kps=data["kps"],
                    det_score=float(data["det_score"]),
                    num_faces=int(data["num_faces"]),
                    image_size=tuple(int(v) for v in data["image_size"]),
                )
        except (OSError, ValueError, KeyError, EOFError):  # damaged entry: recompute
            return None

    def put(self, path: PathLike, result: Union[FaceResult, FaceError]) -> None:
        buffer = io.BytesIO()
        if isinstance(result, FaceError):
            np.savez(buffer, error=np.array(str(result)))
        else:
            np.savez(
                buffer,
                embedding=result.embedding.astype(np.float32),
                bbox=np.asarray(result.bbox, dtype=np.float32),
                kps=np.asarray(result.kps, dtype=np.float32),
                det_score=np.float32(result.det_score),
                num_faces=np.int64(result.num_faces),
                image_size=np.asarray(result.image_size, dtype=np.int64),
            )
        atomic_write_bytes(self._entry(self.key(path)), buffer.getvalue())


def embed_with_cache(embedder: FaceEmbedder, path: PathLike, cache: Optional[EmbeddingCache] = None) -> FaceResult:
    """``embedder.embed_file(path)`` through ``cache`` (if any). Raises ``FaceError``/``ImageError``.

    Only face results ("found" and "no face") are cached; unreadable files are not, so a fixed
    file is picked up on the next run even if its mtime did not change.
    """
    if cache is not None:
        cached = cache.get(path)
        if isinstance(cached, FaceError):
            cache.hits += 1
            raise cached
        if cached is not None:
            cache.hits += 1
            return cached
        cache.misses += 1
    try:
        result = embedder.embed_file(path)
    except FaceError as exc:
        if cache is not None:
            cache.put(path, exc)
        raise
    if cache is not None:
        cache.put(path, result)
    return result
