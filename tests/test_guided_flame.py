"""Guided inference's FLAME geometry option (``GuidedConfig(points_from="flame")``), end to end on a
copy of a bundled subject whose tracked parameters are replaced by ones sized for the tiny synthetic
FLAME-like model of tests/flame_fixtures.py (no licensed data)."""

import re
import shutil

import numpy as np
import pytest
import torch
from flame_fixtures import NUM_EXPR, NUM_SHAPE, make_tiny_flame, save_tiny_flame_npz
from scipy.spatial.transform import Rotation

from fastavatar.data import SubjectParser
from fastavatar.flame.model import flame_forward
from fastavatar.flame.points import triangle_centres
from fastavatar.inference.guided import GuidedConfig, subject_points

NUM_POINTS = 10144  # FastAvatar's anchor count (FLAME 9976 + VHAP teeth 168 faces)
JAW = np.array([0.25, 0.0, 0.0])  # mouth opened by ~14 degrees about the jaw joint's x axis
ROTATION = np.array([0.1, -0.3, 0.05])  # global head rotation (axis-angle)
TRANSLATION = np.array([0.01, -0.02, 0.03])  # metres


@pytest.fixture(scope="module")
def model():
    return make_tiny_flame()


@pytest.fixture(scope="module")
def flame_file(model, tmp_path_factory):
    return save_tiny_flame_npz(tmp_path_factory.mktemp("flame") / "tiny_flame.npz", model)


def write_params(path, model, *, rotation, jaw_pose, translation, seed=0, extra_offset_rows=120):
    """A VHAP-layout flame_param npz sized for ``model`` (float32, ``shape`` 1-D as VHAP writes it,
    ``static_offset`` with extra trailing rows like VHAP's teeth vertices). Returns the float64 arrays."""
    rng = np.random.default_rng(seed)
    params = {
        "translation": np.asarray(translation, dtype=np.float32).reshape(1, 3),
        "rotation": np.asarray(rotation, dtype=np.float32).reshape(1, 3),
        "neck_pose": np.zeros((1, 3), dtype=np.float32),
        "jaw_pose": np.asarray(jaw_pose, dtype=np.float32).reshape(1, 3),
        "eyes_pose": np.zeros((1, 6), dtype=np.float32),
        "shape": rng.normal(size=NUM_SHAPE).astype(np.float32),
        "expr": rng.normal(size=(1, NUM_EXPR)).astype(np.float32),
        "static_offset": (rng.normal(size=(1, model.num_vertices + extra_offset_rows, 3)) * 1e-3).astype(np.float32),
    }
    np.savez(path, **params)
    return {k: v.astype(np.float64) for k, v in params.items()}


@pytest.fixture()
def subject(tmp_path, data_root, model):
    """Copy of subject 306 whose flame_param/00000.npz holds tiny-model parameters with a jaw pose."""
    subject_dir = tmp_path / "306"
    shutil.copytree(data_root / "306", subject_dir)
    params = write_params(subject_dir / "flame_param" / "00000.npz", model, rotation=ROTATION, jaw_pose=JAW,
                          translation=TRANSLATION)
    return subject_dir, params


def guided_cfg(flame_file, **kw):
    return GuidedConfig(points_from="flame", flame_model=str(flame_file), **kw)


