"""Face processing for single-photo inference: robust image loading, ArcFace embeddings, cache.

- :mod:`fastavatar.face.images`: any photo file -> 8-bit RGB (``ImageError`` otherwise)
- :mod:`fastavatar.face.embedding`: insightface ``buffalo_l`` detector + ArcFace (``FaceError``)
- :mod:`fastavatar.face.cache`: embeddings computed once per photo and model
"""

from fastavatar.face.cache import EmbeddingCache, default_cache_dir, embed_with_cache
from fastavatar.face.embedding import (
    FaceEmbedder,
    FaceError,
    FaceModelsMissingError,
    FaceResult,
    resolve_insightface_root,
)
from fastavatar.face.images import ImageError, LoadedImage, list_images, load_rgb

__all__ = [
    "EmbeddingCache",
    "FaceEmbedder",
    "FaceError",
    "FaceModelsMissingError",
    "FaceResult",
    "ImageError",
    "LoadedImage",
    "default_cache_dir",
    "embed_with_cache",
    "list_images",
    "load_rgb",
    "resolve_insightface_root",
]
