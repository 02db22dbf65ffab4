"""Multi-process training under ``torchrun``: process group, device, sampler, reductions, barriers.

Conventions (owned here):
- A run is distributed when it was started by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
  in the environment), even with one process, so the single-GPU NCCL path is the multi-GPU one.
- Backend ``auto``: NCCL when the run's device is CUDA, gloo otherwise. NCCL reduces tensors on
  the rank's own GPU (``cuda:LOCAL_RANK``, selected with ``torch.cuda.set_device`` before the group
  is made); gloo runs on the CPU, or on CUDA tensors when asked (``gloo`` + a CUDA device), where
  several ranks may share one GPU (NCCL >= 2.5 refuses that: "Duplicate GPU detected").
- Every reduction is made on ``env.device``: NCCL rejects CPU tensors.
- Only rank 0 writes files. Checkpoints are written between two barriers (:func:`main_writes`), so
  no rank reads a half-written file when resuming and no rank runs ahead of a pending write.
- Each epoch uses a :class:`~torch.utils.data.distributed.DistributedSampler` whose epoch is set
  (:func:`set_epoch`), so the ranks draw disjoint shards and a new shuffle every epoch.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Literal, Optional, Union

import torch
import torch.nn as nn

Backend = Literal["auto", "nccl", "gloo"]


class DistributedSetupError(RuntimeError):
    """torchrun was started in a way this run cannot use (one line, says what to change)."""


@dataclass
class DistEnv:
    """Where this process sits in the run."""

    rank: int  # global rank (0 = the process that writes)
    world_size: int  # number of processes
    local_rank: int  # rank on this node (GPU index under NCCL)
    device: torch.device  # where this rank's model, batches and reductions live
    backend: Optional[str] = None  # "nccl" / "gloo" when a process group exists, else None
    shares_device: bool = False  # several ranks on one GPU (gloo only)

    @classmethod
    def single(cls, device: Union[str, torch.device]) -> "DistEnv":
        """One process on ``device`` (no process group)."""
        return cls(0, 1, 0, torch.device(device))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def launched_by_torchrun() -> bool:
    """True when the environment holds torchrun's rank variables."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise DistributedSetupError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: Union[str, torch.device] = "auto", backend: Backend = "auto",
                     echo=print) -> DistEnv:
    """Set up this process: pick its device, join the process group when launched by torchrun.

    ``device``: ``auto`` / ``cpu`` / ``cuda`` (a ``cuda:N`` index is replaced by ``LOCAL_RANK``
    under torchrun, said in one line). Without torchrun this is the plain single-process device.
    """
    from fastavatar.runtime import resolve_device

    if backend not in ("auto", "nccl", "gloo"):
        raise DistributedSetupError(f"--dist_backend must be auto, nccl or gloo, got {backend!r}")
    if not launched_by_torchrun():
        return DistEnv.single(resolve_device(str(device)))
    import torch.distributed as dist

    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    wanted = resolve_device(str(device))
    if backend == "nccl" and wanted.type != "cuda":
        raise DistributedSetupError("--dist_backend nccl needs CUDA (no GPU visible, or --device cpu)")
    chosen = backend if backend != "auto" else ("nccl" if wanted.type == "cuda" else "gloo")
    shares = False
    if wanted.type == "cuda":
        count = torch.cuda.device_count()
        if wanted.index is not None and world > 1 and rank == 0:
            echo(f"[dist] --device {wanted} ignored under torchrun: each rank uses cuda:LOCAL_RANK")
        if local < count:
            index = local
        elif chosen == "gloo":
            index, shares = local % count, True
        else:
            raise DistributedSetupError(
                f"rank {rank}: LOCAL_RANK {local} but only {count} GPU(s) visible; start torchrun with "
                f"--nproc_per_node={count} (NCCL cannot put two ranks on one GPU; --dist_backend gloo can)")
        torch.cuda.set_device(index)
        run_device = torch.device("cuda", index)
    else:
        run_device = torch.device("cpu")
    if not dist.is_initialized():
        kwargs = {"device_id": run_device} if chosen == "nccl" else {}
        dist.init_process_group(backend=chosen, **kwargs)
    env = DistEnv(rank, world, local, run_device, chosen, shares)
    if env.is_main:
        echo(f"[dist] {world} process(es), backend {chosen}, rank 0 on {run_device}"
             + (" (ranks share GPUs)" if shares else ""))
    return env


