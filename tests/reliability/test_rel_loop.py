"""The shared training loop's guards with a toy task (a linear model on fixed data, our checkpoint
layout): run folder claims, NaN/Inf and explosion guards before any save, resume with changed
learning rates, fallback from a damaged latest.pth, and history / TensorBoard across resumes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fastavatar.cli import TrainingStopped
from fastavatar.config import option
from fastavatar.io.checkpoints.common import save_trained_model
from fastavatar.io.integrity import read_checkpoint
from fastavatar.train.distributed import DistEnv
from fastavatar.train.loop import TrainLoopConfig, TrainTask, open_run, run_training
from fastavatar.train.safety import RunFolderError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class ToyConfig(TrainLoopConfig):
    lr: float = option(1e-2, "learning rate")
    width: int = option(4, "model width")
    poison_at: int = option(0, "step whose loss is NaN (0: never)")


class ToyTask(TrainTask):
    name = "toy"
    lr_keys = {"toy": ["lr"]}

    def __init__(self, cfg: ToyConfig) -> None:
        torch.manual_seed(0)
        self.cfg = cfg
        self.model = torch.nn.Linear(3, cfg.width)
        self.x, self.y = torch.randn(16, 3), torch.randn(16, cfg.width)
        opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.optimizers = {"toy": opt}
        self.schedulers = {}
        self.steps = 0

    def batches(self, epoch):
        return [slice(0, 8), slice(8, 16)]

    def losses(self, batch):
        self.steps += 1
        loss = (self.model(self.x[batch]) - self.y[batch]).pow(2).mean()
        if self.cfg.poison_at and self.steps >= self.cfg.poison_at:
            loss = loss * float("nan")
        return {"total": loss}, 8

    def clip_groups(self):
        return [list(self.model.parameters())]

    def save_checkpoint(self, path: Path, epoch, global_step, record):
        from dataclasses import asdict

        save_trained_model(path, "model_dict", self.model, {"width": self.cfg.width}, "toy-v1", epoch, global_step,
                           asdict(self.cfg), self.optimizers["toy"].state_dict(), None, None)

    def load_checkpoint(self, ckpt):
        self.model.load_state_dict(ckpt["model_dict"], strict=True)
        self.optimizers["toy"].load_state_dict(ckpt["optimizer_dict"])


def _train(tmp_path: Path, **kw):
    kw = {"max_epochs": 3, "save_every": 1, **kw}
    cfg = ToyConfig(output_dir=str(tmp_path / "run"), progress=False, device="cpu", **kw)
    env = DistEnv.single(torch.device("cpu"))
    run = open_run(cfg, env)
    task = ToyTask(cfg)
    try:
        return run_training(task, cfg, run, env), task, run
    finally:
        run.close()


def test_rerun_without_resume_is_refused_and_overwrite_replaces(tmp_path):
    _train(tmp_path)
    before = (tmp_path / "run" / "checkpoints" / "latest.pth").read_bytes()
    with pytest.raises(RunFolderError, match="--resume"):
        _train(tmp_path)
    assert (tmp_path / "run" / "checkpoints" / "latest.pth").read_bytes() == before
    history, _, _ = _train(tmp_path, overwrite=True, max_epochs=1)
    assert [h["epoch"] for h in history] == [1]
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pth")["epoch"] == 1


def test_nan_stops_before_any_save_and_checkpoints_stay_finite(tmp_path):
    _train(tmp_path, max_epochs=1)
    good = (tmp_path / "run" / "checkpoints" / "latest.pth").read_bytes()
    with pytest.raises(TrainingStopped, match="loss became nan at step 4"):
        _train(tmp_path, resume=True, poison_at=2)  # the resumed run's 2nd step (global step 4) is NaN
    assert (tmp_path / "run" / "checkpoints" / "latest.pth").read_bytes() == good
    for p in (tmp_path / "run" / "checkpoints").glob("*.pth"):
        read_checkpoint(p)  # finite, stamped


def test_nan_at_the_last_step_of_an_epoch_saves_nothing(tmp_path):
    """The probe's case: the step that produced NaN ended an epoch; nothing of it may be saved."""
    with pytest.raises(TrainingStopped):
        _train(tmp_path, poison_at=2, max_epochs=1)
    assert not (tmp_path / "run" / "checkpoints" / "latest.pth").exists()


def test_learning_rate_1e9_stops_on_exploding_weights(tmp_path):
    with pytest.raises(TrainingStopped, match="exploded"):
        _train(tmp_path, lr=1e9, max_param_abs=1e4)
    assert not (tmp_path / "run" / "checkpoints" / "latest.pth").exists()


def test_resume_uses_the_new_learning_rate_and_says_so(tmp_path, capsys):
    _train(tmp_path, max_epochs=1, lr=1e-2)
    capsys.readouterr()
    _, task, _ = _train(tmp_path, resume=True, max_epochs=2, lr=1e-4)
    out = capsys.readouterr().out
    assert task.optimizers["toy"].param_groups[0]["lr"] == 1e-4
    assert "lr=0.0001 (given now; the checkpoint's optimizer had 0.01)" in out
    saved = read_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pth")
    assert saved["optimizer_dict"]["param_groups"][0]["lr"] == 1e-4


def test_history_and_tensorboard_continue_across_resumes(tmp_path):
    _train(tmp_path, max_epochs=2)
    history, _, _ = _train(tmp_path, resume=True, max_epochs=4)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert [h["epoch"] for h in json.loads((tmp_path / "run" / "history.json").read_text())] == [1, 2, 3, 4]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("epoch/train_loss")] == [1, 2, 3, 4]


@pytest.mark.parametrize("damage", ["truncated", "other_config"])
def test_damaged_latest_is_one_line_then_fallback_by_flag(tmp_path, damage, capsys):
    _train(tmp_path, max_epochs=3)
    latest = tmp_path / "run" / "checkpoints" / "latest.pth"
    if damage == "truncated":
        latest.write_bytes(latest.read_bytes()[:500])
    else:  # a checkpoint of a run with another model size
        cfg = ToyConfig(width=7)
        ToyTask(cfg).save_checkpoint(latest, 3, 6, {})
    with pytest.raises(RunFolderError) as err:
        _train(tmp_path, resume=True, max_epochs=4)
    msg = str(err.value)
    assert "latest.pth" in msg and "--resume_fallback" in msg and "\n" not in msg
    capsys.readouterr()
    history, _, _ = _train(tmp_path, resume=True, resume_fallback=True, max_epochs=4)
    out = capsys.readouterr().out
    assert "epoch_0003.pth instead" in out and "resumed from" in out
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


def test_bad_loop_flags_are_errors_naming_the_flag(tmp_path):
    for kw, flag in (({"max_epochs": 0}, "--max_epochs"), ({"save_every": 0}, "--save_every"),
                     ({"max_loss": float("nan")}, "--max_loss"), ({"resume": True, "overwrite": True}, "--overwrite")):
        with pytest.raises(ValueError, match=flag):
            _train(tmp_path, **kw)
