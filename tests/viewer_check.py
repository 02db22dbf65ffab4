"""Check that a splats.ply opens in PlayCanvas ``splat-transform`` (the loader SuperSplat uses).

``splat-transform`` is an npm package; install it once with
``npm install --prefix tools/splat-transform`` (node >= 18). We convert the PLY to CSV with it and
compare what it read with what we wrote.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, Optional

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_splat_transform() -> Optional[str]:
    """The splat-transform executable: $FASTAVATAR_SPLAT_TRANSFORM, tools/splat-transform, or PATH."""
    candidates = [os.environ.get("FASTAVATAR_SPLAT_TRANSFORM", ""),
                  str(REPO_ROOT / "tools" / "splat-transform" / "node_modules" / ".bin" / "splat-transform"),
                  shutil.which("splat-transform") or ""]
    for c in candidates:
        if c and Path(c).is_file() and shutil.which("node"):
            return c
    return None


def read_with_splat_transform(ply_path: Path, exe: Optional[str] = None) -> Dict[str, np.ndarray]:
    """Columns of ``ply_path`` as splat-transform reads them (via its CSV writer)."""
    exe = exe or find_splat_transform()
    if exe is None:
        raise FileNotFoundError("splat-transform not found: run `npm install --prefix tools/splat-transform`")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.csv"
        proc = subprocess.run([exe, "-w", str(ply_path), str(out)], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"{ply_path}: splat-transform failed: {proc.stderr.strip()[-500:]}")
        with out.open() as f:
            rows = list(csv.reader(f))
    header, body = rows[0], np.array(rows[1:], dtype=np.float64)
    return {name: body[:, i] for i, name in enumerate(header)}
