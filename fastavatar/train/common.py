"""What every training loop shares: the run directory, TensorBoard and the NaN guard (the
distributed environment: :mod:`fastavatar.train.distributed`; device, seeding and progress bars:
:mod:`fastavatar.runtime`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from fastavatar.cli import TrainingStopped


class NonFiniteLossError(TrainingStopped):
    """Raised when a loss becomes NaN/Inf; the last good checkpoint is left untouched."""


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

    def continue_tensorboard(self, purge_step: int) -> None:
        """On resume: reopen the TensorBoard writer so that events at or after ``purge_step`` (steps
        redone after the checkpoint) are hidden and the curves continue."""
        if self.writer is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer.close()
            self.writer = SummaryWriter(str(self.path / "tb"), purge_step=purge_step)

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