def test_flame_points_are_tiny_model_centres_then_points3d(subject, model, flame_file, capsys):
    subject_dir, params = subject
    parser = SubjectParser(subject_dir)
    assert parser.flame_param_path == subject_dir / "flame_param" / "00000.npz"
    colmap_points = parser.points.clone()

    points = subject_points(guided_cfg(flame_file), parser)

    assert points.shape == (NUM_POINTS, 3) and points.dtype == torch.float32
    nf = model.num_faces
    # (1) the first rows are the triangle centres of the tiny model posed with the file's parameters
    out = flame_forward(model, **{k: torch.as_tensor(v)[None] if k == "shape" else torch.as_tensor(v)
                                  for k, v in params.items()})
    verts = out.vertices[0]
    expected = verts[model.faces].mean(dim=1)  # centroid of each triangle, by hand
    assert torch.allclose(expected, triangle_centres(verts, model.faces))
    assert torch.allclose(points[:nf].double(), expected, atol=1e-6)
    # ... and the parameters were really used: without the jaw pose the mouth region moves
    closed = {k: torch.as_tensor(v) for k, v in params.items() if k != "jaw_pose"}
    closed["shape"] = closed["shape"][None]
    closed_centres = triangle_centres(flame_forward(model, **closed).vertices[0], model.faces)
    assert (closed_centres - points[:nf].double()).norm(dim=1).max() > 1e-3
    # the remaining rows are the documented fallback: the subject's points3D, unchanged
    assert torch.equal(points[nf:], colmap_points[nf:])
    assert torch.equal(parser.points, colmap_points)  # the parser's points are not modified
    # the tiny sphere is nowhere near the real head's points, so the comparison above is meaningful
    assert (points[:nf] - colmap_points[:nf]).norm(dim=1).min() > 1e-3

    # (2) the run prints the max distance to points3D
    line = [ln for ln in capsys.readouterr().out.splitlines() if "max distance to points3D" in ln]
    assert len(line) == 1 and str(flame_file) in line[0]
    printed = float(re.search(r"max distance to points3D ([-+0-9.eE]+) m", line[0]).group(1))
    true_max = float((points - colmap_points).norm(dim=1).max())
    assert true_max > 0 and printed == pytest.approx(true_max, rel=1e-2)
    assert f"({10144 - nf} trailing points from points3D)" in line[0]


def test_flame_points_rigid_pose_from_first_principles(tmp_path, data_root, model, flame_file):
    """With only a global rotation and translation the forward is closed-form:
    x = template + shape + expression + offset, J0 = regressed root, v = R (x - J0) + J0 + t."""
    subject_dir = tmp_path / "306"
    shutil.copytree(data_root / "306", subject_dir)
    p = write_params(subject_dir / "flame_param" / "00000.npz", model, rotation=ROTATION, jaw_pose=np.zeros(3),
                     translation=TRANSLATION, seed=3)
    parser = SubjectParser(subject_dir)

    points = subject_points(guided_cfg(flame_file), parser)

    nv = model.num_vertices
    x = (model.v_template.numpy() + model.shapedirs.numpy() @ p["shape"] + model.exprdirs.numpy() @ p["expr"][0]
         + p["static_offset"][0, :nv])
    j0 = model.J_regressor.numpy()[0] @ x
    rot = Rotation.from_rotvec(p["rotation"][0]).as_matrix()
    verts = (x - j0) @ rot.T + j0 + p["translation"][0]
    faces = model.faces.numpy()
    centres = (verts[faces[:, 0]] + verts[faces[:, 1]] + verts[faces[:, 2]]) / 3.0
    assert np.allclose(points[: len(faces)].numpy(), centres, atol=1e-6)
    assert torch.equal(points[len(faces):], parser.points[len(faces):])


def test_colmap_points_returned_unchanged(subject, flame_file, capsys):
    subject_dir, _ = subject
    parser = SubjectParser(subject_dir)
    # flame_model is ignored for colmap geometry (even if it would load)
    points = subject_points(GuidedConfig(points_from="colmap", flame_model=str(flame_file)), parser)
    assert points is parser.points
    assert points.shape == (NUM_POINTS, 3)
    assert "max distance" not in capsys.readouterr().out


def test_missing_flame_model_names_the_file(subject, tmp_path):
    subject_dir, _ = subject
    parser = SubjectParser(subject_dir)
    missing = tmp_path / "nowhere" / "flame2023.pkl"
    with pytest.raises(FileNotFoundError) as info:
        subject_points(guided_cfg(missing), parser)
    assert str(missing) in str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_missing_flame_params_is_a_clear_error(subject, flame_file):
    subject_dir, _ = subject
    shutil.rmtree(subject_dir / "flame_param")
    parser = SubjectParser(subject_dir)
    assert parser.flame_param_path is None
    with pytest.raises(FileNotFoundError, match="flame_param"):
        subject_points(guided_cfg(flame_file), parser)


def test_invalid_points_from_raises(data_root):
    parser = SubjectParser(data_root / "306")
    with pytest.raises(ValueError, match="points_from must be 'colmap' or 'flame'.*'mesh'"):
        subject_points(GuidedConfig(points_from="mesh"), parser)
