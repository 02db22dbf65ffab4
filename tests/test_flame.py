"""FLAME loading and forward, on a tiny synthetic FLAME-like model (tests/flame_fixtures.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from fastavatar.flame import FlameModelMissing, flame_forward, lbs_transforms, load_flame_model, params_from_npz, skin_points
from fastavatar.flame.points import compare_centres, triangle_centres
from fastavatar.flame.teeth import add_teeth
from flame_fixtures import NUM_SHAPE, make_tiny_flame, random_params, save_tiny_flame_npz, save_tiny_flame_pickle


@pytest.fixture(scope="module")
def model():
    return make_tiny_flame()


def _naive_flame(model, p):
    """Independent reference: explicit per-joint world transforms with scipy rotations, numpy only."""
    v = model.v_template.numpy() + np.einsum("vck,k->vc", model.shapedirs.numpy(), p["shape"][0].numpy())
    v = v + np.einsum("vck,k->vc", model.exprdirs.numpy(), p["expr"][0].numpy()) + p["static_offset"][0].numpy()
    joints = model.J_regressor.numpy() @ v
    aa = np.concatenate([p["rotation"][0], p["neck_pose"][0], p["jaw_pose"][0], p["eyes_pose"][0]]).reshape(5, 3)
    rots = Rotation.from_rotvec(aa).as_matrix()
    feat = np.concatenate([(rots[j] - np.eye(3)).reshape(-1) for j in range(1, 5)])
    v = v + (feat @ model.posedirs.numpy()).reshape(-1, 3)
    parents = model.parents.numpy()
    world_r, world_t = [None] * 5, [None] * 5
    for j in range(5):
        if parents[j] < 0:
            world_r[j], world_t[j] = rots[j], joints[j]
        else:
            pj = parents[j]
            world_r[j] = world_r[pj] @ rots[j]
            world_t[j] = world_r[pj] @ (joints[j] - joints[pj]) + world_t[pj]
    out = np.zeros_like(v)
    w = model.lbs_weights.numpy()
    for j in range(5):
        out += w[:, j:j + 1] * ((v - joints[j]) @ world_r[j].T + world_t[j])
    return out + p["translation"][0].numpy()


def test_pickle_with_chumpy_and_sparse_loads_like_npz(model, tmp_path):
    pkl = load_flame_model(save_tiny_flame_pickle(tmp_path / "generic_model.pkl", model), num_shape=NUM_SHAPE)
    npz = load_flame_model(save_tiny_flame_npz(tmp_path / "flame.npz", model))
    for name in ("v_template", "shapedirs", "exprdirs", "posedirs", "J_regressor", "lbs_weights"):
        assert torch.equal(getattr(pkl, name), getattr(model, name)), name
        assert torch.equal(getattr(npz, name), getattr(model, name)), name
    assert pkl.parents.tolist() == [-1, 0, 1, 1, 1]
    assert torch.equal(pkl.faces, model.faces)


def test_missing_model_names_file_and_flag(tmp_path):
    with pytest.raises(FlameModelMissing) as info:
        load_flame_model(tmp_path / "flame2023.pkl")
    msg = str(info.value)
    assert "flame2023.pkl" in msg and "--flame_model" in msg and "pretrained_weights/flame" in msg
    assert "\n" not in msg


def test_not_a_flame_file(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, foo=np.zeros(3))
    with pytest.raises(ValueError, match="bad.npz"):
        load_flame_model(path)


def test_forward_matches_independent_reference(model):
    p = random_params(model, seed=3)
    ours = flame_forward(model, **p).vertices[0].numpy()
    ref = _naive_flame(model, p)
    assert np.abs(ours - ref).max() < 1e-12


def test_zero_expression_and_pose_give_rest_mesh_exactly(model):
    assert torch.equal(flame_forward(model).vertices[0], model.v_template)
    p = random_params(model, seed=4)
    rest = flame_forward(model, shape=p["shape"], static_offset=p["static_offset"]).vertices[0]
    expected = model.v_template + torch.einsum("vck,k->vc", model.shapedirs, p["shape"][0]) + p["static_offset"][0]
    assert torch.equal(rest, expected)


def test_identity_lbs_is_identity(model):
    joints = torch.randn(2, 5, 3, dtype=torch.float64)
    rots = torch.eye(3, dtype=torch.float64).expand(2, 5, 3, 3)
    transforms = lbs_transforms(rots, joints, model.parents)
    assert torch.equal(transforms, torch.eye(4, dtype=torch.float64).expand(2, 5, 4, 4))
    pts = torch.randn(2, 7, 3, dtype=torch.float64)
    w = torch.softmax(torch.randn(7, 5, dtype=torch.float64), -1)
    assert torch.allclose(skin_points(pts, w, transforms), pts, atol=1e-15)


def test_global_rotation_is_rigid_about_root(model):
    rot = torch.tensor([[0.2, -0.4, 0.1]], dtype=torch.float64)
    trans = torch.tensor([[0.01, 0.02, -0.03]], dtype=torch.float64)
    out = flame_forward(model, rotation=rot, translation=trans)
    j0 = out.rest_joints[0, 0]
    r = torch.as_tensor(Rotation.from_rotvec(rot[0].numpy()).as_matrix())
    expected = (model.v_template - j0) @ r.T + j0 + trans[0]
    assert torch.allclose(out.vertices[0], expected, atol=1e-14)


def test_static_offset_with_extra_teeth_rows_is_accepted(model):
    offset = torch.randn(1, model.num_vertices + 120, 3, dtype=torch.float64) * 1e-3
    v = flame_forward(model, static_offset=offset).vertices[0]
    assert torch.allclose(v, model.v_template + offset[0, : model.num_vertices])
    with pytest.raises(ValueError, match="static_offset"):
        flame_forward(model, static_offset=offset[:, :10])


def test_teeth_extension_layout_and_skinning(model):
    upper = list(range(1 + 16 * 5, 1 + 16 * 5 + 15))  # a ring of 15 vertices
    lower = list(range(1 + 16 * 6, 1 + 16 * 6 + 15))
    ext = add_teeth(model, upper, lower)
    assert ext.num_vertices == model.num_vertices + 120 and ext.num_faces == model.num_faces + 168
    assert (ext.num_teeth_vertices, ext.num_teeth_faces) == (120, 168)
    teeth = slice(model.num_vertices, None)
    # expression does not move teeth; jaw moves only the lower set, neck moves both rigidly
    e = flame_forward(ext, expr=torch.ones(1, ext.num_expr, dtype=torch.float64)).vertices[0]
    assert torch.allclose(e[teeth], ext.v_template[teeth])
    jaw = flame_forward(ext, jaw_pose=torch.tensor([[0.3, 0.0, 0.0]], dtype=torch.float64)).vertices[0][teeth]
    assert torch.allclose(jaw[:60], ext.v_template[teeth][:60], atol=1e-14)  # upper set: neck-skinned, no correctives
    assert (jaw[60:] - ext.v_template[teeth][60:]).norm(dim=-1).min() > 1e-4
    # the original FLAME part is unchanged
    p = random_params(model, seed=5)
    p["static_offset"] = torch.zeros(1, ext.num_vertices, 3, dtype=torch.float64)
    assert torch.allclose(flame_forward(ext, **p).vertices[0][: model.num_vertices], flame_forward(model, **p).vertices[0])


def test_centre_comparison_reports_exact_and_wrong_params(model):
    p = random_params(model, seed=6)
    points = triangle_centres(flame_forward(model, **p).vertices[0], model.faces)
    good = compare_centres(model, p, points)
    assert good.matches(1e-10) and good.max_error < 1e-12
    wrong = dict(p, jaw_pose=p["jaw_pose"] + 0.2)
    bad = compare_centres(model, wrong, points)
    assert not bad.matches(1e-5) and bad.max_error > 1e-4
    assert "max error" in bad.summary()


def test_check_subject_reports_mismatch_for_wrong_model(model, data_root):
    from fastavatar.flame.points import check_subject

    report = check_subject(model, data_root / "306")
    assert report.num_points == 10144 and report.num_faces == model.num_faces
    assert report.num_compared == model.num_faces and not report.matches()


def test_points_from_flame_file(model, tmp_path, data_root):
    from fastavatar.flame.model import params_from_npz as read
    from fastavatar.flame.points import points_from_flame_file

    path = save_tiny_flame_npz(tmp_path / "tiny.npz", model)
    params_path = data_root / "306" / "flame_param" / "00000.npz"
    pts = points_from_flame_file(path, params_path, expected=None)
    assert pts.dtype == torch.float32 and pts.shape == (model.num_faces, 3)
    assert torch.allclose(pts.double(), triangle_centres(flame_forward(model, **read(params_path)).vertices[0], model.faces), atol=1e-6)
    with pytest.raises(ValueError, match="FastAvatar needs 10144"):
        points_from_flame_file(path, params_path)
    fallback = torch.randn(10144, 3)
    full = points_from_flame_file(model, params_path, fallback_points=fallback)
    assert full.shape == (10144, 3) and torch.equal(full[model.num_faces:], fallback[model.num_faces:])


def test_sample_flame_params_layout(data_root):
    p = params_from_npz(data_root / "306" / "flame_param" / "00000.npz")
    assert p["expr"].shape == (1, 100) and p["shape"].shape == (1, 300)
    assert p["eyes_pose"].shape == (1, 6) and p["static_offset"].shape == (1, 5143, 3)
    assert torch.count_nonzero(p["translation"]) == 0 and p["rotation"].abs().sum() > 0
