"""Camera-free face stage on real photos: detection, landmarks, matte, and the bad-photo paths.

Reference values for the astronaut come from running the real mediapipe 0.10.21 package
(``shared/spec/environment-probes.md`` §7), not from this code.
"""

import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ai_edge_litert", reason='the face stage needs the [face] extra: pip install -e ".[face]"')

from face_fixtures import insightface_sample_image  # noqa: E402
from fastavatar.face.embedding import FaceError  # noqa: E402
from fastavatar.face.images import load_rgb  # noqa: E402
from fastavatar.face.landmarks import (  # noqa: E402
    FACE_MESH_NOSE_TIP,
    FaceRuntimeMissingError,
    FaceStage,
    FaceStageConfig,
    Roi,
    blazeface_anchors,
    box_iou,
    weighted_nms,
    FULL_RANGE_ANCHORS,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# mediapipe 0.10.21 on skimage.data.astronaut(): box px [x177, y82, w95, h95], score 0.922, face-mesh nose tip (223, 130)
MP_BOX = np.array([177.0, 82.0, 177.0 + 95.0, 82.0 + 95.0])
MP_SCORE = 0.922
MP_NOSE = np.array([223.0, 130.0])
MP_KEYPOINTS = np.array([[201, 105], [246, 109], [220, 127], [220, 149], [178, 116], [272, 124]], dtype=float)


@pytest.fixture(scope="module")
def stage():
    return FaceStage()


@pytest.fixture(scope="module")
def astronaut():
    skimage_data = pytest.importorskip("skimage.data")
    return skimage_data.astronaut()


def test_anchor_layouts():
    assert blazeface_anchors(128).shape == (896, 2)
    assert blazeface_anchors(192, FULL_RANGE_ANCHORS).shape == (2304, 2)
    a = blazeface_anchors(128)
    # first cell of the 16x16 map holds 2 anchors at its centre, the 8x8 map 6 per cell
    assert np.allclose(a[0], a[1]) and np.allclose(a[0], [1 / 32, 1 / 32])
    assert np.allclose(a[512], a[517]) and np.allclose(a[512], [1 / 16, 1 / 16])


def test_weighted_nms_blends_overlaps_and_keeps_separate_faces():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]], dtype=float)
    kps = np.zeros((3, 6, 2))
    kps[1] += 1.0
    out = weighted_nms(boxes, kps, np.array([0.9, 0.3, 0.8]), 0.3)
    assert len(out) == 2
    box, k, score = out[0]
    assert score == pytest.approx(0.9)
    assert box[0] == pytest.approx(0.3 / 1.2)  # score-weighted mean of x0 = 0 and 1
    assert k[0, 0] == pytest.approx(0.3 / 1.2)
    assert box_iou(out[1][0], boxes[2:])[0] == pytest.approx(1.0)


def test_roi_maps_crop_centre_to_centre_and_rotates():
    roi = Roi(center=np.array([100.0, 50.0]), size=40.0, angle=np.pi / 2)
    m = roi.crop_to_image(192)
    assert np.allclose(m[:, :2] @ [96, 96] + m[:, 2], [100, 50])
    # crop +x (towards the right edge) maps to image +y when the ROI is rotated by 90 degrees
    right = m[:, :2] @ [192, 96] + m[:, 2]
    assert np.allclose(right, [100, 70])


def test_astronaut_matches_mediapipe(stage, astronaut):
    obs = stage.analyse(astronaut, "astronaut")
    det = obs.detection
    assert obs.num_faces == 1 and not obs.warnings
    assert box_iou(det.box, MP_BOX[None])[0] > 0.9
    assert abs(det.score - MP_SCORE) < 0.005
    # keypoints are blended over overlapping anchors; within 10 px of mediapipe's on a 95 px face
    assert np.abs(det.keypoints - MP_KEYPOINTS).max() < 10.0
    assert obs.landmarks.shape == (468, 3)
    assert np.linalg.norm(obs.landmarks[FACE_MESH_NOSE_TIP, :2] - MP_NOSE) < 3.0
    assert obs.landmark_score > 0.9
    assert obs.matte.shape == astronaut.shape[:2] and 0.0 <= obs.matte.min() and obs.matte.max() <= 1.0
    # the person is foreground, the top-left corner (sky/flag background) is not
    assert obs.matte[130, 225] > 0.9 and obs.matte[5, 5] < 0.1