def close_distributed(env: DistEnv, wait_for_peers: bool = True) -> None:
    """Leave the process group, after a final barrier when ``wait_for_peers``.

    The group is destroyed even when that barrier fails (a peer already gone): a process that exits
    still inside a gloo group can abort in the interpreter's teardown ("terminate called without an
    active exception"), which turns a clean stop into a crashed rank.
    """
    if env.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                if wait_for_peers:
                    barrier(env)
            finally:
                dist.destroy_process_group()


@contextlib.contextmanager
def distributed_session(device: Union[str, torch.device] = "auto", backend: Backend = "auto",
                        echo=print) -> Iterator[DistEnv]:
    """``with distributed_session(cfg.device, cfg.dist_backend) as env:`` -- :func:`init_distributed`,
    then always :func:`close_distributed` on the way out: after a barrier when the block finished, at
    once when it raised (a rank that failed alone must not wait at a barrier the others never reach)."""
    env = init_distributed(device, backend, echo)
    try:
        yield env
    except BaseException:
        close_distributed(env, wait_for_peers=False)
        raise
    close_distributed(env)


def barrier(env: DistEnv) -> None:
    if not env.distributed:
        return
    import torch.distributed as dist

    if env.backend == "nccl":
        dist.barrier(device_ids=[env.device.index])
    else:
        dist.barrier()


@contextlib.contextmanager
def main_writes(env: DistEnv) -> Iterator[bool]:
    """``with main_writes(env) as write: if write: save(...)`` -- rank 0 writes, all ranks wait.

    The barrier before keeps a fast rank from writing while others still read the previous file;
    the barrier after makes the file complete for every rank before anyone goes on (resume reads it).
    """
    barrier(env)
    try:
        yield env.is_main
    finally:
        barrier(env)


def all_reduce_mean(value: Union[float, torch.Tensor], env: DistEnv) -> float:
    """Mean of a scalar over all ranks, reduced on the rank's device (NCCL needs CUDA tensors)."""
    if not env.distributed:
        return float(value)
    import torch.distributed as dist

    t = torch.as_tensor(value, dtype=torch.float64 if env.device.type == "cpu" else torch.float32)
    t = t.detach().reshape(1).to(env.device, dtype=t.dtype)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / env.world_size


def weighted_mean(total: float, count: int, env: DistEnv) -> float:
    """sum(total) / sum(count) over ranks: the mean over every item of the epoch, whatever the shard sizes."""
    if not env.distributed:
        return total / max(count, 1)
    import torch.distributed as dist

    dtype = torch.float64 if env.device.type == "cpu" else torch.float32
    t = torch.tensor([total, float(count)], dtype=dtype, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t[0].item()) / max(float(t[1].item()), 1.0)


def broadcast_from_main(obj, env: DistEnv):
    """Rank 0's ``obj`` (any picklable value) on every rank, e.g. validation metrics that only rank 0
    computed, so that every rank's schedulers see the same value and keep the same learning rate."""
    if not env.distributed:
        return obj
    import torch.distributed as dist

    box = [obj if env.is_main else None]
    dist.broadcast_object_list(box, src=0, device=env.device if env.backend == "nccl" else None)
    return box[0]


def make_sampler(dataset, env: DistEnv, shuffle: bool, seed: int):
    """A DistributedSampler over ``dataset`` when distributed, else None (the DataLoader shuffles)."""
    if not env.distributed:
        return None
    from torch.utils.data.distributed import DistributedSampler

    return DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=shuffle, seed=seed)


def set_epoch(sampler, epoch: int) -> None:
    """Reseed the sampler's shuffle for ``epoch`` (no-op without one)."""
    if sampler is not None and hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def wrap_ddp(model: nn.Module, env: DistEnv, **kwargs) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when distributed (else unchanged)."""
    if not env.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model
