"""Every loader function, fed every bad checkpoint kind: a one-line error naming the file, and a
malicious pickle runs nothing. (The feed-forward script checks its face models before it loads
checkpoints, so its three checkpoint flags are covered here, at the loaders they call.)"""

from __future__ import annotations

import pytest

from rel_fixtures import BAD_CHECKPOINT_KINDS, make_bad_checkpoint, save_tiny_decoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _loaders():
    from fastavatar.io.checkpoints import load_decoder, load_tracker, load_w_encoder
    from fastavatar.io.checkpoints.common import load_checkpoint_file

    return {"load_decoder": load_decoder, "load_w_encoder": load_w_encoder, "load_tracker": load_tracker,
            "load_checkpoint_file": load_checkpoint_file}


@pytest.fixture(scope="module")
def good_decoder(tmp_path_factory):
    return save_tiny_decoder(tmp_path_factory.mktemp("dec") / "decoder.pth")


@pytest.mark.parametrize("kind", BAD_CHECKPOINT_KINDS)
@pytest.mark.parametrize("loader", ["load_decoder", "load_w_encoder", "load_tracker"])
def test_model_loaders_refuse_bad_checkpoints(tmp_path, good_decoder, loader, kind):
    marker = tmp_path / "RAN"
    bad = make_bad_checkpoint(kind, tmp_path / f"{kind}.pth", good_decoder, marker)
    with pytest.raises(ValueError) as err:
        _loaders()[loader](bad)
    msg = str(err.value)
    assert str(bad) in msg and "\n" not in msg, msg
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["payload", "truncated", "text", "bitflip", "nan"])
def test_backbone_weights_refuse_bad_files(tmp_path, good_decoder, kind):
    from fastavatar.io.checkpoints.tracker import load_backbone_weights
    from fastavatar.models.vit import DinoVisionTransformer, ViTConfig

    marker = tmp_path / "RAN"
    bad = make_bad_checkpoint(kind, tmp_path / "dinov2_vitb14_pretrain.pth", good_decoder, marker)
    backbone = DinoVisionTransformer(ViTConfig(img_size=14, embed_dim=8, depth=1, num_heads=1))
    with pytest.raises(ValueError) as err:
        load_backbone_weights(backbone, bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_lpips_trunk_is_read_safely(tmp_path, good_decoder, monkeypatch):
    """A hostile file where the LPIPS trunk should be runs nothing and is a one-line error."""
    import torch.hub

    import fastavatar.losses as losses

    pytest.importorskip("lpips")  # an optional dependency: without it there is no trunk to load
    marker = tmp_path / "RAN"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(losses, "_LPIPS_CACHE", {})
    trunk = losses.lpips_trunk_path("alex")
    bad = make_bad_checkpoint("payload", trunk, good_decoder, marker)
    with pytest.raises(ValueError) as err:
        losses.load_lpips("alex", "cpu", required=True)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()