def test_bundled_views_detect_and_matte_agrees_with_masks(stage, data_root):
    ious, faces = [], 0
    for subject in ("128", "306", "369"):
        for view in (0, 8, 12):
            path = data_root / subject / "images" / f"00000_{view:02d}.png"
            image = load_rgb(path)
            obs = stage.analyse(image.rgb, str(path))
            faces += obs.num_faces == 1
            gt = np.asarray(Image.open(data_root / subject / "fg_masks" / path.name).convert("L")) > 127
            pred = obs.matte > 0.5
            ious.append((gt & pred).sum() / (gt | pred).sum())
    assert faces == 9
    # measured over all 48 views: IoU 0.57-0.92 (median 0.72); the selfie model cuts hair and shoulders differently
    assert min(ious) > 0.5 and np.median(ious) > 0.65


def test_group_photo_uses_largest_face_and_says_so(stage):
    path = insightface_sample_image("t1.jpg")
    obs = stage.analyse(load_rgb(path).rgb, str(path), with_matte=False)
    assert obs.num_faces >= 3
    assert any("faces found; using the largest" in w for w in obs.warnings)
    areas = [d.area for d in stage.detect(load_rgb(path).rgb)]
    assert obs.detection.area == pytest.approx(max(areas))


def test_small_aligned_crop_photo(stage):
    path = insightface_sample_image("Tom_Hanks_54745.png")  # 112x112 aligned face
    obs = stage.analyse(load_rgb(path).rgb, str(path), with_matte=False)
    assert obs.landmark_score > 0.5
    nose = obs.landmarks[FACE_MESH_NOSE_TIP, :2]
    assert 30 < nose[0] < 80 and 40 < nose[1] < 90


def test_no_face(stage):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)
    with pytest.raises(FaceError, match="noise.png: no face found"):
        stage.analyse(noise, "noise.png")


def test_face_too_small(astronaut):
    small = FaceStage(FaceStageConfig(min_face_px=120))  # the astronaut's face is ~93 px
    with pytest.raises(FaceError, match=r"astronaut: the face is only 9\d px across; need at least 120 px"):
        small.analyse(astronaut, "astronaut")


def test_landmarks_fail_says_so(stage, astronaut):
    # a crop with no face in it: the landmark model's own presence score is low
    _, score = stage.landmarks_in_roi(astronaut, Roi(center=np.array([60.0, 450.0]), size=80.0, angle=0.0))
    assert score < 0.5
    strict = FaceStage(FaceStageConfig(min_landmark_score=1.01))
    with pytest.raises(FaceError, match="landmarks failed .*extreme profile"):
        strict.analyse(astronaut, "astronaut")


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "exif"])
def test_unusual_image_files(stage, astronaut, tmp_path, mode):
    upright = stage.detect(astronaut)[0].box
    path = tmp_path / f"a_{mode.replace(';', '')}.png"
    if mode == "L":
        Image.fromarray(astronaut).convert("L").save(path)
    elif mode == "RGBA":
        rgba = np.concatenate([astronaut, np.full(astronaut.shape[:2] + (1,), 255, np.uint8)], axis=2)
        Image.fromarray(rgba, "RGBA").save(path)
    elif mode == "I;16":
        gray16 = (np.asarray(Image.fromarray(astronaut).convert("L"), dtype=np.uint16) * 257)
        Image.fromarray(gray16).save(path)
    else:  # pixels stored rotated, EXIF orientation 6 says "rotate 90 degrees clockwise to display"
        path = tmp_path / "a_exif.jpg"
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(np.rot90(astronaut, 1)).save(path, exif=exif, quality=95)
    image = load_rgb(path)
    obs = stage.analyse(image.rgb, str(path), with_matte=False)
    assert box_iou(obs.detection.box, upright[None])[0] > 0.8


def test_runtime_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    with pytest.raises(FaceRuntimeMissingError, match=r'pip install -e "\.\[face\]"'):
        FaceStage()
