"""Subject ids and the decoder's W table (``w_ids_to_idx``): one convention, written once.

Ids are strings zero-padded to three digits (released: ``str(id).zfill(3)``); rows are assigned
in sorted integer-id order (non-numeric ids after numeric ones, by string).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Union

import torch


def _listing(items: List[str], n: int = 6) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + "]" + more


def normalize_subject_id(subject_id: Union[str, int]) -> str:
    """'6' / 6 / '006' -> '006'."""
    return str(subject_id).strip().zfill(3)


def make_w_ids_to_idx(subject_ids: Iterable[Union[str, int]]) -> Dict[str, int]:
    """Subject ids -> {'%03d' id: row}, rows in sorted integer-id order."""
    ids = sorted({normalize_subject_id(s) for s in subject_ids},
                 key=lambda s: (0, int(s), s) if s.isdigit() else (1, 0, s))
    return {s: i for i, s in enumerate(ids)}


def subject_ids_to_rows(w_ids_to_idx: Mapping[str, int], subject_ids: Iterable[Union[str, int]]) -> torch.Tensor:
    """Subject ids -> LongTensor of W rows; ValueError listing unknown ids."""
    ids = [normalize_subject_id(s) for s in subject_ids]
    unknown = [s for s in ids if s not in w_ids_to_idx]
    if unknown:
        raise ValueError(f"subject ids not in the W table: {_listing(unknown)} (known: {_listing(sorted(w_ids_to_idx))})")
    return torch.tensor([int(w_ids_to_idx[s]) for s in ids], dtype=torch.long)


def rows_to_subject_ids(w_ids_to_idx: Mapping[str, int]) -> List[str]:
    """Inverse table: row i -> subject id."""
    out = [""] * (max(w_ids_to_idx.values()) + 1 if w_ids_to_idx else 0)
    for s, i in w_ids_to_idx.items():
        out[int(i)] = s
    return out


__all__ = ["make_w_ids_to_idx", "normalize_subject_id", "rows_to_subject_ids", "subject_ids_to_rows"]
