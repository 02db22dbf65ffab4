"""What keeps a training run's data safe; used by the shared loop (:mod:`fastavatar.train.loop`).

* :func:`prepare_run_folder`: a run never writes into a folder that holds another run's
  checkpoints unless ``--resume`` (continue it) or ``--overwrite`` (replace it, said aloud);
  an ``--output_dir`` that is a file, or a folder we cannot write, is a one-line error.
* :func:`remove_stale_temps`: temp files of writes that a kill interrupted are removed at start.
* :class:`StepGuard`: after every optimisation step, before anything is saved, the loss, the
  gradients and the parameters must be finite and below the explosion thresholds; otherwise
  :class:`fastavatar.cli.TrainingStopped` (the last saved checkpoint is, by construction, good).
* :func:`pick_resume_checkpoint`: ``latest.pth`` if it loads and fits, else (by flag) the newest
  ``epoch_*.pth`` that does, each rejection one line.
* :func:`override_learning_rates`: on resume, a learning rate that differs from the one the
  checkpoint's run was configured with (i.e. the user changed it) replaces the saved optimizer
  state's value; the run prints the values it uses either way.
* :func:`continue_history`: ``history.json`` keeps the earlier invocations' epochs.
* :func:`write_guard`: a failed write (full disk, read-only folder) is one line naming the folder.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Sequence, Tuple

import torch

from fastavatar.cli import TrainingStopped
from fastavatar.train.common import NonFiniteLossError

CHECKPOINT_NAMES = re.compile(r"^(latest|best|epoch_\d+)\.pth$")
# atomic_path temp names: ".<final name>.<random><suffix>" beside the final file
STALE_TEMP = re.compile(r"^\..+\.(pth|pt|json|yaml|png|ply|tmp)\.[A-Za-z0-9_]+(\.pt|\.tmp|\.png|\.ply)?$")


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (one line, names the folder)."""


# ---------------------------------------------------------------------------- the folder
def existing_checkpoints(checkpoints: Path) -> List[Path]:
    if not checkpoints.is_dir():
        return []
    return sorted(p for p in checkpoints.iterdir() if p.is_file() and CHECKPOINT_NAMES.match(p.name))


def prepare_run_folder(output_dir: Path, resume: bool, overwrite: bool, log: Callable[[str], None] = print) -> None:
    """Check (and create) the run folder before anything is written. See the module docstring."""
    output_dir = Path(output_dir)
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other; pass one")
    if output_dir.exists() and not output_dir.is_dir():
        raise RunFolderError(f"--output_dir {output_dir} is a file, not a folder")
    for parent in output_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunFolderError(f"--output_dir {output_dir}: {parent} is a file, not a folder")
            break
    checkpoints = output_dir / "checkpoints"
    found = existing_checkpoints(checkpoints)
    if found and not resume and not overwrite:
        names = ", ".join(p.name for p in found[:4]) + (f" (+{len(found) - 4} more)" if len(found) > 4 else "")
        raise RunFolderError(
            f"{output_dir} holds the checkpoints of an earlier run ({names}); pass --resume to continue it, "
            f"--overwrite to replace it, or choose another --output_dir"
        )
    if resume and not found:
        raise RunFolderError(f"--resume given but {checkpoints} holds no checkpoint to resume from")
    if overwrite and found:
        for p in found:
            p.unlink()
        for name in ("history.json",):
            (output_dir / name).unlink(missing_ok=True)
        if (output_dir / "tb").is_dir():
            shutil.rmtree(output_dir / "tb")
        log(f"[train] --overwrite: removed {len(found)} checkpoint(s), history and TensorBoard logs of the "
            f"earlier run in {output_dir}")
    with write_guard(output_dir, "create the run folder"):
        checkpoints.mkdir(parents=True, exist_ok=True)
        probe = checkpoints / ".write_probe"
        probe.write_bytes(b"")
        probe.unlink()


