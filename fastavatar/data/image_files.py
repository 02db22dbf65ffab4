"""Image-file headers shared by the dataset readers."""

from __future__ import annotations

from pathlib import Path
from typing import Tuple, Type


def image_size(path: Path, error: Type[Exception] = ValueError, what: str = "image") -> Tuple[int, int]:
    """(width, height) of an image file from its header, without decoding the pixels.

    An unreadable file raises ``error`` (the caller's one-line error type) naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError) as exc:
        raise error(f"{path}: cannot read {what} ({exc})") from None
