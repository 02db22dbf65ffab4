"""Robust photo loading: any common image file -> 8-bit RGB array, or a one-line ``ImageError``.

What is handled (instead of crashing deep inside PIL/cv2/onnxruntime):
- missing file, directory, empty, corrupt or non-image file, truncated file -> ``ImageError``
- EXIF orientation (phone photos) -> applied with ``PIL.ImageOps.exif_transpose``
- grayscale (``L``/``1``), palette (``P``), CMYK, YCbCr -> RGB
- alpha (``RGBA``/``LA``/``PA``/``P`` with transparency) -> composited on **white** (the
  training images have white backgrounds)
- 16-bit / 32-bit integer and float grayscale (``I;16``, ``I``, ``F``) -> rescaled to 8 bit
  (PIL's own ``convert`` would clip values above 255 to white)
- multi-frame files (GIF/TIFF) -> first frame
- very large images -> downscaled so the longer side is at most ``max_side`` (JPEG uses
  ``draft`` decoding so a 50-MP photo is never fully decoded); a decompression bomb beyond
  PIL's hard limit -> ``ImageError``
- tiny images (< ``MIN_SIDE`` px) -> ``ImageError``
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

PathLike = Union[str, os.PathLike]

MIN_SIDE = 32
"""Smallest accepted image side (pixels): below this no face can be aligned to 112x112."""

DEFAULT_MAX_SIDE = 2048
"""Longer-side cap for face processing; the detector runs at 640 px anyway."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
"""Extensions treated as photos when a folder is given (batch mode)."""


class ImageError(ValueError):
    """A photo could not be read; the message is one line and names the file."""


@dataclass
class LoadedImage:
    """An 8-bit RGB photo plus how it relates to the file on disk."""

    rgb: np.ndarray  # [H, W, 3] uint8, RGB
    path: Path  # the file it came from
    original_size: tuple  # (width, height) after EXIF orientation, before downscaling
    scale: float  # rgb width / original width (1.0 unless downscaled)
    source_mode: str  # PIL mode of the file (e.g. "RGB", "I;16", "RGBA")

    @property
    def bgr(self) -> np.ndarray:
        """[H, W, 3] uint8, BGR (what insightface/cv2 expect), contiguous."""
        return np.ascontiguousarray(self.rgb[:, :, ::-1])


def _to_rgb8(image, path: Path):
    """PIL image of any mode -> PIL ``RGB`` image (8 bit)."""
    from PIL import Image

    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        if not np.isfinite(arr).all():
            arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        if mode.startswith("I;16"):
            peak = 65535.0
        elif mode == "F" and arr.max(initial=0.0) <= 1.0:
            peak = 1.0
        else:
            peak = max(float(arr.max(initial=0.0)), 1.0)
            peak = 65535.0 if peak > 255.0 and peak <= 65535.0 else peak
        arr8 = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"{path}: unsupported image mode {mode!r} ({exc})") from None


def load_rgb(path: PathLike, max_side: int = DEFAULT_MAX_SIDE) -> LoadedImage:
    """Read ``path`` as an 8-bit RGB array with EXIF orientation applied.

    Args:
        path: image file.
        max_side: if the longer side exceeds this, the image is downscaled (aspect kept);
            ``0`` disables downscaling.

    Raises:
        ImageError: one line naming the file and what is wrong.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, expected an image file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image = Image.open(path)
            except Image.DecompressionBombWarning:
                image = None
            if image is None:  # large but under the hard limit: open anyway, downscale below
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(path)
        with image:
            source_mode = image.mode
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)
            file_width = image.size[0]
            if max_side and image.format == "JPEG" and max(image.size) > 2 * max_side:
                # Decode at 1/2, 1/4 or 1/8 resolution directly (never the full bitmap).
                image.draft("RGB", (max_side, max_side))
            image.load()
            oriented = ImageOps.exif_transpose(image)
            # Size in the file's own pixel grid, after orientation (draft may have shrunk it).
            draft_ratio = image.size[0] / max(1, file_width)
            ow, oh = oriented.size
            original_size = (int(round(ow / draft_ratio)), int(round(oh / draft_ratio)))
            rgb_image = _to_rgb8(oriented, path)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: image too large to decode safely ({exc})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file or unsupported format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{path}: corrupt or truncated image ({str(exc).splitlines()[0]})") from None

    width, height = rgb_image.size
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"{path}: image is {width}x{height} px, need at least {MIN_SIDE} px per side")
    if max_side and max(width, height) > max_side:
        factor = max_side / max(width, height)
        new_size = (max(1, int(round(width * factor))), max(1, int(round(height * factor))))
        rgb_image = rgb_image.resize(new_size, Image.Resampling.LANCZOS)
    rgb = np.array(rgb_image, dtype=np.uint8, copy=True)  # writable, contiguous
    scale = rgb.shape[1] / float(original_size[0])
    return LoadedImage(rgb=rgb, path=path, original_size=original_size, scale=scale, source_mode=source_mode)


def list_images(folder: PathLike) -> list:
    """Image files directly inside ``folder`` (sorted by name), by extension."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
