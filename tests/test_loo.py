"""Leave-one-out decoder training (fastavatar.apps.loo): argument checks and reuse of existing checkpoints."""

import pytest

from fastavatar.apps.loo import LooConfig, loo_checkpoint, train_loo_decoders


def test_unknown_held_out_subject_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="--held_out"):
        train_loo_decoders(LooConfig(held_out=["999"], output_dir=str(tmp_path), device="cpu"))


def test_existing_checkpoints_are_reused_not_retrained(tmp_path, data_root, capsys):
    ckpt = loo_checkpoint(str(tmp_path), "306")
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"stand-in")
    out = train_loo_decoders(LooConfig(data_root=str(data_root), held_out=["306"], output_dir=str(tmp_path),
                                       device="cpu"))
    assert out == {"306": str(ckpt)} and ckpt.read_bytes() == b"stand-in"
    assert "exists, skipped" in capsys.readouterr().out
    assert ckpt == tmp_path / "306" / "decoder_run" / "checkpoints" / "latest.pth"
