"""prepare_vhap: VHAP export -> COLMAP subject layout, round-tripped on the bundled subjects."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fastavatar.data import SubjectParser
from fastavatar.data.prepare_vhap import PrepareConfig, PrepareError, prepare_vhap, read_points_ply
from flame_fixtures import make_tiny_flame, save_tiny_flame_npz

SUBJECTS = ("128", "306", "369")
EXPORT_FILES = ("transforms.json", "canonical_flame_param.npz", "points3d.ply")


def make_export(data_root: Path, subject: str, dest: Path) -> Path:
    """A VHAP export folder from a bundled subject: everything but its COLMAP model."""
    src = data_root / subject
    dest.mkdir(parents=True)
    for name in EXPORT_FILES:
        shutil.copy2(src / name, dest / name)
    for folder in ("images", "fg_masks", "flame_param"):
        shutil.copytree(src / folder, dest / folder)
    return dest


def run(export: Path, out: Path, **kw) -> "object":
    lines = []
    result = prepare_vhap(PrepareConfig(vhap_dir=str(export), output_dir=str(out), **kw), echo=lines.append)
    result.lines = lines
    return result


def colmap_ids(sparse_dir: Path):
    import pycolmap

    rec = pycolmap.Reconstruction(str(sparse_dir))
    return {im.name: im.camera_id for im in rec.images.values()}


@pytest.mark.parametrize("subject", SUBJECTS)
def test_round_trip_cameras_equal_bundled_sparse(subject, data_root, tmp_path):
    """From the bundled transforms.json the written cameras equal the bundled sparse/0 (1e-4)."""
    out = tmp_path / "out" / subject
    result = run(data_root / subject, out, points_from="ply")
    ours, ref = SubjectParser(out), SubjectParser(data_root / subject)
    assert ours.image_names == ref.image_names and len(ours) == 16
    assert (ours.width, ours.height) == (ref.width, ref.height) == (550, 802)
    assert torch.allclose(ours.c2w, ref.c2w, atol=1e-4)
    assert torch.allclose(ours.Ks, ref.Ks, atol=1e-4)
    assert colmap_ids(out / "sparse" / "0") == colmap_ids(ref.sparse_dir)  # NeRSemble serials as camera ids
    # points3d.ply holds the same centres as the bundled points3D, in triangle order
    assert torch.allclose(ours.points, ref.points, atol=1e-6)
    assert result.num_points == 10144 and "points3d.ply" in result.points_source
    assert all(p is not None for p in ours.mask_paths)
    assert (out / "images" / "00000_08.png").resolve() == (data_root / subject / "images" / "00000_08.png").resolve()
    assert ours.flame_param_path.name == "00000.npz"


def test_image_scale_writes_resized_views_with_exact_intrinsics(data_root, tmp_path):
    out = tmp_path / "half"
    run(data_root / "306", out, points_from="ply", image_scale=0.5)
    ours, ref = SubjectParser(out), SubjectParser(data_root / "306", image_scale=0.5)
    assert (ours.full_width, ours.full_height) == (ref.width, ref.height) == (275, 401)
    assert torch.allclose(ours.Ks, ref.Ks, atol=1e-4) and torch.allclose(ours.c2w, ref.c2w, atol=1e-4)
    assert not (out / "images" / "00000_00.png").is_symlink()
    assert torch.allclose(ours.load_image(3), ref.load_image(3), atol=2 / 255)  # same box-filtered pixels
    meta = json.loads((out / "transforms.json").read_text())
    assert meta["frames"][0]["w"] == 275 and abs(meta["frames"][0]["fl_x"] - float(ref.Ks[0, 0, 0])) < 1e-3


def test_copy_mode_and_transforms_cameras_agree(data_root, tmp_path):
    out = tmp_path / "copy"
    run(data_root / "128", out, points_from="ply", link="copy")
    assert not (out / "images" / "00000_00.png").is_symlink()
    a = SubjectParser(out)
    b = SubjectParser(out, cameras_from="transforms")  # the written transforms.json matches the written sparse/0
    assert torch.allclose(a.c2w, b.c2w, atol=1e-5) and torch.allclose(a.Ks, b.Ks, atol=1e-4)


def test_synthetic_flame_points_then_ply_teeth(data_root, tmp_path):
    """A FLAME file without teeth: its triangle centres, then points3d.ply's trailing points."""
    from fastavatar.flame.model import load_flame_model, params_from_npz
    from fastavatar.flame.points import flame_centres

    export = make_export(data_root, "306", tmp_path / "export")
    flame_file = save_tiny_flame_npz(tmp_path / "tiny_flame.npz", make_tiny_flame())
    out = tmp_path / "out"
    result = run(export, out, flame_model=str(flame_file))
    model = load_flame_model(flame_file)
    expected = flame_centres(model, params_from_npz(export / "flame_param" / "00000.npz")).double().numpy()
    points = SubjectParser(out).points.double().numpy()
    f = model.num_faces
    assert np.allclose(points[:f], expected, atol=1e-6)
    assert np.allclose(points[f:], read_points_ply(export / "points3d.ply")[f:], atol=1e-6)
    assert str(flame_file) in result.points_source and "teeth" in result.points_source
    assert any("points3D:" in line for line in result.lines)


