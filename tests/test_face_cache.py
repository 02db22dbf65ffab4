"""Embedding cache: one computation per photo and model; invalidated by file or model changes."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from face_fixtures import build_tiny_buffalo, insightface_sample_image
from fastavatar.face.cache import EmbeddingCache, default_cache_dir, embed_with_cache
from fastavatar.face.embedding import FaceEmbedder, FaceError


class _CountingDetector:
    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    def detect(self, bgr):
        self.calls += 1
        return self.inner.detect(bgr)


@pytest.fixture(scope="module")
def buffalo(tmp_path_factory):
    return build_tiny_buffalo(tmp_path_factory.mktemp("buffalo_l"))


def test_second_lookup_hits_and_skips_detection(buffalo, tmp_path):
    base = FaceEmbedder(buffalo)
    counting = _CountingDetector(base.detector)
    embedder = FaceEmbedder(buffalo, detector=counting)
    photo = tmp_path / "p.jpg"
    shutil.copy(insightface_sample_image("t1.jpg"), photo)
    cache = EmbeddingCache(tmp_path / "cache", embedder.model_id)
    first = embed_with_cache(embedder, photo, cache)
    second = embed_with_cache(embedder, photo, cache)
    assert counting.calls == 1 and cache.hits == 1 and cache.misses == 1
    np.testing.assert_array_equal(first.embedding, second.embedding)
    np.testing.assert_allclose(first.bbox, second.bbox)
    assert second.image_size == first.image_size and second.num_faces == first.num_faces
    # Changing the file (size and mtime) invalidates the entry.
    Image.open(photo).convert("RGB").resize((640, 443)).save(photo)
    os.utime(photo, ns=(1, 10**18))
    embed_with_cache(embedder, photo, cache)
    assert counting.calls == 2
    # Another model identity does not see the entries.
    other = EmbeddingCache(tmp_path / "cache", embedder.model_id + "|other")
    assert other.get(photo) is None
    assert cache.get(photo) is not None


def test_no_face_result_is_cached(buffalo, tmp_path):
    counting = _CountingDetector(FaceEmbedder(buffalo).detector)
    embedder = FaceEmbedder(buffalo, detector=counting)
    Image.fromarray(np.full((100, 100, 3), 200, np.uint8)).save(tmp_path / "blank.png")
    cache = EmbeddingCache(tmp_path / "cache", embedder.model_id)
    for _ in range(2):
        with pytest.raises(FaceError, match="blank.png: no face"):
            embed_with_cache(embedder, tmp_path / "blank.png", cache)
    assert counting.calls == 1


def test_model_identity_depends_on_model_files(buffalo, tmp_path):
    a = FaceEmbedder(buffalo).model_id
    copy = tmp_path / "copy"
    shutil.copytree(buffalo, copy)
    os.utime(copy / "w600k_r50.onnx", ns=(1, 123456789))
    assert FaceEmbedder(copy).model_id != a


def test_cache_refuses_data_folder(tmp_path, data_root):
    with pytest.raises(ValueError, match="inside the data folder"):
        EmbeddingCache(data_root / "306" / ".cache", "m", forbidden_roots=[data_root])
    EmbeddingCache(tmp_path / "cache", "m", forbidden_roots=[data_root])  # elsewhere is fine


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTAVATAR_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "embeddings"
    monkeypatch.delenv("FASTAVATAR_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "fastavatar", "embeddings")


def test_damaged_entry_is_recomputed(buffalo, tmp_path):
    embedder = FaceEmbedder(buffalo)
    photo = insightface_sample_image("Tom_Hanks_54745.png")
    cache = EmbeddingCache(tmp_path / "cache", embedder.model_id)
    good = embed_with_cache(embedder, photo, cache)
    entry = next((tmp_path / "cache").rglob("*.npz"))
    entry.write_bytes(b"garbage")
    assert cache.get(photo) is None
    again = embed_with_cache(embedder, photo, cache)
    np.testing.assert_array_equal(good.embedding, again.embedding)