def remove_stale_temps(folders: Iterable[Path], log: Callable[[str], None] = print) -> List[Path]:
    """Delete temp files left by interrupted atomic writes; returns what was removed."""
    removed: List[Path] = []
    total = 0
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.is_file() and STALE_TEMP.match(p.name):
                total += p.stat().st_size
                p.unlink()
                removed.append(p)
    if removed:
        log(f"[train] removed {len(removed)} temp file(s) of interrupted writes ({total / 1e6:.1f} MB) in "
            f"{sorted({str(p.parent) for p in removed})}")
    return removed


@contextmanager
def write_guard(folder: Path, what: str) -> Iterator[None]:
    """Turn a failed write into one line naming the folder (the last good checkpoint stays:
    writes are atomic)."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or (str(exc).splitlines() or [type(exc).__name__])[0]
        raise RunFolderError(f"{folder}: could not {what} ({reason}); earlier checkpoints there are unchanged") from None
    except RuntimeError as exc:  # torch's zip writer reports a short write as RuntimeError
        text = str(exc)
        if "PytorchStreamWriter" in text or "unexpected pos" in text or "file write failed" in text:
            raise RunFolderError(
                f"{folder}: could not {what} (write failed: disk full or folder not writable); "
                f"earlier checkpoints there are unchanged"
            ) from None
        raise


# ---------------------------------------------------------------------------- the step guard
class StepGuard:
    """Stops training when the loss, the gradients or the parameters go wrong.

    ``max_loss``: a finite loss above this is an explosion (0 disables). ``max_param_abs``: a
    parameter entry with ``|x|`` above this is an explosion (0 disables). ``advice`` ends each
    message (what to change before resuming).
    """

    def __init__(self, parameters: Mapping[str, Sequence[torch.nn.Parameter]], max_loss: float,
                 max_param_abs: float, advice: str = "") -> None:
        self.groups = {k: [p for p in v if p.requires_grad] for k, v in parameters.items()}
        self.max_loss = float(max_loss)
        self.max_param_abs = float(max_param_abs)
        self.advice = advice

    def _stop(self, what: str, step: int, non_finite: bool = False) -> None:
        kind = NonFiniteLossError if non_finite else TrainingStopped
        raise kind(f"{what} at step {step}; stopped before saving anything from this step (the last good "
                   f"checkpoint is kept). {self.advice}".strip())

    def check_loss(self, loss: torch.Tensor, step: int) -> None:
        value = float(loss.detach())
        if not math.isfinite(value):
            self._stop(f"the loss became {value}", step, non_finite=True)
        if self.max_loss > 0 and value > self.max_loss:
            self._stop(f"the loss exploded to {value:.4g} (> explosion threshold max_loss={self.max_loss:g})", step)

    def check_gradients(self, step: int) -> None:
        """Before ``optimizer.step()``: non-finite gradients would poison the weights."""
        for name, params in self.groups.items():
            grads = [p.grad for p in params if p.grad is not None]
            if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
                self._stop(f"the {name} gradients became non-finite (NaN/Inf)", step, non_finite=True)

    def check_parameters(self, step: int) -> None:
        """After ``optimizer.step()``: the weights must be finite and not exploded."""
        for name, params in self.groups.items():
            if not params:
                continue
            peak = float(torch.stack([p.detach().abs().max() for p in params if p.numel()]).max())
            if not math.isfinite(peak):
                self._stop(f"the {name} parameters became non-finite (NaN/Inf)", step, non_finite=True)
            if self.max_param_abs > 0 and peak > self.max_param_abs:
                self._stop(f"the {name} parameters exploded (max |w| = {peak:.4g} > explosion threshold "
                           f"max_param_abs={self.max_param_abs:g})", step)


# ---------------------------------------------------------------------------- resume
def epoch_checkpoints_newest_first(checkpoints: Path) -> List[Path]:
    def epoch_of(p: Path) -> int:
        return int(p.stem.split("_")[1])

    return sorted((p for p in existing_checkpoints(checkpoints) if p.name.startswith("epoch_")), key=epoch_of,
                  reverse=True)


def pick_resume_checkpoint(checkpoints: Path, load: Callable[[Path], Any], fallback: bool,
                           log: Callable[[str], None] = print) -> Tuple[Path, Any]:
    """(path, loaded state) to resume from. ``load`` raises ValueError / OSError (one line) for a
    file that is damaged, of another kind or of another configuration."""
    latest = checkpoints / "latest.pth"
    candidates = ([latest] if latest.is_file() else []) + epoch_checkpoints_newest_first(checkpoints)
    if not candidates:
        raise RunFolderError(f"--resume given but {checkpoints} holds no checkpoint to resume from")
    problems = []
    for i, path in enumerate(candidates):
        try:
            state = load(path)
        except (ValueError, OSError) as exc:
            problems.append(f"{path.name}: {exc}")
            log(f"[train] cannot resume from {exc}")
            if not fallback:
                raise RunFolderError(
                    f"cannot resume: {exc}. Pass --resume_fallback to resume from the newest good epoch_*.pth "
                    f"instead, or --overwrite to start over"
                ) from None
            continue
        if i > 0:
            log(f"[train] resuming from the newest good checkpoint {path} instead")
        return path, state
    raise RunFolderError(f"cannot resume: no usable checkpoint in {checkpoints} ({len(problems)} tried, all bad)")


def override_learning_rates(optimizers: Mapping[str, torch.optim.Optimizer], lr_keys: Mapping[str, Sequence[str]],
                            config: Mapping[str, Any], saved_config: Any,
                            log: Callable[[str], None] = print) -> Dict[str, float]:
    """After loading optimizer states on resume. ``lr_keys[name][i]`` is the config key of param
    group ``i`` of optimizer ``name`` (e.g. ``{"mlp": ["mlp_lr"]}``, ``{"tracker": ["lr",
    "backbone_lr"]}``). Where ``config[key]`` differs from the checkpoint run's ``saved_config[key]``
    (the user changed it), the group's lr is set to the new value; otherwise the saved optimizer's
    (possibly decayed) lr stays. Prints and returns ``{key: lr in use}``."""
    saved = saved_config if isinstance(saved_config, Mapping) else {}
    used: Dict[str, float] = {}
    notes = []
    for name, keys in lr_keys.items():
        opt = optimizers.get(name)
        if opt is None:
            continue
        for group, key in zip(opt.param_groups, keys):
            new = float(config[key])
            current = float(group["lr"])
            old = saved.get(key)
            changed = not isinstance(old, (int, float)) or not math.isclose(float(old), new, rel_tol=1e-12)
            if changed:
                group["lr"] = new
                if "initial_lr" in group:
                    group["initial_lr"] = new
                used[key] = new
                notes.append(f"{key}={new:g} (given now; the checkpoint's optimizer had {current:g})")
            else:
                used[key] = current
                tail = f", decayed from {new:g}" if not math.isclose(current, new, rel_tol=1e-12) else ""
                notes.append(f"{key}={current:g} (the checkpoint's optimizer state{tail})")
    if notes:
        log("[train] resume: learning rates " + "; ".join(notes))
    return used


def continue_history(path: Path, start_epoch: int, log: Callable[[str], None] = print) -> List[dict]:
    """Earlier epochs of ``history.json`` up to ``start_epoch`` (the checkpoint resumed from);
    records after it belong to steps that are being redone and are dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        records = json.loads(path.read_text())
        if not isinstance(records, list):
            raise ValueError("not a list of epoch records")
    except (OSError, ValueError) as exc:
        log(f"[train] {path}: unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            f"the history starts again at epoch {start_epoch + 1}")
        return []
    kept = [r for r in records if isinstance(r, dict) and isinstance(r.get("epoch"), int) and r["epoch"] <= start_epoch]
    if len(kept) < len(records):
        log(f"[train] {path}: dropped {len(records) - len(kept)} record(s) after epoch {start_epoch} (redone now)")
    return kept


__all__ = [
    "RunFolderError",
    "StepGuard",
    "continue_history",
    "epoch_checkpoints_newest_first",
    "existing_checkpoints",
    "override_learning_rates",
    "pick_resume_checkpoint",
    "prepare_run_folder",
    "remove_stale_temps",
    "write_guard",
]
