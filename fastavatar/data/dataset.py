"""Torch Dataset over (subject, view) pairs, built on :class:`SubjectParser` (one per subject)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from fastavatar.data.colmap import SubjectParser


class MultiViewDataset(Dataset):
    """Items are dicts for one view of one subject::

        image [H,W,3] float 0..1 (on ``background``), mask [H,W,1] (ones when absent),
        c2w [4,4], K [3,3], points [P,3], subject_id (str), subject_index (int, row in ``parsers``),
        view_index (int), image_name (str)

    ``views`` selects view indices per subject (the same for all), e.g. all but camera 8 for training.
    Images are cached in memory after the first read (the sample data is small).
    """

    def __init__(
        self,
        parsers: Sequence[SubjectParser],
        views: Optional[Sequence[int]] = None,
        background: Sequence[float] = (1.0, 1.0, 1.0),
        cache_images: bool = True,
    ) -> None:
        self.parsers = list(parsers)
        self.background = tuple(float(b) for b in background)
        self.items: List[Tuple[int, int]] = []
        for s, parser in enumerate(self.parsers):
            for v in views if views is not None else range(len(parser)):
                if 0 <= v < len(parser):
                    self.items.append((s, v))
        self._index = {item: i for i, item in enumerate(self.items)}
        self.cache_images = cache_images
        self._cache: Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def index_of(self, subject_index: int, view_index: int) -> int:
        """Dataset index of (subject row, view); KeyError when that view is not in this split."""
        return self._index[(subject_index, view_index)]

    def _image_and_mask(self, s: int, v: int):
        key = (s, v)
        if key in self._cache:
            return self._cache[key]
        parser = self.parsers[s]
        image = parser.load_image(v, background=self.background)
        mask = parser.load_mask(v)
        if mask is None:
            mask = torch.ones(image.shape[0], image.shape[1], 1)
        if self.cache_images:
            self._cache[key] = (image, mask)
        return image, mask

    def __getitem__(self, index: int) -> dict:
        s, v = self.items[index]
        parser = self.parsers[s]
        image, mask = self._image_and_mask(s, v)
        return {
            "image": image,
            "mask": mask,
            "c2w": parser.c2w[v],
            "K": parser.Ks[v],
            "points": parser.points,
            "subject_id": parser.subject_id,
            "subject_index": s,
            "view_index": v,
            "image_name": parser.image_names[v],
        }
