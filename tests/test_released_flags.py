"""The released FastAvatar's command-line flags are accepted with their meaning (none silently ignored)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fastavatar.config import option, parse_config
from fastavatar.render.released_flags import check_render_flags, gsplat_only_kwargs
from fastavatar.train.decoder import DecoderTrainConfig


def test_save_path_is_the_output_dir_everywhere():
    from fastavatar.inference.guided import GuidedConfig
    from fastavatar.train.encoder import EncoderTrainConfig
    from fastavatar.train.tracker import TrackerTrainConfig

    for cls in (DecoderTrainConfig, EncoderTrainConfig, TrackerTrainConfig, GuidedConfig):
        assert parse_config(cls, ["--save_path", "somewhere/run"]).output_dir == "somewhere/run", cls.__name__
        assert parse_config(cls, ["--output_dir", "other"]).output_dir == "other"


def test_near_far_planes_reach_the_renderer_config():
    cfg = parse_config(DecoderTrainConfig, ["--near_plane", "0.2", "--far_plane", "50", "--antialiased",
                                            "--num_workers", "3", "--model_save_steps", "50", "100"])
    assert (cfg.near, cfg.far, cfg.antialiased, cfg.num_workers) == (0.2, 50.0, True, 3)
    assert cfg.model_save_steps == [50, 100]


def test_camera_model_other_than_pinhole_is_a_clear_error():
    assert parse_config(DecoderTrainConfig, ["--camera_model", "pinhole"]).camera_model == "pinhole"
    with pytest.raises(ValueError, match="--camera_model fisheye: only pinhole"):
        parse_config(DecoderTrainConfig, ["--camera_model", "fisheye"])


def test_sparse_grad_needs_packed():
    with pytest.raises(ValueError, match="--sparse_grad needs --packed"):
        parse_config(DecoderTrainConfig, ["--sparse_grad"])
    cfg = parse_config(DecoderTrainConfig, ["--packed", "--sparse_grad"])
    check_render_flags(cfg)  # valid together


def test_gsplat_only_flags_say_they_do_not_apply_on_cpu(capsys):
    cfg = parse_config(DecoderTrainConfig, ["--packed", "--sparse_grad", "--render_backend", "torch"])
    assert gsplat_only_kwargs(cfg, "cpu") == {}
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "--packed --sparse_grad" in out and "torch backend does not use them" in out
    assert gsplat_only_kwargs(parse_config(DecoderTrainConfig, []), "cpu") == {}  # unset: nothing said


def test_decoder_renders_with_the_antialiased_flag(monkeypatch):
    """--antialiased and the planes are passed to render_splats by the decoder trainer."""
    import fastavatar.render as render
    import fastavatar.train.decoder as trainer

    seen = {}

    def spy(splats, c2w, K, w, h, **kw):
        seen.update(kw)
        raise StopIteration

    import fastavatar.models.decoder as decoder_mod

    monkeypatch.setattr(render, "render_splats", spy)
    monkeypatch.setattr(decoder_mod, "splats_from_output", lambda one, points: [one])
    cfg = parse_config(DecoderTrainConfig, ["--antialiased", "--near_plane", "0.3", "--far_plane", "9",
                                            "--render_backend", "torch"])
    n = 4
    out = {"means": torch.zeros(1, n, 3), "quats": torch.tensor([[1.0, 0, 0, 0]]).repeat(1, n, 1),
           "scales": torch.zeros(1, n, 3), "opacities": torch.zeros(1, n), "sh0": torch.zeros(1, n, 1, 3),
           "shN": torch.zeros(1, n, 15, 3)}
    item = {"points": torch.zeros(n, 3), "c2w": torch.eye(4), "K": torch.eye(3), "image": torch.zeros(2, 2, 3)}
    with pytest.raises(StopIteration):
        trainer._render_items(out, [0], [item], cfg, 2, 2, torch.device("cpu"))
    assert seen["antialiased"] is True and seen["near_plane"] == 0.3 and seen["far_plane"] == 9.0


def test_model_save_steps_add_numbered_checkpoints(tmp_path):
    from fastavatar.io.checkpoints.common import save_trained_model
    from fastavatar.train.distributed import DistEnv
    from fastavatar.train.loop import TrainLoopConfig, TrainTask, open_run, run_training

    @dataclass
    class Cfg(TrainLoopConfig):
        lr: float = option(1e-2, "learning rate")

    class Task(TrainTask):
        name = "toy"

        def __init__(self):
            torch.manual_seed(0)
            self.model = torch.nn.Linear(2, 2)
            self.x = torch.randn(4, 2)
            self.optimizers = {"toy": torch.optim.SGD(self.model.parameters(), lr=1e-2)}
            self.schedulers = {}

        def batches(self, epoch):
            return [0]

        def losses(self, batch):
            return {"total": self.model(self.x).pow(2).mean()}, 4

        def clip_groups(self):
            return [list(self.model.parameters())]

        def save_checkpoint(self, path: Path, epoch, global_step, record):
            save_trained_model(path, "model_dict", self.model, {}, "toy-v1", epoch, global_step, {},
                               self.optimizers["toy"].state_dict(), None, None)

    cfg = Cfg(output_dir=str(tmp_path / "run"), progress=False, device="cpu", max_epochs=5, save_every=10,
              model_save_steps=[2, 3])
    env = DistEnv.single("cpu")
    run = open_run(cfg, env)
    try:
        run_training(Task(), cfg, run, env)
    finally:
        run.close()
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("epoch_*.pth"))
    assert names == ["epoch_0002.pth", "epoch_0003.pth", "epoch_0005.pth"]  # the listed epochs and the last


def test_encoder_num_workers_is_said_not_used(tmp_path, capsys):
    from fastavatar.train.encoder import EncoderTrainConfig, train_encoder

    cfg = parse_config(EncoderTrainConfig, ["--num_workers", "4", "--decoder_load_path", str(tmp_path / "absent.pth"),
                                            "--device", "cpu", "--output_dir", str(tmp_path / "run")])
    with pytest.raises(Exception):
        train_encoder(cfg)  # stops at the missing decoder, after saying what --num_workers does
    assert "--num_workers 4: not used" in capsys.readouterr().out
