"""Tracker training end to end on the bundled subjects with a tiny ViT (CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastavatar.io.checkpoints import load_checkpoint_file, load_tracker
from fastavatar.train.common import NonFiniteLossError
from fastavatar.train.tracker import TrackerTrainConfig, build_tracker, train_tracker


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.one_torch_thread


_PARSERS = {}


@pytest.fixture(autouse=True)
def _shared_parsers(monkeypatch):
    """Parse each bundled subject once for this module (COLMAP reading dominates tiny runs)."""
    import fastavatar.data as data_mod

    real = data_mod.SubjectParser

    def cached(subject_dir, image_scale=1.0, **kw):
        key = (str(subject_dir), float(image_scale), tuple(sorted(kw.items())))
        if key not in _PARSERS:
            _PARSERS[key] = real(subject_dir, image_scale=image_scale, **kw)
        return _PARSERS[key]

    monkeypatch.setattr(data_mod, "SubjectParser", cached)


def _cfg(data_root, out, **kw):
    base = dict(data_root=str(data_root), output_dir=str(out), device="cpu", random_backbone=True,
                vit_embed_dim=32, vit_depth=2, vit_num_heads=2, vit_img_size=224, hidden_dim=32,
                image_scale=0.25, batch_size=8, max_epochs=2, save_every=1, lr=1e-3, progress=False,
                val_subjects=["369"], log_every=1)
    base.update(kw)
    return TrackerTrainConfig(**base)


def test_training_checkpoints_sidecars_and_resume(data_root, tmp_path):
    out = tmp_path / "run"
    metrics = train_tracker(_cfg(data_root, out))
    assert metrics["train_subjects"] == ["128", "306"] and metrics["val_subjects"] == ["369"]
    val = metrics["val"]
    assert {"point_error_m", "rotation_error_deg", "translation_error_m", "loss_total"} <= set(val)
    assert all(math.isfinite(v) for v in val.values())
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["epoch_0001.pth", "epoch_0002.pth", "latest.pth"]
    ckpt = load_checkpoint_file(out / "checkpoints" / "latest.pth")
    keys = list(ckpt["model_state_dict"])
    assert all(k.startswith("encoder.") for k in keys) and "encoder.points_projector.11.weight" in keys
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 8  # 32 train views / 8 per step x 2 epochs
    # The released sidecars sit at checkpoint/../.. = the run folder.
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["max_points"] == 10144 and len(meta["mean_shape"]) == 10144
    assert json.loads((out / "args.json").read_text())["hidden_dim"] == 32
    tracker = load_tracker(out / "checkpoints" / "latest.pth")
    pred = tracker(torch.zeros(1, 3, 224, 224))
    assert pred["points"].shape == (1, 10144, 3) and pred["camera_pose"].shape == (1, 4, 4)
    assert any((out / "tb").iterdir()) and (out / "config.yaml").is_file()

    again = train_tracker(_cfg(data_root, out, max_epochs=3, resume=True))
    assert again["epoch"] == 3 and again["global_step"] == 12
    # It learns: training loss and held-out point error fall from epoch 1 to epoch 3.
    first = load_checkpoint_file(out / "checkpoints" / "epoch_0001.pth")["extra"]
    third = load_checkpoint_file(out / "checkpoints" / "epoch_0003.pth")["extra"]
    assert third["train_loss"] < first["train_loss"]
    assert third["val"]["point_error_m"] < first["val"]["point_error_m"]


def test_frozen_backbone_stays_fixed_and_unfrozen_moves(data_root, tmp_path):
    def backbone_after(freeze: bool, out):
        torch.manual_seed(0)
        train_tracker(_cfg(data_root, out, freeze_backbone=freeze, max_epochs=1, max_subjects=2,
                           val_subjects=["306"], backbone_lr=1e-2))
        state = load_checkpoint_file(out / "checkpoints" / "latest.pth")["model_state_dict"]
        return {k: v for k, v in state.items() if k.startswith("encoder.dino.")}

    torch.manual_seed(42)
    initial = build_tracker(_cfg(data_root, tmp_path / "x")).state_dict()
    frozen = backbone_after(True, tmp_path / "frozen")
    assert all(torch.equal(v, initial[k]) for k, v in frozen.items())
    moved = backbone_after(False, tmp_path / "moved")
    assert any(not torch.equal(v, initial[k]) for k, v in moved.items())


def test_missing_backbone_weights_is_a_clear_error(data_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dinov2_vitb14_pretrain.pth.*--random_backbone"):
        train_tracker(_cfg(data_root, tmp_path / "r", random_backbone=False,
                           backbone_weights=str(tmp_path / "dinov2_vitb14_pretrain.pth")))
    assert not (tmp_path / "r").exists()


def test_backbone_weights_are_loaded(data_root, tmp_path):
    torch.manual_seed(3)
    donor = build_tracker(_cfg(data_root, tmp_path / "d"))
    path = tmp_path / "dinov2_tiny.pth"
    torch.save({k: v.clone() for k, v in donor.backbone.state_dict().items()}, path)
    tracker = build_tracker(_cfg(data_root, tmp_path / "e", random_backbone=False, backbone_weights=str(path)))
    for k, v in donor.backbone.state_dict().items():
        assert torch.equal(v, tracker.backbone.state_dict()[k])


def test_nan_loss_stops_and_keeps_checkpoint(data_root, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    train_tracker(_cfg(data_root, out, max_epochs=1, max_subjects=2, val_subjects=["306"]))
    before = load_checkpoint_file(out / "checkpoints" / "latest.pth")
    import fastavatar.losses as mt

    original = mt.tracker_loss

    def poisoned(*a, **k):
        out_ = original(*a, **k)
        out_["total"] = out_["total"] * float("nan")
        return out_

    monkeypatch.setattr(mt, "tracker_loss", poisoned)
    with pytest.raises(NonFiniteLossError):
        train_tracker(_cfg(data_root, out, max_epochs=2, resume=True, max_subjects=2, val_subjects=["306"]))
    after = load_checkpoint_file(out / "checkpoints" / "latest.pth")
    assert after["epoch"] == before["epoch"] == 1
    for k, v in before["model_state_dict"].items():
        assert torch.equal(v, after["model_state_dict"][k])


def test_yaml_config_l1_loss_and_script_entry_point(data_root, tmp_path, repo_root, capsys):
    import importlib.util

    from fastavatar.config import parse_config

    (tmp_path / "tracker_variant.yaml").write_text("hidden_dim: 512\n")
    cfg = parse_config(TrackerTrainConfig, ["--config", str(tmp_path / "tracker_variant.yaml")])
    assert cfg.freeze_backbone is True and cfg.hidden_dim == 512 and cfg.points_loss == "l2"
    spec = importlib.util.spec_from_file_location("train_tracker_script", repo_root / "scripts" / "train_tracker.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "cli"
    argv = ["--data_root", str(data_root), "--output_dir", str(out), "--device", "cpu", "--random_backbone",
            "--vit_embed_dim", "32", "--vit_depth", "1", "--vit_num_heads", "2", "--vit_img_size", "224",
            "--hidden_dim", "16", "--image_scale", "0.25", "--max_epochs", "1", "--max_subjects", "2",
            "--val_subjects", "306", "--points_loss", "l1", "--no-progress"]
    assert script.main(argv) == 0
    saved = load_checkpoint_file(out / "checkpoints" / "latest.pth")
    assert saved["config"]["points_loss"] == "l1" and math.isfinite(saved["extra"]["train_loss"])
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv[:-3] + ["--points_loss", "l3", "--no-progress"])
    assert exit_info.value.code == 2 and "invalid choice: 'l3'" in capsys.readouterr().err
    no_weights = [a for a in argv if a != "--random_backbone"] + ["--backbone_weights", str(tmp_path / "x.pth")]
    assert script.main(no_weights) == 1
