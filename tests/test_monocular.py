"""Reading tracked monocular sequences (INSTA / metrical-tracker and VHAP export) and their errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastavatar.core.cameras import c2w_to_w2c, look_at_c2w
from fastavatar.data.monocular import SequenceError, load_monocular_sequence, rotation_6d_to_matrix
from monocular_fixtures import matrix_to_6d, write_insta, write_vhap

T, W, H = 4, 12, 10


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(H, W, 3, generator=g) for _ in range(T)]
    masks = [(torch.rand(H, W, 1, generator=g) > 0.5).float() for _ in range(T)]
    params = [{"expr": torch.randn(1, 5, generator=g), "jaw_pose": torch.tensor([[0.2 + 0.05 * i, 0.01, -0.02]]),
               "eyes_pose": torch.randn(1, 6, generator=g) * 0.1, "rotation": torch.zeros(1, 3),
               "neck_pose": torch.zeros(1, 3), "translation": torch.zeros(1, 3)} for i in range(T)]
    c2ws = [look_at_c2w(torch.tensor([0.1 * i, 0.0, 1.0]), torch.zeros(3), torch.tensor([0.0, 1.0, 0.0])) for i in range(T)]
    K = torch.tensor([[20.0, 0, W / 2], [0, 21.0, H / 2], [0, 0, 1]])
    return images, masks, params, c2ws, K, torch.randn(1, 300, generator=g)


def test_6d_round_trip():
    from fastavatar.core.cameras import axis_angle_to_matrix

    rot = axis_angle_to_matrix(torch.tensor([[0.3, -0.5, 1.2], [2.0, 0.1, 0.0]], dtype=torch.float64))
    assert torch.allclose(rotation_6d_to_matrix(matrix_to_6d(rot)), rot, atol=1e-12)
    # a non-orthonormal 6D vector is Gram-Schmidt-ed, rows first (PyTorch3D)
    r = rotation_6d_to_matrix(torch.tensor([2.0, 0.0, 0.0, 1.0, 3.0, 0.0], dtype=torch.float64))
    assert torch.allclose(r, torch.eye(3, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("layout", ["insta", "vhap"])
def test_read_sequence(tmp_path, layout):
    images, masks, params, c2ws, K, shape = _data()
    if layout == "insta":
        write_insta(tmp_path, images, masks, params, [c2w_to_w2c(c) for c in c2ws], K, shape)
    else:
        write_vhap(tmp_path, images, masks, params, c2ws, K, shape)
    seq = load_monocular_sequence(tmp_path)
    assert seq.layout == layout and len(seq) == T
    assert torch.allclose(seq.shape, shape, atol=1e-6)
    for i in range(T):
        f = seq.frames[i]
        assert torch.allclose(f.params["jaw_pose"], params[i]["jaw_pose"], atol=1e-5)
        assert torch.allclose(f.params["eyes_pose"], params[i]["eyes_pose"], atol=1e-5)
        assert torch.allclose(f.params["expr"][:, :5], params[i]["expr"], atol=1e-6)
        assert torch.allclose(f.c2w, c2ws[i], atol=1e-5) and torch.allclose(f.K, K)
        rgb, mask = seq.load(i)
        assert rgb.shape == (H, W, 3) and mask.shape == (H, W, 1)
        assert (rgb - images[i]).abs().max() <= 0.5 / 255 + 1e-6 and torch.equal(mask, masks[i])
    c2w, K_half, w, h = seq.camera(0, 0.5)
    assert (w, h) == (6, 5) and torch.allclose(K_half[:2], K[:2] * 0.5)
    train, test = seq.split(1)
    assert train == [0, 1, 2] and test == [3]


def _one_line(info):
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_insta_errors(tmp_path):
    images, masks, params, c2ws, K, shape = _data()
    w2cs = [c2w_to_w2c(c) for c in c2ws]
    root = write_insta(tmp_path / "a", images, masks, params, w2cs, K, shape)
    (root / "images" / "00002.png").unlink()
    with pytest.raises(SequenceError, match="00002.png: frame missing") as info:
        load_monocular_sequence(root)
    _one_line(info)
    root = write_insta(tmp_path / "b", images, masks, params, w2cs, K, shape)
    (root / "checkpoint" / "00001.frame").unlink()
    with pytest.raises(SequenceError, match="00001.frame: tracker parameters missing") as info:
        load_monocular_sequence(root)
    assert "4 images vs 3 tracked frames" in _one_line(info)
    root = write_insta(tmp_path / "c", images, masks, params, w2cs, K, shape)
    from PIL import Image

    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "images" / "00000.png")  # no alpha = no mask
    seq = load_monocular_sequence(root)
    with pytest.raises(SequenceError, match="must be RGBA") as info:
        seq.load(0)
    _one_line(info)
    (root / "checkpoint" / "00003.frame").write_bytes(b"not a torch file")
    with pytest.raises(SequenceError, match="00003.frame: cannot read tracker frame") as info:
        load_monocular_sequence(root)
    _one_line(info)


def test_vhap_errors(tmp_path):
    images, masks, params, c2ws, K, shape = _data()
    for name, what in (("fg_masks/00001_00.png", "mask missing"), ("images/00002_00.png", "frame missing"),
                       ("flame_param/00003.npz", "FLAME parameter file missing")):
        root = write_vhap(tmp_path / name.replace("/", "_"), images, masks, params, c2ws, K, shape)
        (root / name).unlink()
        with pytest.raises(SequenceError, match=what) as info:
            load_monocular_sequence(root)
        assert name.split("/")[1] in _one_line(info)
    root = write_vhap(tmp_path / "multi", images, masks, params, c2ws, K, shape)
    meta = json.loads((root / "transforms.json").read_text())
    meta["frames"][1]["camera_index"] = 3
    (root / "transforms.json").write_text(json.dumps(meta))
    with pytest.raises(SequenceError, match="2 cameras"):
        load_monocular_sequence(root)
    with pytest.raises(SequenceError, match="not a tracked monocular sequence"):
        load_monocular_sequence(tmp_path)
