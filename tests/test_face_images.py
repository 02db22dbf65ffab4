"""Robust photo loading: every odd input is converted or gives a one-line ImageError."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from face_fixtures import insightface_sample_image
from fastavatar.face.images import ImageError, list_images, load_rgb


def _gradient(width: int, height: int) -> np.ndarray:
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    return np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                           np.full((height, width, 1), 60.0)], axis=2).astype(np.uint8)


def test_plain_rgb_png_roundtrip(tmp_path):
    arr = _gradient(64, 48)
    Image.fromarray(arr).save(tmp_path / "a.png")
    loaded = load_rgb(tmp_path / "a.png")
    assert loaded.rgb.dtype == np.uint8 and loaded.rgb.shape == (48, 64, 3)
    np.testing.assert_array_equal(loaded.rgb, arr)
    np.testing.assert_array_equal(loaded.bgr, arr[:, :, ::-1])
    assert loaded.scale == 1.0 and loaded.original_size == (64, 48)


def test_grayscale_becomes_rgb(tmp_path):
    Image.fromarray(_gradient(40, 40)[:, :, 0]).save(tmp_path / "g.png")
    loaded = load_rgb(tmp_path / "g.png")
    assert loaded.rgb.shape == (40, 40, 3)
    assert np.array_equal(loaded.rgb[..., 0], loaded.rgb[..., 1])
    assert loaded.source_mode == "L"


def test_rgba_composited_on_white(tmp_path):
    arr = np.zeros((40, 40, 4), dtype=np.uint8)
    arr[..., 0] = 255  # red
    arr[:20, :, 3] = 255  # top half opaque, bottom half transparent
    Image.fromarray(arr, mode="RGBA").save(tmp_path / "a.png")
    loaded = load_rgb(tmp_path / "a.png")
    assert tuple(loaded.rgb[5, 5]) == (255, 0, 0)
    assert tuple(loaded.rgb[35, 5]) == (255, 255, 255)


def test_16bit_grayscale_is_rescaled_not_clipped(tmp_path):
    import cv2

    arr = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), arr)
    loaded = load_rgb(tmp_path / "g16.png")
    assert loaded.source_mode.startswith("I")
    assert loaded.rgb.dtype == np.uint8
    assert loaded.rgb[0, 0, 0] == 0 and loaded.rgb[-1, -1, 0] == 255
    assert 100 < loaded.rgb[32, 0, 0] < 155  # mid-grey, not white (PIL's convert would clip to 255)


def test_16bit_rgb(tmp_path):
    import cv2

    arr = (np.random.default_rng(0).random((50, 60, 3)) * 65535).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "c16.png"), arr)
    loaded = load_rgb(tmp_path / "c16.png")
    assert loaded.rgb.dtype == np.uint8 and loaded.rgb.shape == (50, 60, 3)
    np.testing.assert_allclose(loaded.rgb[..., ::-1].astype(float), arr / 257.0, atol=1.5)


def test_exif_orientation_applied(tmp_path):
    arr = _gradient(80, 40)  # landscape
    image = Image.fromarray(arr)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    loaded = load_rgb(tmp_path / "rot.jpg")
    assert loaded.rgb.shape == (80, 40, 3)  # portrait after orientation
    assert loaded.original_size == (40, 80)


def test_huge_image_is_downscaled(tmp_path):
    Image.fromarray(_gradient(3000, 1500)).save(tmp_path / "big.jpg", quality=80)
    loaded = load_rgb(tmp_path / "big.jpg", max_side=1024)
    assert max(loaded.rgb.shape[:2]) == 1024
    assert loaded.original_size == (3000, 1500)
    assert abs(loaded.scale - 1024 / 3000) < 2e-3


def test_decompression_bomb_gives_image_error(tmp_path, monkeypatch):
    Image.fromarray(_gradient(400, 400)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 400*400 > 2 * 1000 -> hard error
    with pytest.raises(ImageError, match="bomb.png.*too large"):
        load_rgb(tmp_path / "bomb.png")


@pytest.mark.parametrize(
    "name,content,pattern",
    [
        ("corrupt.jpg", b"\xff\xd8\xff\xe0 this is not really a jpeg", "corrupt.jpg"),
        ("notes.png", b"hello, I am a text file", "notes.png: not an image"),
        ("empty.jpg", b"", "empty.jpg: empty file"),
    ],
)
def test_bad_files_give_one_line_image_error(tmp_path, name, content, pattern):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageError, match=pattern) as info:
        load_rgb(tmp_path / name)
    assert "\n" not in str(info.value)


def test_truncated_png_gives_image_error(tmp_path):
    Image.fromarray(_gradient(100, 100)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png: corrupt or truncated"):
        load_rgb(tmp_path / "cut.png")


def test_missing_and_directory_and_tiny(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        load_rgb(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="is a directory"):
        load_rgb(tmp_path)
    Image.fromarray(_gradient(10, 10)).save(tmp_path / "tiny.png")
    with pytest.raises(ImageError, match="tiny.png: image is 10x10"):
        load_rgb(tmp_path / "tiny.png")


def test_insightface_sample_photos_load():
    group = load_rgb(insightface_sample_image("t1.jpg"))
    assert group.rgb.shape[2] == 3 and min(group.rgb.shape[:2]) > 500
    hanks = load_rgb(insightface_sample_image("Tom_Hanks_54745.png"))
    assert hanks.rgb.shape == (112, 112, 3)


def test_list_images_filters_by_extension(tmp_path):
    for name in ("b.jpg", "a.PNG", "c.txt", "d.webp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.PNG", "b.jpg", "d.webp"]


def test_cmyk_palette_and_multiframe(tmp_path):
    arr = _gradient(48, 40)
    Image.fromarray(arr).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    cmyk = load_rgb(tmp_path / "cmyk.jpg")
    assert cmyk.source_mode == "CMYK" and cmyk.rgb.shape == (40, 48, 3)
    assert np.abs(cmyk.rgb.astype(int) - arr.astype(int)).mean() < 12
    pal = Image.fromarray(arr).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    loaded = load_rgb(tmp_path / "pal.png")
    assert loaded.rgb.shape == (40, 48, 3)
    index0 = np.asarray(Image.open(tmp_path / "pal.png")) == 0
    assert index0.any() and (loaded.rgb[index0] == 255).all()  # transparent entries -> white
    frames = [Image.fromarray(arr), Image.fromarray(255 - arr)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    gif = load_rgb(tmp_path / "anim.gif")
    assert gif.rgb.shape == (40, 48, 3)


def test_large_but_allowed_image_loads_despite_bomb_warning(tmp_path, monkeypatch):
    Image.fromarray(_gradient(150, 100)).save(tmp_path / "large.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10000)  # 15000 px: above the warning, below 2x the limit
    loaded = load_rgb(tmp_path / "large.png", max_side=64)
    assert loaded.rgb.shape == (43, 64, 3) and loaded.original_size == (150, 100)
