"""Face embedding through the real insightface/onnxruntime code on tiny stand-in ONNX models."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from face_fixtures import build_tiny_buffalo, insightface_sample_image
from fastavatar.face.embedding import (
    FaceEmbedder,
    FaceError,
    FaceModelsMissingError,
    resolve_insightface_root,
    select_largest,
)
from fastavatar.face.images import ImageError


@pytest.fixture(scope="module")
def buffalo(tmp_path_factory):
    return build_tiny_buffalo(tmp_path_factory.mktemp("buffalo_l"))


@pytest.fixture(scope="module")
def embedder(buffalo):
    return FaceEmbedder(buffalo, device="cpu")


def test_embeds_insightface_sample_photos(embedder):
    import onnxruntime
    from insightface.utils import face_align

    for name in ("t1.jpg", "Tom_Hanks_54745.png"):
        path = insightface_sample_image(name)
        result = embedder.embed_file(path)
        assert result.embedding.shape == (512,) and result.embedding.dtype == np.float32
        assert np.isfinite(result.embedding).all()
        assert result.num_faces >= 1 and result.kps.shape == (5, 2)
        # Raw, not L2-normalised (the encoder normalises, like the original).
        assert abs(np.linalg.norm(result.embedding) - 1.0) > 1e-3
        # Same numbers as aligning by hand and running the ONNX file directly.
        import cv2

        bgr = cv2.imread(str(path))
        crop = face_align.norm_crop(bgr, result.kps, image_size=112)
        blob = ((crop[:, :, ::-1].astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
        session = onnxruntime.InferenceSession(str(embedder.recognizer_path), providers=["CPUExecutionProvider"])
        direct = session.run(None, {session.get_inputs()[0].name: blob})[0][0]
        np.testing.assert_allclose(result.embedding, direct, rtol=1e-4, atol=1e-4)
    a = embedder.embed_file(insightface_sample_image("t1.jpg")).embedding
    b = embedder.embed_file(insightface_sample_image("Tom_Hanks_54745.png")).embedding
    assert not np.allclose(a, b)


def test_embeds_bundled_nersemble_view(embedder, data_root):
    result = embedder.embed_file(data_root / "306" / "images" / "00000_08.png")
    x0, y0, x1, y1 = result.bbox
    assert 0 <= x0 < x1 <= 550 and 0 <= y0 < y1 <= 802
    assert result.image_size == (550, 802)


class _TwoFaces:
    """Test double: a small high-score face and a large low-score face."""

    def detect(self, bgr):
        boxes = np.array([[10, 10, 40, 40, 0.99], [50, 20, 110, 100, 0.60]], dtype=np.float32)
        template = np.array([[0.34, 0.46], [0.66, 0.46], [0.5, 0.64], [0.37, 0.82], [0.63, 0.82]], dtype=np.float32)
        kps = np.stack([b[:2] + template * (b[2:4] - b[:2]) for b in boxes])
        return boxes, kps


def test_largest_face_is_chosen_not_highest_score(buffalo):
    embedder = FaceEmbedder(buffalo, detector=_TwoFaces())
    result = embedder.embed_file(insightface_sample_image("t1.jpg"))
    np.testing.assert_allclose(result.bbox, [50, 20, 110, 100])
    assert result.num_faces == 2 and result.det_score == pytest.approx(0.60)
    assert select_largest(np.array([[0, 0, 1, 1], [0, 0, 5, 5], [0, 0, 3, 9]], dtype=np.float32)) == 2


def test_no_face_gives_face_error(embedder, tmp_path):
    Image.fromarray(np.full((300, 200, 3), 128, np.uint8)).save(tmp_path / "wall.png")
    with pytest.raises(FaceError, match=r"wall.png: no face detected") as info:
        embedder.embed_file(tmp_path / "wall.png")
    assert "\n" not in str(info.value)


def test_corrupt_file_gives_image_error(embedder, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xffgarbage")
    with pytest.raises(ImageError, match="broken.jpg"):
        embedder.embed_file(tmp_path / "broken.jpg")


def test_grayscale_and_rgba_photos_are_embedded(embedder, tmp_path):
    rgb = np.asarray(Image.open(insightface_sample_image("t1.jpg")).convert("RGB"))
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    gray = embedder.embed_file(tmp_path / "gray.png").embedding
    with_alpha = embedder.embed_file(tmp_path / "rgba.png").embedding
    plain = embedder.embed_file(tmp_path / "rgb.png").embedding
    np.testing.assert_allclose(with_alpha, plain, atol=1e-5)  # opaque alpha changes nothing
    assert gray.shape == (512,) and not np.allclose(gray, plain)


def test_exif_rotated_photo_matches_upright(embedder, tmp_path):
    upright = Image.open(insightface_sample_image("t1.jpg")).convert("RGB")
    upright.save(tmp_path / "upright.png")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera stores for orientation 6
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.png", exif=exif)
    a = embedder.embed_file(tmp_path / "upright.png")
    b = embedder.embed_file(tmp_path / "rotated.png")
    assert b.image_size == a.image_size
    np.testing.assert_allclose(b.bbox, a.bbox, atol=1.0)
    np.testing.assert_allclose(b.embedding, a.embedding, rtol=1e-3, atol=1e-3)


def test_huge_photo_is_downscaled_and_boxes_in_file_pixels(buffalo, tmp_path):
    embedder = FaceEmbedder(buffalo, max_side=1024)
    small = Image.open(insightface_sample_image("t1.jpg")).convert("RGB")
    small.save(tmp_path / "small.png")
    big = small.resize((small.width * 3, small.height * 3), Image.Resampling.BILINEAR)
    big.save(tmp_path / "big.png", compress_level=1)
    a = embedder.embed_file(tmp_path / "small.png")
    b = embedder.embed_file(tmp_path / "big.png")
    assert b.image_size == (small.width * 3, small.height * 3)
    np.testing.assert_allclose(b.bbox, a.bbox * 3, rtol=0.03, atol=6)


def test_missing_models_one_line_error_and_no_download(tmp_path):
    with pytest.raises(FaceModelsMissingError) as info:
        resolve_insightface_root(tmp_path / "nowhere")
    msg = str(info.value)
    assert "det_10g.onnx" in msg and "w600k_r50.onnx" in msg and "pretrained_weights/insightface/buffalo_l" in msg
    assert "\n" not in msg
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "det_10g.onnx").write_bytes(b"x")
    with pytest.raises(FaceModelsMissingError, match=r"missing w600k_r50.onnx in"):
        resolve_insightface_root(tmp_path / "half")


def test_default_roots_never_trigger_a_download(tmp_path):
    """With an empty HOME and no pretrained_weights, construction fails fast and writes nothing."""
    env = dict(os.environ, HOME=str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    code = (
        "from fastavatar.face.embedding import FaceEmbedder, FaceModelsMissingError\n"
        "try:\n    FaceEmbedder()\nexcept FaceModelsMissingError as e:\n    print('ERR', e)\n"
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "PYTHONPATH": repo},
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("ERR insightface buffalo_l models not found"), out.stderr[-2000:]
    assert not (tmp_path / "home" / ".insightface").exists()


def test_not_an_onnx_model_gives_clear_error(tmp_path, buffalo):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "det_10g.onnx").write_bytes(b"not onnx")
    (bad / "w600k_r50.onnx").write_bytes((buffalo / "w600k_r50.onnx").read_bytes())
    with pytest.raises(FaceModelsMissingError, match="det_10g.onnx: cannot load ONNX model"):
        FaceEmbedder(bad)
