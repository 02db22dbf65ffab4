"""Checkpoint integrity: truncated, empty, text, bit-flipped, NaN/Inf and tampered files are one-line
errors naming the file; files we stamp verify; released (unstamped) files still load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastavatar.io import integrity as I
from rel_fixtures import member_data_offset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ckpt() -> dict:
    lin = torch.nn.Linear(8, 16)
    opt = torch.optim.Adam(lin.parameters())
    lin(torch.randn(3, 8)).sum().backward()
    opt.step()
    return {"model_dict": lin.state_dict(), "optimizer_dict": opt.state_dict(), "epoch": 2, "config": {"lr": 1e-3}}


def _save(tmp_path: Path, obj=None, name="latest.pth", stamped=True) -> Path:
    obj = obj if obj is not None else _ckpt()
    if stamped:
        I.stamp(obj)
    path = tmp_path / name
    torch.save(obj, path)
    return path


def _one_line_naming(exc: BaseException, path: Path) -> str:
    msg = str(exc)
    assert str(path) in msg, msg
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


def test_good_stamped_checkpoint_loads_and_verifies(tmp_path):
    obj = _ckpt()
    path = _save(tmp_path, obj)
    loaded = I.read_checkpoint(path)
    assert I.verify_stamp(loaded, path) is True
    assert loaded["integrity"]["format_version"] == I.FORMAT_VERSION
    assert loaded["integrity"]["num_tensors"] == 8  # weight, bias + per parameter Adam step, exp_avg, exp_avg_sq
    assert torch.equal(loaded["model_dict"]["weight"], obj["model_dict"]["weight"])


def test_unstamped_released_file_loads(tmp_path):
    path = _save(tmp_path, stamped=False)
    loaded = I.read_checkpoint(path)
    assert "integrity" not in loaded and I.verify_stamp(loaded, path) is False


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.999])
def test_truncated(tmp_path, fraction):
    path = _save(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * fraction)])
    with pytest.raises(I.CheckpointError) as err:
        I.read_checkpoint(path)
    assert "truncated" in _one_line_naming(err.value, path)


def test_empty(tmp_path):
    path = tmp_path / "latest.pth"
    path.write_bytes(b"")
    with pytest.raises(I.CheckpointError) as err:
        I.read_checkpoint(path)
    assert "empty" in _one_line_naming(err.value, path)


def test_text_file(tmp_path):
    path = tmp_path / "latest.pth"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
    with pytest.raises(I.CheckpointError) as err:
        I.read_checkpoint(path)
    assert "text file" in _one_line_naming(err.value, path)


def test_random_binary(tmp_path):
    path = tmp_path / "latest.pth"
    path.write_bytes(bytes(range(7, 256)) * 3)
    with pytest.raises(I.CheckpointError) as err:
        I.read_checkpoint(path)
    assert "not a torch checkpoint" in _one_line_naming(err.value, path)


def test_missing_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        I.read_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(I.CheckpointError) as err:
        I.read_checkpoint(tmp_path)
    _one_line_naming(err.value, tmp_path)


def test_bit_flip_in_a_tensor_is_caught_by_crc(tmp_path):
    path = _save(tmp_path, stamped=False)  # no stamp: the CRC alone must catch it
    offset, size = member_data_offset(path, "data/0")
    _flip(path, offset + size // 2)
    torch.load(path, weights_only=True)  # control: torch's reader does not notice
    with pytest.raises(I.CheckpointError) as err:
        I.read_checkpoint(path)
    msg = _one_line_naming(err.value, path)
    assert "CRC" in msg and "data/0" in msg


def test_bit_flip_in_the_pickle_is_caught(tmp_path):
    path = _save(tmp_path)
    offset, size = member_data_offset(path, "data.pkl")
    _flip(path, offset + size // 3)
    with pytest.raises(I.CheckpointError) as err:
        I.read_checkpoint(path)
    assert "CRC" in _one_line_naming(err.value, path)


def test_bit_flip_in_the_zip_directory_is_caught(tmp_path):
    path = _save(tmp_path)
    raw = path.read_bytes()
    _flip(path, raw.rindex(b"PK\x01\x02") + 16)  # inside the last central-directory entry's CRC field
    with pytest.raises(I.CheckpointError) as err:
        I.read_checkpoint(path)
    _one_line_naming(err.value, path)


def test_tampered_tensor_with_valid_zip_fails_the_stamp(tmp_path):
    obj = I.stamp(_ckpt())
    obj["model_dict"]["bias"] = obj["model_dict"]["bias"] + 1.0  # changed after stamping
    path = tmp_path / "latest.pth"
    torch.save(obj, path)
    I.verify_archive(path)  # the zip itself is consistent
    with pytest.raises(I.CheckpointError) as err:
        I.read_checkpoint(path)
    assert "checksum mismatch" in _one_line_naming(err.value, path)


def test_renamed_tensor_fails_the_stamp(tmp_path):
    obj = I.stamp(_ckpt())
    obj["model_dict"]["bias2"] = obj["model_dict"].pop("bias")
    path = tmp_path / "latest.pth"
    torch.save(obj, path)
    with pytest.raises(I.CheckpointError, match="checksum mismatch"):
        I.read_checkpoint(path)


def test_newer_format_version_is_refused(tmp_path):
    obj = I.stamp(_ckpt())
    obj["integrity"]["format_version"] = I.FORMAT_VERSION + 1
    path = tmp_path / "latest.pth"
    torch.save(obj, path)
    with pytest.raises(I.CheckpointError) as err:
        I.read_checkpoint(path)
    assert "newer" in _one_line_naming(err.value, path)


@pytest.mark.parametrize("where,value", [("model_dict/weight", float("nan")), ("model_dict/bias", float("inf")),
                                         ("optimizer_dict/state/0/exp_avg_sq", float("-inf"))])
def test_non_finite_tensor_is_refused_naming_it(tmp_path, where, value):
    obj = _ckpt()
    node = obj
    *parents, leaf = where.split("/")
    for p in parents:
        node = node[int(p) if p.isdigit() else p]
    node[leaf].view(-1)[1] = value
    path = _save(tmp_path, obj)
    with pytest.raises(I.CheckpointError) as err:
        I.read_checkpoint(path)
    msg = _one_line_naming(err.value, path)
    assert f"tensor {where} " in msg and "1 non-finite" in msg
    assert I.read_checkpoint(path, allow_non_finite=True)["epoch"] == 2


def test_digest_depends_on_bytes_dtype_and_shape():
    a = {"x": torch.zeros(4)}
    base, n = I.tensor_sha256(a)
    assert n == 1
    assert I.tensor_sha256({"x": torch.zeros(2, 2)})[0] != base
    assert I.tensor_sha256({"x": torch.zeros(4, dtype=torch.float64)})[0] != base
    b = torch.zeros(4)
    b[3] = 1e-30
    assert I.tensor_sha256({"x": b})[0] != base
    assert I.tensor_sha256({"x": torch.zeros(4)})[0] == base
    assert I.tensor_sha256({"x": torch.zeros(4, dtype=torch.bfloat16), "s": torch.tensor(3)})[1] == 2