def test_synthetic_flame_with_all_faces_needs_no_ply(data_root, tmp_path):
    export = make_export(data_root, "369", tmp_path / "export")
    (export / "points3d.ply").unlink()
    model = make_tiny_flame()
    flame_file = save_tiny_flame_npz(tmp_path / "tiny_flame.npz", model)
    result = run(export, tmp_path / "out", flame_model=str(flame_file), expected_points=model.num_faces)
    assert result.num_points == model.num_faces and "FLAME + teeth" in result.points_source
    assert len(SubjectParser(tmp_path / "out", expected_points=model.num_faces).points) == model.num_faces


def test_real_flame_points_equal_bundled_points3d(data_root, tmp_path):
    from fastavatar.flame.model import DEFAULT_FLAME_PATH

    flame = Path(__file__).resolve().parents[1] / DEFAULT_FLAME_PATH
    if not flame.is_file():
        pytest.skip(f"FLAME model not present at {flame} (licence-gated; see pretrained_weights/README.md)")
    out = tmp_path / "out"
    result = run(data_root / "306", out, flame_model=str(flame), points_from="flame")
    ours, ref = SubjectParser(out), SubjectParser(data_root / "306")
    assert "triangle centres" in result.points_source
    assert torch.allclose(ours.points[:9976], ref.points[:9976], atol=1e-5)


# ------------------------------------------------------------------ bad input


def expect_error(export, out, match, **kw):
    with pytest.raises(PrepareError) as info:
        run(export, out, **kw)
    message = str(info.value)
    assert "\n" not in message
    assert match in message, message
    return message


def test_missing_frame_image(data_root, tmp_path):
    export = make_export(data_root, "306", tmp_path / "export")
    (export / "images" / "00000_05.png").unlink()
    expect_error(export, tmp_path / "out", "00000_05.png", points_from="ply")
    assert not (tmp_path / "out" / "sparse").exists()


def test_missing_mask_and_flame_params(data_root, tmp_path):
    export = make_export(data_root, "306", tmp_path / "export")
    (export / "fg_masks" / "00000_02.png").unlink()
    expect_error(export, tmp_path / "out", "fg_masks/00000_02.png", points_from="ply")
    shutil.copy2(data_root / "306" / "fg_masks" / "00000_02.png", export / "fg_masks" / "00000_02.png")
    shutil.rmtree(export / "flame_param")
    expect_error(export, tmp_path / "out", "flame_param/00000.npz", points_from="ply")


def test_inconsistent_counts(data_root, tmp_path):
    export = make_export(data_root, "306", tmp_path / "export")
    meta = json.loads((export / "transforms.json").read_text())
    meta["frames"] = meta["frames"][:-1]  # camera_indices still lists 16 cameras
    (export / "transforms.json").write_text(json.dumps(meta))
    expect_error(export, tmp_path / "out", "inconsistent counts", points_from="ply")
    # a second timestep that lost a camera
    meta = json.loads((data_root / "306" / "transforms.json").read_text())
    extra = [dict(f, timestep_index=1) for f in meta["frames"][:15]]
    meta["frames"] = meta["frames"] + extra
    (export / "transforms.json").write_text(json.dumps(meta))
    message = expect_error(export, tmp_path / "out", "inconsistent counts", points_from="ply")
    assert "transforms.json" in message


def test_image_size_differs_from_camera(data_root, tmp_path):
    from PIL import Image

    export = make_export(data_root, "306", tmp_path / "export")
    Image.new("RGB", (540, 802), "white").save(export / "images" / "00000_07.png")
    expect_error(export, tmp_path / "out", "00000_07.png: image is 540x802", points_from="ply")


def test_cameras_with_different_sizes(data_root, tmp_path):
    from PIL import Image

    export = make_export(data_root, "306", tmp_path / "export")
    meta = json.loads((export / "transforms.json").read_text())
    meta["frames"][4]["w"] = 540
    Image.new("RGB", (540, 802), "white").save(export / "images" / "00000_04.png")
    Image.new("L", (540, 802), 255).save(export / "fg_masks" / "00000_04.png")
    (export / "transforms.json").write_text(json.dumps(meta))
    expect_error(export, tmp_path / "out", "different image sizes", points_from="ply")


def test_missing_flame_file(data_root, tmp_path):
    export = make_export(data_root, "306", tmp_path / "export")
    expect_error(export, tmp_path / "out", "nowhere/flame2023.pkl", flame_model=str(tmp_path / "nowhere" / "flame2023.pkl"))
    (export / "points3d.ply").unlink()
    expect_error(export, tmp_path / "out", "points3d.ply: not found", points_from="ply")


def test_existing_model_is_kept_without_overwrite(data_root, tmp_path):
    out = tmp_path / "out"
    run(data_root / "306", out, points_from="ply")
    before = (out / "sparse" / "0" / "points3D.bin").read_bytes()
    expect_error(data_root / "306", out, "--overwrite", points_from="ply")
    assert (out / "sparse" / "0" / "points3D.bin").read_bytes() == before
    run(data_root / "306", out, points_from="ply", overwrite=True)
    assert sorted(p.name for p in (out / "sparse").iterdir()) == ["0"]


def test_script_reports_bad_input_in_one_line(repo_root, tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(repo_root / "scripts" / "prepare_vhap.py"), "--vhap_dir",
                          str(tmp_path / "absent"), "--output_dir", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "absent" in out.stderr and "Traceback" not in out.stderr
