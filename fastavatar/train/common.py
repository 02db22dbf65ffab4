"""What every training loop shares: the run directory, TensorBoard, the NaN guard and the
distributed environment (device, seeding and progress bars: :mod:`fastavatar.runtime`)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from fastavatar.cli import TrainingStopped
from fastavatar.runtime import resolve_device


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


def distributed_info() -> tuple:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) when not distributed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


@dataclass
class DistEnv:
    """Where this process trains: its rank among ``world_size`` processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def single(cls, device: torch.device) -> "DistEnv":
        """One process on ``device``."""
        return cls(0, 1, 0, torch.device(device))


def init_distributed(device_name: str) -> DistEnv:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on CUDA, gloo otherwise) and
    take this rank's device; else one process on :func:`fastavatar.runtime.resolve_device`."""
    rank, world, local_rank = distributed_info()
    if world <= 1:
        return DistEnv.single(resolve_device(device_name))
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() and device_name != "cpu" else "gloo"
    dist.init_process_group(backend=backend)
    device = torch.device(f"cuda:{local_rank}") if backend == "nccl" else torch.device("cpu")
    return DistEnv(rank, world, local_rank, device)


def close_distributed(env: DistEnv) -> None:
    """Wait for every rank, then leave the process group (no-op for one process)."""
    if env.distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()

