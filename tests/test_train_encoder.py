"""W-encoder training end to end on the bundled subjects with tiny face models (CPU, seconds)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

import fastavatar.train.encoder as enc_mod
from face_fixtures import build_tiny_buffalo
from fastavatar.io.checkpoints import load_checkpoint_file, load_w_encoder, save_decoder_checkpoint
from fastavatar.models.decoder import DecoderConfig, GaussianDecoder
from fastavatar.train.common import NonFiniteLossError
from fastavatar.train.encoder import EncoderTrainConfig, encoder_loss, info_nce, train_encoder


def _tiny_decoder_checkpoint(path, ids):
    n = 16
    template = {"means": torch.randn(n, 3) * 0.05, "quats": torch.tensor([1.0, 0, 0, 0]).repeat(n, 1),
                "scales": torch.full((n, 3), -5.0), "opacities": torch.zeros(n), "sh0": torch.zeros(n, 1, 3),
                "shN": torch.zeros(n, 15, 3)}
    decoder = GaussianDecoder(template, DecoderConfig(hidden_dim=8, body_layers=2, gaussians_per_round=n))
    torch.manual_seed(1)
    save_decoder_checkpoint(path, decoder, torch.randn(len(ids), 512), {s: i for i, s in enumerate(ids)}, 5, 50)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("enc")
    return {
        "buffalo": build_tiny_buffalo(folder / "buffalo_l"),
        "decoder": _tiny_decoder_checkpoint(folder / "decoder.pth", ["128", "306"]),  # 369 missing on purpose
        "cache": folder / "cache",
    }


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.one_torch_thread


def _cfg(setup, data_root, out, **kw):
    base = dict(data_root=str(data_root), decoder_load_path=str(setup["decoder"]), insightface_root=str(setup["buffalo"]),
                embedding_cache_dir=str(setup["cache"]), output_dir=str(out), device="cpu", batch_size=29,
                max_epochs=2, save_every=1, encoder_lr=1e-3, progress=False, log_every=1)
    base.update(kw)
    return EncoderTrainConfig(**base)


def test_training_runs_saves_and_resumes(setup, data_root, tmp_path):
    out = tmp_path / "run"
    # 2 subjects x 15 training views = 30 embeddings; batch 29 leaves a final batch of ONE (BN must not crash).
    with pytest.warns(UserWarning, match=r"\['369'\] are not in the decoder's W table"):
        metrics = train_encoder(_cfg(setup, data_root, out))
    assert metrics["num_train"] == 30 and metrics["num_val"] == 2
    assert metrics["subjects"] == ["128", "306"] and metrics["excluded_subjects"] == ["369"]
    assert set(metrics["val"]) == {"mse", "cosine", "total"} and math.isfinite(metrics["val"]["total"])
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["best.pth", "epoch_0001.pth", "epoch_0002.pth", "latest.pth"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["batch_size"] == 29 and saved["val_cameras"] == ["08"]
    assert any((out / "tb").iterdir())
    latest = load_checkpoint_file(out / "checkpoints" / "latest.pth")
    assert latest["epoch"] == 2 and latest["global_step"] == 4
    assert set(latest) >= {"model_dict", "optimizer_dict", "scheduler_dict", "epoch", "global_step", "config"}
    encoder = load_w_encoder(out / "checkpoints" / "latest.pth")
    assert encoder(torch.randn(2, 512)).shape == (2, 512)

    # Resume to epoch 3: continues from the saved state (step counter, weights).
    metrics3 = train_encoder(_cfg(setup, data_root, out, max_epochs=3, resume=True))
    assert metrics3["epoch"] == 3 and metrics3["global_step"] == 6
    assert (out / "checkpoints" / "epoch_0003.pth").is_file()


def test_training_reduces_validation_loss(setup, data_root, tmp_path):
    cfg = _cfg(setup, data_root, tmp_path / "fit", max_epochs=4, batch_size=8, save_every=100, encoder_lr=3e-3)
    first = train_encoder(_cfg(setup, data_root, tmp_path / "one", max_epochs=1, batch_size=8, encoder_lr=3e-3))
    last = train_encoder(cfg)
    assert last["val"]["cosine"] > first["val"]["cosine"] + 0.05


def test_nan_loss_stops_and_keeps_last_good_checkpoint(setup, data_root, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    train_encoder(_cfg(setup, data_root, out, max_epochs=1))
    good = load_checkpoint_file(out / "checkpoints" / "latest.pth")
    real = enc_mod.encoder_loss

    def poisoned(*args, **kwargs):
        losses = real(*args, **kwargs)
        losses["total"] = losses["total"] * float("nan")
        return losses

    monkeypatch.setattr(enc_mod, "encoder_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="became nan"):
        train_encoder(_cfg(setup, data_root, out, max_epochs=3, resume=True))
    after = load_checkpoint_file(out / "checkpoints" / "latest.pth")
    assert after["epoch"] == good["epoch"] == 1
    for k, v in good["model_dict"].items():
        assert torch.equal(v, after["model_dict"][k])


def test_no_known_subject_is_a_clear_error(setup, data_root, tmp_path):
    decoder = _tiny_decoder_checkpoint(tmp_path / "other.pth", ["999"])
    with pytest.raises(ValueError, match="none of the subjects"):
        train_encoder(_cfg(setup, data_root, tmp_path / "x", decoder_load_path=str(decoder)))


def test_cache_inside_data_folder_refused(setup, data_root, tmp_path):
    with pytest.raises(ValueError, match="inside the data folder"):
        train_encoder(_cfg(setup, data_root, tmp_path / "x", embedding_cache_dir=str(data_root / "cache")))
    assert not (data_root / "cache").exists()


def test_losses():
    pred = torch.randn(6, 512)
    target = pred.clone()
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    cfg = EncoderTrainConfig(contrastive_weight=0.5)
    out = encoder_loss(pred, target, labels, cfg)
    assert float(out["mse"]) == 0.0 and float(out["cosine"]) == pytest.approx(1.0)
    assert float(out["total"]) == pytest.approx(0.5 * float(out["contrastive"]), rel=1e-5)
    # Perfectly clustered predictions give a lower InfoNCE than shuffled labels.
    centers = torch.randn(3, 512)
    clustered = centers[labels] + 0.01 * torch.randn(6, 512)
    assert info_nce(clustered, labels, 0.07) < info_nce(clustered, torch.tensor([0, 1, 2, 0, 1, 2]), 0.07)
    assert float(info_nce(pred, torch.arange(6), 0.07)) == 0.0  # no positives


def test_yaml_config_and_script_entry_point(setup, data_root, tmp_path, repo_root):
    import importlib.util

    from fastavatar.config import parse_config

    variant = tmp_path / "encoder_variant.yaml"
    variant.write_text("batch_size: 7\nmse_weight: 0.2\n")  # a variant lists only what it changes
    cfg = parse_config(EncoderTrainConfig, ["--config", str(variant)])
    assert cfg.batch_size == 7 and cfg.mse_weight == 0.2 and cfg.cosine_weight == 1.0 and cfg.max_epochs == 400
    spec = importlib.util.spec_from_file_location("train_encoder_script", repo_root / "scripts" / "train_encoder.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "cli"
    argv = ["--config", str(variant), "--data_root", str(data_root),
            "--decoder_load_path", str(setup["decoder"]), "--insightface_root", str(setup["buffalo"]),
            "--embedding_cache_dir", str(setup["cache"]), "--output_dir", str(out), "--device", "cpu",
            "--max_epochs", "1", "--batch_size", "16", "--no-progress"]
    with pytest.warns(UserWarning):
        assert script.main(argv) == 0
    assert (out / "checkpoints" / "latest.pth").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["batch_size"] == 16
    bad = argv[:]
    bad[bad.index("--insightface_root") + 1] = str(tmp_path / "nowhere")
    assert script.main(bad + ["--output_dir", str(tmp_path / "cli2")]) == 1
    assert not (tmp_path / "cli2").exists()  # fails before creating the run folder
