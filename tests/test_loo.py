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


def test_a_decoder_of_another_setup_is_not_reused(tmp_path, data_root):
    """A leave-one-out decoder trained for other epochs than the demo setup's is refused in one line
    (its scores would not be this setup's), not silently reused."""
    from fastavatar.apps.demo import DemoConfig

    ckpt = loo_checkpoint(str(tmp_path), "306")
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"stand-in")
    stale = DemoConfig().decoder_epochs // 3
    (ckpt.parent.parent / "config.yaml").write_text(f"max_epochs: {stale}\n")
    with pytest.raises(ValueError, match=f"trained for {stale} epochs.*--no-skip_existing"):
        train_loo_decoders(LooConfig(data_root=str(data_root), held_out=["306"], output_dir=str(tmp_path),
                                     device="cpu"))
    assert ckpt.read_bytes() == b"stand-in"
