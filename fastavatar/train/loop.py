"""The one training loop that the decoder, W-encoder and tracker trainers share.

A trainer describes its model as a :class:`TrainTask` (batches, losses, validation, how to save
and restore its checkpoint); :func:`run_training` owns everything else, the same way for all three:

- epochs are counted from 1; a checkpoint's ``epoch`` is the number of epochs completed, and
  ``--resume`` continues with the next one (``global_step`` counts optimizer steps);
- the run folder (:func:`open_run`): a folder holding another run's checkpoints is refused unless
  ``--resume`` or ``--overwrite``; temp files of interrupted writes are removed at start; a full disk
  or a read-only folder is one line naming the folder (writes are atomic, so the last good
  checkpoint stays);
- one step: losses -> loss guard -> ``zero_grad`` -> backward -> gradient guard -> gradient-norm
  clip per group (``grad_clip``) -> optimizer steps -> parameter guard. The guards
  (:class:`fastavatar.train.safety.StepGuard`) stop on NaN/Inf and on explosions (``max_loss``,
  ``max_param_abs``) before anything of that step is saved, so every checkpoint is finite;
- TensorBoard: ``train/<loss>`` every ``log_every`` steps, ``epoch/train_loss`` and
  ``epoch/lr/<optimizer>`` per epoch, ``val/<metric>`` after each validation;
- validation every ``eval_every`` epochs and after the last; the ReduceLROnPlateau schedulers
  step on the task's metric; ``checkpoints/latest.pth`` every epoch, ``epoch_XXXX.pth`` every
  ``save_every`` epochs, at the ``model_save_steps`` epochs and after the last, ``best.pth`` when
  the task scores validations;
- resume reads ``latest.pth`` through the checkpoint loader (never a raw ``torch.load``); a
  damaged one, or one of another kind or configuration, is one line, then either the run stops or
  (``--resume_fallback``) the newest good ``epoch_*.pth`` is used; learning rates changed since the
  checkpoint's run win over its optimizer state, and the run prints the values it uses;
- ``history.json`` holds one record per epoch across resumes (written each epoch, before the
  checkpoint); TensorBoard continues in ``tb/`` (events after the resumed step are purged);
- Ctrl-C stops with one line saying which checkpoint to resume from;
- distributed runs (``torchrun``, :mod:`fastavatar.train.distributed`): only rank 0 logs,
  validates and writes; the epoch's loss is the mean over every rank's items, reduced on the
  rank's device; rank 0's validation metrics and scheduler metric are broadcast so every rank's
  learning rates stay equal; checkpoints are written between barriers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Literal, Mapping, Optional, Sequence

import torch

from fastavatar.config import option
from fastavatar.io.atomic import atomic_write_json
from fastavatar.runtime import progress
from fastavatar.train.common import RunDir
from fastavatar.train.distributed import DistEnv, all_reduce_mean, broadcast_from_main, main_writes, weighted_mean
from fastavatar.train.safety import (RunFolderError, StepGuard, continue_history, override_learning_rates,
                                     pick_resume_checkpoint, prepare_run_folder, remove_stale_temps, write_guard)


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
    model_save_steps: List[int] = option([], "further epochs that get a numbered checkpoint (the released flag)")
    resume: bool = option(False, "continue from output_dir/checkpoints/latest.pth")
    resume_fallback: bool = option(False, "with --resume: when latest.pth is damaged or does not fit, resume from "
                                          "the newest good epoch_*.pth instead of stopping")
    overwrite: bool = option(False, "replace the checkpoints of an earlier run in output_dir (refused otherwise)")
    max_loss: float = option(1e6, "explosion threshold: stop when a step's loss exceeds this (0: off)")
    max_param_abs: float = option(1e4, "explosion threshold: stop when any weight's |value| exceeds this (0: off)")
    progress: bool = option(True, "show progress bars")
    device: str = option("auto", "torch device: auto, cpu, cuda or cuda:N (under torchrun each rank uses cuda:LOCAL_RANK)")
    dist_backend: Literal["auto", "nccl", "gloo"] = option(
        "auto", "torchrun process-group backend: auto (NCCL on CUDA, gloo on CPU), nccl or gloo")
    seed: int = option(42, "random seed")

    def check(self) -> None:
        """One-line ValueError naming the flag of the first out-of-range knob."""
        import math

        for name in ("max_epochs", "log_every", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "grad_clip", "max_loss", "max_param_abs"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"--{name} must be a finite number >= 0, got {value}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other; pass one")


def open_run(cfg: TrainLoopConfig, env: DistEnv, **run_kwargs: Any) -> RunDir:
    """The run folder for ``cfg``: claimed (see :func:`fastavatar.train.safety.prepare_run_folder`),
    cleaned of temp files from interrupted writes, then opened. Call before writing anything."""
    cfg.check()
    refused = None
    if env.is_main:
        try:
            prepare_run_folder(Path(cfg.output_dir), cfg.resume, cfg.overwrite)
            out = Path(cfg.output_dir)
            remove_stale_temps([out, out / "checkpoints", out / "images", out / "stats"])
        except RunFolderError as exc:
            refused = str(exc)
    # every rank waits for rank 0's check and stops with its line (rather than hanging at the first all-reduce)
    refused = broadcast_from_main(refused, env)
    if refused is not None:
        raise RunFolderError(refused)
    with write_guard(Path(cfg.output_dir), "create the run folder"):
        return RunDir(Path(cfg.output_dir), is_main=env.is_main, **run_kwargs)


class TrainTask:
    """What a trainer plugs into :func:`run_training` (override every method that raises)."""

    name: str = "train"  # prefix of the printed lines: "[name] epoch 3: ..."
    optimizers: Dict[str, torch.optim.Optimizer]
    # config key of each param group's learning rate, per optimizer (resume: changed values win)
    lr_keys: Dict[str, Sequence[str]] = {}
    advice: str = "resume with --resume and a lower learning rate (learning rates given now override the checkpoint's)"
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


def restore_single_model(ckpt: Mapping[str, Any], model: torch.nn.Module, model_key: str,
                         optimizer: torch.optim.Optimizer, scheduler: Any) -> tuple:
    """Load a one-model training checkpoint (``ckpt[model_key]`` plus optional ``optimizer_dict`` and
    ``scheduler_dict``) into ``model``/``optimizer``/``scheduler``; returns (epoch, global_step)."""
    model.load_state_dict(ckpt[model_key], strict=True)
    if ckpt.get("optimizer_dict"):
        optimizer.load_state_dict(ckpt["optimizer_dict"])
    if ckpt.get("scheduler_dict"):
        scheduler.load_state_dict(ckpt["scheduler_dict"])
    return int(ckpt["epoch"]), int(ckpt["global_step"])


def _resume(task: TrainTask, cfg: TrainLoopConfig, run: RunDir, env: DistEnv):
    """(checkpoint path, loaded checkpoint) restored into ``task``; every failure one line."""
    from fastavatar.io.checkpoints import load_checkpoint_file

    def load(path: Path):
        ckpt = load_checkpoint_file(path)
        if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("epoch"), int):
            raise ValueError(f"{path}: not a training checkpoint of this kind (no epoch / state entries)")
        try:
            task.load_checkpoint(ckpt)
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as exc:
            detail = str(exc).strip().splitlines()
            reason = f"{type(exc).__name__}: {detail[0][:160]}" if detail else type(exc).__name__
            raise ValueError(f"{path}: does not fit this run (another kind or configuration; {reason})") from None
        return ckpt

    log = print if env.is_main else (lambda _m: None)
    return pick_resume_checkpoint(run.checkpoints, load, cfg.resume_fallback, log=log)


def run_training(task: TrainTask, cfg: TrainLoopConfig, run: RunDir, env: DistEnv) -> List[Dict[str, Any]]:
    """Train ``task`` from epoch 1 (or from ``latest.pth`` with ``cfg.resume``) to ``cfg.max_epochs``.

    Returns the run's history (one record per epoch, earlier invocations' included; also written
    to ``history.json``). Raises :class:`fastavatar.cli.TrainingStopped` when a step guard fires,
    :class:`fastavatar.train.safety.RunFolderError` for an unusable folder or checkpoint, and
    KeyboardInterrupt (with a resume hint) on Ctrl-C.
    """
    from dataclasses import asdict

    cfg.check()
    start_epoch, global_step, best = 0, 0, None
    history: List[Dict[str, Any]] = []
    if cfg.resume:
        latest, ckpt = _resume(task, cfg, run, env)
        start_epoch, global_step = int(ckpt["epoch"]), int(ckpt.get("global_step") or 0)
        best = (ckpt.get("extra") or {}).get("best_score")
        log = print if env.is_main else (lambda _m: None)
        override_learning_rates(task.optimizers, task.lr_keys, asdict(cfg), ckpt.get("config"), log=log)
        if env.is_main:
            print(f"[{task.name}] resumed from {latest} (epoch {start_epoch}, step {global_step})")
            history = continue_history(run.path / "history.json", start_epoch)
            run.continue_tensorboard(global_step + 1)

    guard = StepGuard({name: [p for g in o.param_groups for p in g["params"]] for name, o in task.optimizers.items()},
                      max_loss=cfg.max_loss, max_param_abs=cfg.max_param_abs, advice=task.advice)
    task.start(start_epoch)
    stop = False
    last_saved = start_epoch
    try:
        for epoch in range(start_epoch + 1, cfg.max_epochs + 1):
            t0 = time.perf_counter()
            total, count = 0.0, 0
            bar = progress(task.batches(epoch), env.is_main and cfg.progress, desc=f"epoch {epoch}/{cfg.max_epochs}",
                           leave=False)
            for batch in bar:
                losses, n = task.losses(batch)
                loss = losses["total"]
                global_step += 1
                # Every rank must take the same decision, or the others would wait forever in the
                # backward's all-reduce: the guard sees the loss averaged over ranks (NaN if any is).
                guard.check_loss(torch.tensor(all_reduce_mean(loss.detach(), env)) if env.distributed else loss,
                                 global_step)
                for o in task.optimizers.values():
                    o.zero_grad(set_to_none=True)
                loss.backward()
                guard.check_gradients(global_step)
                if cfg.grad_clip > 0:
                    for group in task.clip_groups():
                        torch.nn.utils.clip_grad_norm_(group, cfg.grad_clip)
                for o in task.optimizers.values():
                    o.step()
                guard.check_parameters(global_step)
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
            train_loss = weighted_mean(total, count, env)
            last = stop or epoch == cfg.max_epochs
            val: Dict[str, float] = {}
            if env.is_main and (epoch % max(cfg.eval_every, 1) == 0 or last):
                val = task.validate(epoch)
                for k, v in val.items():
                    run.scalar(f"val/{k}", v, epoch)
            val = broadcast_from_main(val, env)
            metric = broadcast_from_main(task.scheduler_metric(train_loss, val), env)
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
            with main_writes(env) as write:
                if write:
                    run.scalar("epoch/train_loss", train_loss, epoch)
                    for name, o in task.optimizers.items():
                        run.scalar(f"epoch/lr/{name}", o.param_groups[0]["lr"], epoch)
                    print(f"[{task.name}] epoch {epoch}: {task.epoch_summary(record)} ({record['seconds']:.1f} s)")
                    # history first: a kill between the two leaves a record that the resume drops
                    with write_guard(run.path, "write history.json"):
                        atomic_write_json(run.path / "history.json", history)
                    numbered = epoch % max(cfg.save_every, 1) == 0 or last or epoch in cfg.model_save_steps
                    names = ["latest.pth"] + ([f"epoch_{epoch:04d}.pth"] if numbered else []) + (
                        ["best.pth"] if is_best else [])
                    for name in names:
                        with write_guard(run.checkpoints, f"save {name}"):
                            task.save_checkpoint(run.checkpoints / name, epoch, global_step, record)
                    last_saved = epoch
            if stop:
                break
    except KeyboardInterrupt:
        where = (f"{run.checkpoints / 'latest.pth'} (epoch {last_saved}) is intact; continue with --resume"
                 if last_saved else "no checkpoint was written yet")
        raise KeyboardInterrupt(f"training stopped at step {global_step}; {where}") from None
    return history
