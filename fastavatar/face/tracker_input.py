"""The tracker's input: a photo squashed (or letterboxed) to 224x224 and ImageNet-normalised.

The released code squashes the whole photo to 224x224 (bilinear, aspect ratio not kept) before
ImageNet normalisation. The released weights were trained on such squashed images, so
``mode="squash"`` is the default; ``mode="pad"`` letterboxes onto white to keep the aspect ratio
(better for new training runs, but it changes the input distribution seen by the released weights).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRACKER_INPUT_SIZE = 224


def preprocess_for_tracker(
    image, mode: Literal["squash", "pad"] = "squash", size: int = TRACKER_INPUT_SIZE
) -> torch.Tensor:
    """Photo -> tracker input [3,size,size], ImageNet-normalised.

    Args:
        image: HxWx3 uint8 (0..255) or float (0..1) array / tensor, RGB, or a PIL image.
        mode: ``"squash"`` resizes the whole image to size x size ignoring the aspect ratio
            (released behaviour, matches the released weights); ``"pad"`` first letterboxes
            onto a white square (aspect preserved).
    """
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL image
        image = image.convert("RGB")
    if not isinstance(image, torch.Tensor):
        image = torch.from_numpy(np.array(image))  # copy: works for read-only arrays too
    x = image
    if x.dim() != 3 or x.shape[-1] not in (3, 4):
        raise ValueError(f"expected an HxWx3 image, got shape {tuple(x.shape)}")
    x = x[..., :3]
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    else:
        x = x.float()
    x = x.permute(2, 0, 1)  # [3,H,W]
    if mode == "pad":
        h, w = x.shape[1:]
        s = max(h, w)
        canvas = torch.ones(3, s, s, dtype=x.dtype)
        top, left = (s - h) // 2, (s - w) // 2
        canvas[:, top : top + h, left : left + w] = x
        x = canvas
    elif mode != "squash":
        raise ValueError(f"unknown preprocessing mode {mode!r}; use 'squash' or 'pad'")
    # PIL's bilinear resize (released code) filters when downsampling: antialias=True matches it.
    x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    x = x.clamp(0.0, 1.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TRACKER_INPUT_SIZE", "preprocess_for_tracker"]
