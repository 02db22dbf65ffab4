import struct

import numpy as np
import pytest
import torch

from fastavatar.io.ply import PlyFormatError, load_ply, ply_property_names, save_ply


def random_splats(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    quats = torch.randn(n, 4, generator=g)
    quats = quats / quats.norm(dim=1, keepdim=True)
    quats = torch.where(quats[:, :1] < 0, -quats, quats)
    return {
        "means": torch.randn(n, 3, generator=g),
        "quats": quats,
        "scales": torch.randn(n, 3, generator=g) - 4,
        "opacities": torch.randn(n, generator=g),
        "sh0": torch.randn(n, 1, 3, generator=g),
        "shN": torch.randn(n, 15, 3, generator=g) * 0.1,
    }


def test_round_trip_exact(tmp_path):
    splats = random_splats()
    path = tmp_path / "s.ply"
    assert save_ply(path, splats) == 50
    back = load_ply(path)
    for key, value in splats.items():
        if key == "quats":  # re-normalised on write: equal up to float rounding
            assert torch.allclose(back[key], value, atol=1e-6)
        else:
            assert torch.equal(back[key], value), key


def test_independent_reader_sees_inria_columns(tmp_path):
    from plyfile import PlyData

    splats = random_splats(7)
    path = tmp_path / "s.ply"
    save_ply(path, splats)
    ply = PlyData.read(str(path))
    names = [p.name for p in ply["vertex"].properties]
    assert names == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [
        f"f_rest_{i}" for i in range(45)] + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert len(names) == 62 and names == ply_property_names()
    assert all(p.val_dtype in ("f4", "float32", "float") for p in ply["vertex"].properties)
    assert ply.text is False and ply.byte_order == "<"
    v = ply["vertex"].data
    # f_rest is channel-major: f_rest_0..14 are the 15 red coefficients
    red = np.stack([v[f"f_rest_{i}"] for i in range(15)], axis=1)
    assert np.array_equal(red, splats["shN"][:, :, 0].numpy())
    blue_last = v["f_rest_44"]
    assert np.array_equal(blue_last, splats["shN"][:, 14, 2].numpy())
    assert np.allclose(v["rot_0"], splats["quats"][:, 0].numpy(), atol=1e-6)


def test_nan_rows_dropped_with_warning(tmp_path):
    splats = random_splats(10)
    splats["opacities"][3] = float("nan")
    splats["means"][5, 1] = float("inf")
    with pytest.warns(UserWarning, match="dropped 2 of 10"):
        assert save_ply(tmp_path / "s.ply", splats) == 8
    back = load_ply(tmp_path / "s.ply")
    assert back["means"].shape == (8, 3)
    keep = [i for i in range(10) if i not in (3, 5)]
    assert torch.equal(back["sh0"], splats["sh0"][keep])


def test_quaternions_written_normalised_with_positive_w(tmp_path):
    splats = random_splats(5)
    splats["quats"] = torch.tensor([[-2.0, 0, 0, 0], [0, 3.0, 0, 0], [-1, -1, 1, 1], [1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]])
    save_ply(tmp_path / "s.ply", splats)
    q = load_ply(tmp_path / "s.ply")["quats"]
    assert torch.allclose(q.norm(dim=1), torch.ones(5))
    assert (q[:, 0] >= 0).all()
    assert torch.allclose(q[0], torch.tensor([1.0, 0, 0, 0]))


def test_ascii_and_other_types_are_converted(tmp_path):
    from plyfile import PlyData, PlyElement

    n = 4
    names = ply_property_names()
    dtype = [(name, "f8") for name in names]  # doubles
    dtype = [(n_, "u1") if n_ in ("nx", "ny", "nz") else (n_, t) for n_, t in dtype]  # and uchar normals
    rng = np.random.default_rng(0)
    arr = np.zeros(n, dtype=dtype)
    for name in names:
        if name not in ("nx", "ny", "nz"):
            arr[name] = rng.normal(size=n)
    PlyData([PlyElement.describe(arr, "vertex")], text=True).write(str(tmp_path / "a.ply"))
    back = load_ply(tmp_path / "a.ply")
    assert np.allclose(back["means"][:, 0].numpy(), arr["x"].astype(np.float32))
    assert np.allclose(back["opacities"].numpy(), arr["opacity"].astype(np.float32))
    assert np.allclose(back["shN"][:, 0, 1].numpy(), arr["f_rest_15"].astype(np.float32))


def test_missing_property_and_garbage_give_clear_errors(tmp_path):
    from plyfile import PlyData, PlyElement

    arr = np.zeros(3, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    PlyData([PlyElement.describe(arr, "vertex")]).write(str(tmp_path / "pts.ply"))
    with pytest.raises(PlyFormatError, match=r"pts\.ply: missing vertex properties"):
        load_ply(tmp_path / "pts.ply")
    (tmp_path / "junk.ply").write_bytes(b"not a ply at all")
    with pytest.raises(PlyFormatError, match=r"junk\.ply: not a readable PLY"):
        load_ply(tmp_path / "junk.ply")
    with pytest.raises(FileNotFoundError, match="nope.ply"):
        load_ply(tmp_path / "nope.ply")


def test_binary_payload_is_little_endian_float32(tmp_path):
    splats = random_splats(2)
    save_ply(tmp_path / "s.ply", splats)
    raw = (tmp_path / "s.ply").read_bytes()
    body = raw[raw.index(b"end_header\n") + len(b"end_header\n"):]
    assert len(body) == 2 * 62 * 4
    x0 = struct.unpack("<f", body[:4])[0]
    assert x0 == pytest.approx(float(splats["means"][0, 0]))
