"""What every training loop shares: device/seed set-up, the run directory, TensorBoard,
atomic resumable checkpoints and the NaN guard."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch


class NonFiniteLossError(RuntimeError):
    """Raised when a loss becomes NaN/Inf; the last good checkpoint is left untouched."""


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda when available else cpu; an unavailable ``cuda`` falls back to cpu with a note."""
    if name in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("[fastavatar] CUDA requested but not available: using cpu")
        return torch.device("cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def check_finite(value: torch.Tensor, step: int, run_dir: Path, what: str = "loss") -> None:
    """Stop training with a clear message when ``value`` is NaN/Inf."""
    if not torch.isfinite(value).all():
        raise NonFiniteLossError(
            f"{what} became {float(value)} at step {step}; stopped. The last good checkpoint in "
            f"{Path(run_dir) / 'checkpoints'} is kept; resume with --resume after lowering the learning rate"
        )


class RunDir:
    """``output_dir`` layout: ``config.yaml``, ``checkpoints/{latest,epoch_XXXX}.pth``, ``tb/``, ``images/``.

    Only the main process (rank 0) writes; other ranks get a RunDir whose writers do nothing.
    """

    def __init__(self, output_dir: Path, is_main: bool = True, tensorboard: bool = True) -> None:
        self.path = Path(output_dir)
        self.is_main = is_main
        self.checkpoints = self.path / "checkpoints"
        self.images = self.path / "images"
        self.writer = None
        if is_main:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            self.images.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.path / "tb"))

    def latest_checkpoint(self) -> Optional[Path]:
        path = self.checkpoints / "latest.pth"
        return path if path.is_file() else None

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None and value is not None and math.isfinite(float(value)):
            self.writer.add_scalar(tag, float(value), step)

    def image(self, tag: str, image_hwc: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image_hwc.detach().clamp(0, 1).cpu(), step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def distributed_info() -> tuple:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) when not distributed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def progress(iterable: Any, enabled: bool = True, **kwargs):
    """tqdm when enabled (main process), the bare iterable otherwise."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, dynamic_ncols=True, **kwargs)
