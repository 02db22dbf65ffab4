"""The one training loop that the decoder, W-encoder and tracker trainers share.

A trainer describes its model as a :class:`TrainTask` (batches, losses, validation, how to save
and restore its checkpoint); :func:`run_training` owns everything else, the same way for all three:

- epochs are counted from 1; a checkpoint's ``epoch`` is the number of epochs completed, and
  ``--resume`` continues with the next one (``global_step`` counts optimizer steps);
- one step: losses -> NaN/Inf guard (before any update, so the last good checkpoint stays) ->
  ``zero_grad`` -> backward -> gradient-norm clip per group (``grad_clip``) -> optimizer steps;
- TensorBoard: ``train/<loss>`` every ``log_every`` steps, ``epoch/train_loss`` and
  ``epoch/lr/<optimizer>`` per epoch, ``val/<metric>`` after each validation;
- validation every ``eval_every`` epochs and after the last; the ReduceLROnPlateau schedulers
  step on the task's metric; ``checkpoints/latest.pth`` every epoch, ``epoch_XXXX.pth`` every
  ``save_every`` epochs and after the last, ``best.pth`` when the task scores validations;
- resume reads ``latest.pth`` through the checkpoint loader (never a raw ``torch.load``);
- ``history.json`` holds one record per epoch of this invocation;
- distributed runs (``torchrun``): only rank 0 logs, validates and writes; the epoch's mean
  loss is averaged over ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch

from fastavatar.config import option
from fastavatar.io.atomic import atomic_write_json
from fastavatar.runtime import progress
from fastavatar.train.common import DistEnv, RunDir, check_finite


@dataclass
class TrainLoopConfig:
    """The knobs every trainer shares, one name each (trainer configs subclass this)."""

    output_dir: str = option("runs/train", "run folder: config.yaml, checkpoints/, tb/, history.json")
    max_epochs: int = option(100, "epochs (counted from 1; a checkpoint's epoch is the number completed)")
    max_steps: int = option(0, "stop after this many optimizer steps in total (0: no limit; for smoke tests)")
    grad_clip: float = option(1.0, "gradient-norm clip, per parameter group (0: off)")
    log_every: int = option(10, "steps between TensorBoard step scalars")
    eval_every: int = option(1, "epochs between validation passes (the last epoch is always validated)")
    save_every: int = option(10, "epochs between numbered checkpoints (latest.pth is written every epoch)")
    resume: bool = option(False, "continue from output_dir/checkpoints/latest.pth")
    progress: bool = option(True, "show progress bars")
    device: str = option("auto", "torch device: auto, cpu, cuda or cuda:N")
    seed: int = option(42, "random seed")


class TrainTask:
    """What a trainer plugs into :func:`run_training` (override every method that raises)."""

    name: str = "train"  # prefix of the printed lines: "[name] epoch 3: ..."
    optimizers: Dict[str, torch.optim.Optimizer]
    schedulers: Dict[str, Any]  # ReduceLROnPlateau per optimizer name (may be fewer)

    def start(self, start_epoch: int) -> None:
        """Called once before the first epoch, after a resume restored the state (default: nothing)."""

    def batches(self, epoch: int) -> Iterable[Any]:
        """The training batches of ``epoch`` (put the model in train mode here)."""
        raise NotImplementedError

    def losses(self, batch: Any) -> tuple:
        """(losses dict with the minimised ``"total"``, number of items in the batch)."""
        raise NotImplementedError

    def clip_groups(self) -> Sequence[Sequence[torch.Tensor]]:
        """Parameter groups clipped separately to ``grad_clip``."""
        raise NotImplementedError

    def validate(self, epoch: int) -> Dict[str, float]:
        """Validation metrics ({} when there is no validation set). Called on rank 0 only."""
        return {}

    def scheduler_metric(self, train_loss: float, val: Mapping[str, float]) -> float:
        """What the ReduceLROnPlateau schedulers minimise (default: the epoch's training loss)."""
        return train_loss

    def best_score(self, val: Mapping[str, float]) -> Optional[float]:
        """A validation score to maximise for ``best.pth`` (None: no best checkpoint)."""
        return None

    def save_checkpoint(self, path: Path, epoch: int, global_step: int, record: Mapping[str, Any]) -> None:
        """Write the task's checkpoint (``record``: this epoch's history entry, ``best_score``)."""
        raise NotImplementedError

    def load_checkpoint(self, ckpt: Mapping[str, Any]) -> None:
        """Restore weights and optimizer / scheduler state from a loaded ``latest.pth``."""
        raise NotImplementedError

    def epoch_summary(self, record: Mapping[str, Any]) -> str:
        """The tail of the printed epoch line, after ``epoch N:``."""
        return f"train loss {record['train_loss']:.5f}"


def _mean_over_ranks(value: float, env: DistEnv) -> float:
    if not env.distributed:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return float(t) / env.world_size


def run_training(task: TrainTask, cfg: TrainLoopConfig, run: RunDir, env: DistEnv) -> List[Dict[str, Any]]:
    """Train ``task`` from epoch 1 (or from ``latest.pth`` with ``cfg.resume``) to ``cfg.max_epochs``.

    Returns this invocation's history (one record per epoch, also written to ``history.json``).
    Raises :class:`fastavatar.train.common.NonFiniteLossError` on a NaN/Inf loss.
    """
    from fastavatar.io.checkpoints import load_checkpoint_file

    start_epoch, global_step, best = 0, 0, None
    if cfg.resume:
        latest = run.latest_checkpoint()
        if latest is None:
            raise FileNotFoundError(f"--resume: no checkpoint at {run.checkpoints / 'latest.pth'}")
        ckpt = load_checkpoint_file(latest)
        task.load_checkpoint(ckpt)
        start_epoch, global_step = int(ckpt["epoch"]), int(ckpt["global_step"])
        best = (ckpt.get("extra") or {}).get("best_score")
        if env.is_main:
            print(f"[{task.name}] resumed from {latest} (epoch {start_epoch}, step {global_step})")

    task.start(start_epoch)
    history: List[Dict[str, Any]] = []
    stop = False
    for epoch in range(start_epoch + 1, cfg.max_epochs + 1):
        t0 = time.perf_counter()
        total, count = 0.0, 0
        bar = progress(task.batches(epoch), env.is_main and cfg.progress, desc=f"epoch {epoch}/{cfg.max_epochs}",
                       leave=False)
        for batch in bar:
            losses, n = task.losses(batch)
            loss = losses["total"]
            global_step += 1
            check_finite(loss.detach(), global_step, run.path, f"{task.name} loss")
            for o in task.optimizers.values():
                o.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                for group in task.clip_groups():
                    torch.nn.utils.clip_grad_norm_(group, cfg.grad_clip)
            for o in task.optimizers.values():
                o.step()
            total += float(loss.detach()) * n
            count += n
            if env.is_main and global_step % max(cfg.log_every, 1) == 0:
                for k, v in losses.items():
                    run.scalar(f"train/{k}", float(v.detach()), global_step)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            if cfg.max_steps and global_step >= cfg.max_steps:
                stop = True
                break
        train_loss = _mean_over_ranks(total / max(count, 1), env)
        last = stop or epoch == cfg.max_epochs
        val: Dict[str, float] = {}
        if env.is_main and (epoch % max(cfg.eval_every, 1) == 0 or last):
            val = task.validate(epoch)
            for k, v in val.items():
                run.scalar(f"val/{k}", v, epoch)
        metric = task.scheduler_metric(train_loss, val)
        for s in task.schedulers.values():
            s.step(metric)
        record: Dict[str, Any] = {"epoch": epoch, "step": global_step, "train_loss": train_loss,
                                  "seconds": time.perf_counter() - t0}
        if val:
            record["val"] = val
        score = task.best_score(val) if val else None
        is_best = score is not None and (best is None or score > best)
        if is_best:
            best = score
        record["best_score"] = best
        history.append(record)
        if env.is_main:
            run.scalar("epoch/train_loss", train_loss, epoch)
            for name, o in task.optimizers.items():
                run.scalar(f"epoch/lr/{name}", o.param_groups[0]["lr"], epoch)
            print(f"[{task.name}] epoch {epoch}: {task.epoch_summary(record)} ({record['seconds']:.1f} s)")
            task.save_checkpoint(run.checkpoints / "latest.pth", epoch, global_step, record)
            if epoch % max(cfg.save_every, 1) == 0 or last:
                task.save_checkpoint(run.checkpoints / f"epoch_{epoch:04d}.pth", epoch, global_step, record)
            if is_best:
                task.save_checkpoint(run.checkpoints / "best.pth", epoch, global_step, record)
        if stop:
            break
    if env.is_main:
        atomic_write_json(run.path / "history.json", history)
    return history
