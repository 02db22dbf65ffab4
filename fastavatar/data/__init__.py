"""Data: VHAP/NeRSemble subjects in COLMAP layout (parser) and a torch Dataset over their views."""

from fastavatar.data.colmap import (
    SubjectDataError,
    SubjectParser,
    discover_subjects,
    subject_id_from_dir,
)
from fastavatar.data.dataset import MultiViewDataset

__all__ = ["SubjectDataError", "SubjectParser", "discover_subjects", "subject_id_from_dir", "MultiViewDataset"]
