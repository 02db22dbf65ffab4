import shutil

import pytest
import torch

from fastavatar.core.cameras import c2w_to_w2c
from fastavatar.data import MultiViewDataset, SubjectDataError, SubjectParser, discover_subjects, subject_id_from_dir


def test_subject_id_from_both_naming_schemes():
    assert subject_id_from_dir("306") == "306"
    assert subject_id_from_dir("306_EXP-1_v16_DS4_whiteBg_staticOffset_maskBelowLine") == "306"
    assert subject_id_from_dir("notes") is None


def test_discover_accepts_short_and_vhap_names(tmp_path, data_root, capsys):
    shutil.copytree(data_root / "306", tmp_path / "306")
    shutil.copytree(data_root / "128", tmp_path / "128_EXP-1_v16_DS4_whiteBg_staticOffset_maskBelowLine")
    (tmp_path / "readme_folder").mkdir()
    (tmp_path / "999").mkdir()  # no sparse/ or images/: skipped and reported
    found = discover_subjects(tmp_path, verbose=True)
    assert [p.name[:3] for p in found] == ["128", "306"]
    out = capsys.readouterr().out
    assert "2 subjects" in out and "skipped" in out and "999" in out
    assert [p.name for p in discover_subjects(tmp_path, subject_ids=["306"])] == ["306"]
    with pytest.raises(SubjectDataError, match="subjects \\[42\\] not found"):
        discover_subjects(tmp_path, subject_ids=["42"])


def test_parser_reads_cameras_points_images(data_root):
    p = SubjectParser(data_root / "306")
    assert p.subject_id == "306" and len(p) == 16
    assert p.points.shape == (10144, 3) and p.c2w.shape == (16, 4, 4)
    assert (p.width, p.height) == (550, 802)
    assert p.image_names == sorted(p.image_names) and p.image_names[8] == "00000_08.png"
    # cameras look at the head (origin) from about 1.1 m
    dist = p.c2w[:, :3, 3].norm(dim=1)
    assert ((dist > 1.0) & (dist < 1.35)).all()
    # every point projects inside the image of the frontal camera
    w2c = c2w_to_w2c(p.c2w[8])
    cam = p.points @ w2c[:3, :3].T + w2c[:3, 3]
    uv = cam @ p.Ks[8].T
    uv = uv[:, :2] / uv[:, 2:]
    assert (cam[:, 2] > 0).all()
    assert (uv[:, 0] > 0).all() and (uv[:, 0] < 550).all() and (uv[:, 1] > 0).all() and (uv[:, 1] < 802).all()
    img = p.load_image(8)
    assert img.shape == (802, 550, 3) and img.dtype == torch.float32
    assert p.flame_param_path is not None and p.flame_param_path.name == "00000.npz"


def test_image_scale_scales_intrinsics(data_root):
    full = SubjectParser(data_root / "306")
    half = SubjectParser(data_root / "306", image_scale=0.5)
    quarter = SubjectParser(data_root / "306", image_scale=0.25)
    assert (half.width, half.height) == (275, 401)
    assert (quarter.width, quarter.height) == (138, 200)
    assert torch.allclose(half.Ks[:, :2, :], full.Ks[:, :2, :] * 0.5)
    # a point projects to the same relative position at every scale
    w2c = c2w_to_w2c(full.c2w[3])
    cam = full.points[:5] @ w2c[:3, :3].T + w2c[:3, 3]
    for parser in (full, half, quarter):
        uv = cam @ parser.Ks[3].T
        rel = uv[:, :2] / uv[:, 2:] / torch.tensor([parser.width, parser.height])
        ref = cam @ full.Ks[3].T
        assert torch.allclose(rel, ref[:, :2] / ref[:, 2:] / torch.tensor([550.0, 802.0]), atol=2e-3)
    assert half.load_image(0).shape == (401, 275, 3)


def test_transforms_json_cameras_match_colmap(data_root):
    a = SubjectParser(data_root / "128")
    b = SubjectParser(data_root / "128", cameras_from="transforms")
    assert torch.allclose(a.c2w, b.c2w, atol=1e-5)
    assert torch.allclose(a.Ks, b.Ks, atol=1e-3)


def test_mask_composites_onto_any_background(data_root):
    p = SubjectParser(data_root / "369", image_scale=0.25)
    white = p.load_image(2)
    black = p.load_image(2, background=(0, 0, 0))
    mask = p.load_mask(2)
    assert mask.shape == (200, 138, 1)
    bg = mask[..., 0] < 0.01
    assert bg.any() and (black[bg] < 0.02).all() and (white[bg] > 0.98).all()


def test_broken_subjects_name_subject_and_file(tmp_path, data_root):
    subject = tmp_path / "306"
    shutil.copytree(data_root / "306", subject)
    (subject / "images" / "00000_03.png").unlink()
    with pytest.raises(SubjectDataError, match=r"306.*00000_03\.png"):
        SubjectParser(subject)
    with pytest.raises(SubjectDataError, match="10144 points3D, the template expects 500"):
        SubjectParser(data_root / "306", expected_points=500)
    shutil.rmtree(subject / "sparse")
    with pytest.raises(SubjectDataError, match=r"306: no COLMAP model"):
        SubjectParser(subject)


def test_colmap_text_model_reads_the_same(tmp_path, data_root):
    import pycolmap

    subject = tmp_path / "306"
    shutil.copytree(data_root / "306", subject)
    recon = pycolmap.Reconstruction(str(subject / "sparse" / "0"))
    shutil.rmtree(subject / "sparse" / "0")
    (subject / "sparse" / "0").mkdir()
    recon.write_text(str(subject / "sparse" / "0"))
    assert (subject / "sparse" / "0" / "cameras.txt").is_file()
    a = SubjectParser(data_root / "306")
    b = SubjectParser(subject)
    assert torch.allclose(a.points, b.points, atol=1e-6) and torch.allclose(a.c2w, b.c2w, atol=1e-5)


def test_dataset_items(data_root):
    parsers = [SubjectParser(p, image_scale=0.25) for p in discover_subjects(data_root, ["306", "369"])]
    ds = MultiViewDataset(parsers, views=[0, 8, 15])
    assert len(ds) == 6
    item = ds[4]
    assert item["subject_id"] == "369" and item["view_index"] == 8 and item["subject_index"] == 1
    assert item["image"].shape == (200, 138, 3) and item["mask"].shape == (200, 138, 1)
    assert item["points"].shape == (10144, 3) and item["K"].shape == (3, 3)


def test_image_size_reads_the_header_and_names_a_bad_file(tmp_path):
    """One reader of image sizes serves the dataset, the VHAP preparer and the monocular loader: it reads
    (width, height) from the header and turns an unreadable file into the caller's one-line error."""
    from PIL import Image

    from fastavatar.data.image_files import image_size
    from fastavatar.data.prepare_vhap import PrepareError

    good = tmp_path / "view.png"
    Image.new("RGB", (7, 5)).save(good)
    assert image_size(good) == (7, 5)
    bad = tmp_path / "mask.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(PrepareError, match=r"mask\.png: cannot read mask"):
        image_size(bad, PrepareError, "mask")
