"""Checkpoint I/O: released layouts (incl. pickled configs), our format, clear errors."""

import json
import os
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch

from fastavatar.io.checkpoints import (
    DECODER_FORMAT,
    StandInObject,
    checkpoint_config,
    detect_checkpoint_kind,
    load_checkpoint_file,
    load_decoder,
    load_tracker,
    load_w_encoder,
    make_w_ids_to_idx,
    rows_to_subject_ids,
    save_decoder_checkpoint,
    save_tracker_checkpoint,
    save_w_encoder_checkpoint,
    subject_ids_to_rows,
)
from fastavatar.models.decoder import DecoderConfig, GaussianDecoder
from fastavatar.models.tracker import DinoTracker
from fastavatar.models.vit import DinoVisionTransformer, ViTConfig
from fastavatar.models.w_encoder import WEncoder
from official_layout import TINY_VIT, random_decoder_state, random_state, random_template, tiny_tracker_config

N = 32


def _throwaway_config(tmp_path, monkeypatch, name="throwaway_cfg_mod"):
    """An instance of a dataclass from a module that is deleted before loading."""
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    (mod_dir / f"{name}.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass, field
        from pathlib import Path

        @dataclass
        class TrainingConfig:
            data_dir: Path = Path("/scratch/data")
            mlp_lr: float = 1e-4
            max_epochs: int = 801
            resolutions: tuple = (802, 550)
    """))
    monkeypatch.syspath_prepend(str(mod_dir))
    mod = __import__(name)
    cfg = mod.TrainingConfig(mlp_lr=3e-4)
    return cfg, name


def _forget_module(name):
    sys.modules.pop(name, None)
    import importlib

    importlib.invalidate_caches()


def _official_decoder_file(path, cfg):
    sd = random_decoder_state(N, seed=11)
    torch.save(
        {
            "model_dict": sd,
            "w_vectors": torch.nn.Parameter(torch.randn(3, 512)),
            "w_ids_to_idx": {"017": 0, "306": 1, "369": 2},
            "epoch": 5,
            "global_step": 1234,
            "config": cfg,
        },
        path,
    )
    return sd


def test_official_decoder_with_pickled_config_from_deleted_module(tmp_path, monkeypatch):
    cfg, modname = _throwaway_config(tmp_path, monkeypatch)
    path = tmp_path / "decoder_neutral_flame.pth"
    sd = _official_decoder_file(path, cfg)
    monkeypatch.undo()  # drop the module folder from sys.path
    (tmp_path / "mods" / f"{modname}.py").unlink()
    _forget_module(modname)
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)  # the released format needs more than torch's allowlist
    ckpt = load_checkpoint_file(path)
    assert isinstance(ckpt["config"], StandInObject)  # data, not the class
    plain = checkpoint_config(ckpt)
    assert plain["mlp_lr"] == 3e-4 and plain["max_epochs"] == 801 and plain["data_dir"] == "/scratch/data"
    decoder, w, ids = load_decoder(path)
    assert not decoder.training
    assert w.shape == (3, 512) and not w.requires_grad
    assert ids == {"017": 0, "306": 1, "369": 2}
    for k, v in sd.items():
        assert torch.equal(decoder.state_dict()[k], v), k


def test_official_file_with_main_module_config_loads(tmp_path, monkeypatch):
    @dataclass
    class TrainingConfig:
        lr: float = 0.5

    TrainingConfig.__module__ = "__main__"
    TrainingConfig.__qualname__ = "TrainingConfig"
    main = sys.modules["__main__"]
    monkeypatch.setattr(main, "TrainingConfig", TrainingConfig, raising=False)
    path = tmp_path / "latest.pth"
    _official_decoder_file(path, TrainingConfig())
    monkeypatch.undo()
    assert not hasattr(main, "TrainingConfig")
    ckpt = load_checkpoint_file(path)
    assert checkpoint_config(ckpt) == {"lr": 0.5}
    assert load_decoder(path)[0].num_gaussians == N


def test_official_encoder_full_and_slim_files(tmp_path, monkeypatch):
    cfg, modname = _throwaway_config(tmp_path, monkeypatch, "throwaway_enc_cfg")
    sd = random_state("encoder", seed=5)
    enc = WEncoder()
    opt = torch.optim.Adam(enc.parameters())
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    full = tmp_path / "encoder_neutral_flame.pth"
    torch.save({"model_dict": sd, "optimizer_dict": opt.state_dict(), "scheduler_dict": sched.state_dict(),
                "epoch": 3, "global_step": 99, "config": cfg}, full)
    slim = tmp_path / "encoder_model_epoch_0003.pth"
    torch.save({"model_dict": sd}, slim)
    monkeypatch.undo()
    _forget_module(modname)
    x = torch.randn(2, 512)
    outs = []
    for p in (full, slim):
        model = load_w_encoder(p)
        assert not model.training
        for k, v in sd.items():
            assert torch.equal(model.state_dict()[k], v), k
        outs.append(model(x))
    torch.testing.assert_close(outs[0], outs[1])


def test_official_tracker_with_sidecars(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    path = run / "checkpoints" / "dino_encoder.pth"
    sd = random_state("dino", n=N, tiny_vit=True, seed=2)
    torch.save({"model_state_dict": sd, "epoch": 1}, path)
    mean_shape = torch.randn(N, 3)
    (run / "metadata.json").write_text(json.dumps({"max_points": N, "dino_model": "dinov2_vitb14",
                                                   "use_rotation_6d": True, "predict_point_residuals": True,
                                                   "mean_shape": mean_shape.tolist()}))
    (run / "args.json").write_text(json.dumps({"hidden_dim": 48, "num_layers": 3}))
    tr = load_tracker(path)
    assert not tr.training
    assert tr.config.max_points == N and tr.config.vit.embed_dim == TINY_VIT["embed_dim"]
    torch.testing.assert_close(tr.encoder.mean_shape, mean_shape)  # sidecar overrides the buffer
    for k, v in sd.items():
        if k != "encoder.mean_shape":
            assert torch.equal(tr.state_dict()[k], v), k
    no_side = load_tracker(path, use_sidecars=False)
    assert torch.equal(no_side.encoder.mean_shape, sd["encoder.mean_shape"])
    with torch.no_grad():
        assert tr(torch.randn(1, 3, 224, 224))["points"].shape == (1, N, 3)


def test_decoder_round_trip_our_format(tmp_path):
    dec = GaussianDecoder(random_template(N), DecoderConfig(init="zero_out", seed=3))
    with torch.no_grad():
        for p in dec.conditioning_mlp.parameters():
            p.normal_(std=0.05)
    w = torch.randn(2, 512, requires_grad=True)
    opt = torch.optim.Adam(dec.mlp_parameters())
    dec(w)["scales"].sum().backward()
    opt.step()
    path = tmp_path / "ckpts" / "latest.pth"
    save_decoder_checkpoint(path, dec, w, {"306": 1, "17": 0}, epoch=2, global_step=40,
                            config={"lr": 1e-4, "data": tmp_path, "sizes": (1, 2)},
                            optimizer_states={"mlp": opt.state_dict()}, extra={"note": "x", "ema": torch.ones(3)})
    assert [p.name for p in path.parent.iterdir()] == ["latest.pth"]  # atomic: no temp files left
    raw = torch.load(path, weights_only=True)  # no pickled classes
    assert raw["format"] == DECODER_FORMAT
    assert {"model_dict", "w_vectors", "w_ids_to_idx", "epoch", "global_step", "config"} <= set(raw)
    assert raw["config"] == {"lr": 1e-4, "data": str(tmp_path), "sizes": [1, 2]}
    assert raw["w_ids_to_idx"] == {"306": 1, "017": 0}
    assert "state" in raw["optimizer_states"]["mlp"]
    assert raw["extra"]["note"] == "x" and torch.equal(raw["extra"]["ema"], torch.ones(3))
    dec2, w2, ids = load_decoder(path)
    assert dec2.config.init == "zero_out" and dec2.config.seed == 3
    torch.testing.assert_close(w2, w.detach())
    with torch.no_grad():
        torch.testing.assert_close(dec2(w2)["scales"], dec(w)["scales"])
    with pytest.raises(TypeError, match="config entry 'obj'"):
        save_decoder_checkpoint(tmp_path / "bad.pth", dec, w, None, 0, 0, config={"obj": object()})
    with pytest.raises(ValueError, match="w_vectors"):
        save_decoder_checkpoint(tmp_path / "bad.pth", dec, torch.zeros(2, 7), None, 0, 0)


def test_encoder_and_tracker_round_trip_our_format(tmp_path):
    enc = WEncoder.from_state_dict(random_state("encoder", seed=1))
    opt = torch.optim.Adam(enc.parameters())
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=10)
    enc(torch.randn(4, 512)).sum().backward()
    opt.step()
    sched.step(1.0)
    save_w_encoder_checkpoint(tmp_path / "enc.pth", enc, 1, 2, config={"a": 1},
                              optimizer_dict=opt.state_dict(), scheduler_dict=sched.state_dict())
    raw = torch.load(tmp_path / "enc.pth", weights_only=True)  # optimizer/scheduler states are plain data
    assert {"model_dict", "optimizer_dict", "scheduler_dict", "epoch", "global_step", "config"} <= set(raw)
    opt2 = torch.optim.Adam(WEncoder().parameters())
    opt2.load_state_dict(raw["optimizer_dict"])
    assert raw["scheduler_dict"]["factor"] == 0.5
    enc2 = load_w_encoder(tmp_path / "enc.pth")
    x = torch.randn(3, 512)
    torch.testing.assert_close(enc2(x), enc.eval()(x))

    tr = DinoTracker(tiny_tracker_config(N))
    tr.load_state_dict(random_state("dino", n=N, tiny_vit=True, seed=4))
    save_tracker_checkpoint(tmp_path / "t.pth", tr, 0, 0, config={})
    raw = torch.load(tmp_path / "t.pth", weights_only=True)
    assert "model_state_dict" in raw and raw["model_config"]["vit"]["num_heads"] == TINY_VIT["num_heads"]
    tr2 = load_tracker(tmp_path / "t.pth")
    assert tr2.config.vit.num_heads == TINY_VIT["num_heads"]  # from model_config, not guessed
    img = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(tr2(img)["points"], tr.eval()(img)["points"])


def test_wrong_kind_and_wrong_shapes_give_clear_errors(tmp_path):
    enc_path = tmp_path / "encoder.pth"
    torch.save({"model_dict": random_state("encoder")}, enc_path)
    dec_path = tmp_path / "decoder.pth"
    torch.save({"model_dict": random_decoder_state(N)}, dec_path)
    with pytest.raises(ValueError, match=r"encoder\.pth.*not a decoder.*W-encoder.*missing keys \[base_rotations"):
        load_decoder(enc_path)
    with pytest.raises(ValueError, match=r"decoder\.pth.*not a DINO tracker.*no 'model_state_dict'"):
        load_tracker(dec_path)
    with pytest.raises(ValueError, match=r"decoder\.pth.*not a W-encoder.*looks like a decoder"):
        load_w_encoder(dec_path)
    # internally inconsistent decoder: one key missing, one shape wrong
    sd = random_decoder_state(N)
    del sd["base_shN"]
    sd["conditioning_mlp.scale_head.0.bias"] = torch.zeros(7)
    torch.save({"model_dict": sd}, tmp_path / "broken.pth")
    with pytest.raises(ValueError) as e:
        load_decoder(tmp_path / "broken.pth")
    msg = str(e.value)
    assert "broken.pth" in msg and "missing keys [base_shN]" in msg
    assert "conditioning_mlp.scale_head.0.bias: file [7] vs model [256]" in msg
    assert "\n" not in msg
    # encoder with a wrong BN size
    sd = random_state("encoder")
    sd["projector.5.running_var"] = torch.ones(5)
    torch.save({"model_dict": sd}, tmp_path / "enc_bad.pth")
    with pytest.raises(ValueError, match=r"projector\.5\.running_var: file \[5\] vs model \[768\]"):
        load_w_encoder(tmp_path / "enc_bad.pth")


def test_missing_and_corrupt_files(tmp_path):
    for loader in (load_decoder, load_w_encoder, load_tracker, load_checkpoint_file):
        with pytest.raises(FileNotFoundError, match=r"nope\.pth.*pretrained_weights/README\.md"):
            loader(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="junk.pth"):
        load_decoder(tmp_path / "junk.pth")


class _Sneaky:
    def __reduce__(self):
        return (os.getcwd, ())


def test_callables_in_a_checkpoint_load_as_inert_stand_ins(tmp_path):
    torch.save({"model_dict": {}, "x": _Sneaky()}, tmp_path / "evil.pth")
    ckpt = load_checkpoint_file(tmp_path / "evil.pth")
    assert isinstance(ckpt["x"], StandInObject) and ckpt["x"].name == "getcwd"  # recorded, never called
    with pytest.raises(ValueError, match="evil.pth"):
        load_decoder(tmp_path / "evil.pth")


def test_backbone_only_file(tmp_path):
    bb = DinoVisionTransformer(ViTConfig(**TINY_VIT))
    torch.save(bb.state_dict(), tmp_path / "dinov2_vitb14_pretrain.pth")
    ckpt = load_checkpoint_file(tmp_path / "dinov2_vitb14_pretrain.pth")
    assert detect_checkpoint_kind(ckpt) == "dinov2_backbone"
    with pytest.raises(ValueError, match="bare DINOv2 backbone"):
        load_tracker(tmp_path / "dinov2_vitb14_pretrain.pth")
    tr = load_tracker(tmp_path / "dinov2_vitb14_pretrain.pth", backbone_only_ok=True, config=tiny_tracker_config(N))
    assert torch.equal(tr.backbone.pos_embed, bb.pos_embed)


def test_subject_id_helpers():
    table = make_w_ids_to_idx(["306", 17, "128", "017"])
    assert table == {"017": 0, "128": 1, "306": 2}
    assert subject_ids_to_rows(table, ["306", 17]).tolist() == [2, 0]
    assert rows_to_subject_ids(table) == ["017", "128", "306"]
    with pytest.raises(ValueError, match="999"):
        subject_ids_to_rows(table, ["999"])
