"""Camera-free photo mode end to end at toy size (a tiny decoder the test builds), plus the framing maths."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ai_edge_litert", reason='the photo mode needs the [face] extra: pip install -e ".[face]"')

from fastavatar.data import SubjectParser  # noqa: E402
from fastavatar.eval.photo_protocol import cameras_into_source_frame, similarity_to  # noqa: E402
from fastavatar.face.framing import TRAINING_FOCAL, TRAINING_HEAD_DEPTH, framing_similarity  # noqa: E402
from fastavatar.face.pose import PhotoCamera, rotation_error_deg  # noqa: E402
from fastavatar.io.checkpoints import save_decoder_checkpoint  # noqa: E402
from fastavatar.io.ply import load_ply  # noqa: E402
from fastavatar.models.decoder import DecoderConfig, GaussianDecoder  # noqa: E402
from fastavatar.train.template import initial_splats  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory, data_root):
    """A small decoder on subject 306's points (the held-out photo is subject 128), output layers non-zero."""
    parser = SubjectParser(data_root / "306", image_scale=0.125)
    decoder = GaussianDecoder(initial_splats(parser), DecoderConfig(hidden_dim=16, body_layers=2, init="zero_out"))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for head in decoder.conditioning_mlp.heads().values():
            head[-1].weight.copy_(torch.randn(head[-1].weight.shape, generator=gen) * 0.01)
    path = tmp_path_factory.mktemp("ckpt") / "decoder.pth"
    save_decoder_checkpoint(path, decoder, torch.randn(2, 512, generator=torch.Generator().manual_seed(0)) * 0.1,
                            {"306": 0, "369": 1}, epoch=1, global_step=1, config={})
    return path


def test_framing_puts_the_head_where_training_views_do():
    # a camera 0.6 m in front of a head at the origin, focal 900 px on a 600x800 photo
    w2c = np.eye(4)
    w2c[2, 3] = 0.6
    cam = PhotoCamera(w2c=w2c, K=np.array([[900.0, 0, 300], [0, 900.0, 400], [0, 0, 1]]), width=600, height=800,
                      reprojection_px=0.0, inliers=0)
    A, K, size = framing_similarity(cam, np.zeros(3), image_scale=0.5)
    assert size == (275, 401)
    # pixels per metre at the head equal the training views' (focal / depth), at this scale
    assert K[0, 0] / 0.6 == pytest.approx(0.5 * TRAINING_FOCAL / TRAINING_HEAD_DEPTH)
    # the photo's head pixel maps to the framed head pixel, and K is the photo's K through A
    head_photo = np.array([300.0, 400.0])
    assert np.allclose(A[:, :2] @ head_photo + A[:, 2], [137.5, 180.0])
    assert np.allclose(K[:2, 2], A[:, :2] @ cam.K[:2, 2] + A[:, 2])


def test_cameras_into_source_frame_render_the_same_projection():
    rng = np.random.default_rng(0)
    src = rng.normal(scale=0.1, size=(50, 3))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    R = q * np.sign(np.linalg.det(q))
    s, t = 1.3, np.array([0.1, -0.2, 0.05])
    dst = s * src @ R.T + t
    s2, R2, t2 = similarity_to(src, dst)
    assert s2 == pytest.approx(s) and np.allclose(R2, R) and np.allclose(t2, t)
    c2w = np.eye(4)[None].copy()
    c2w[0, :3, 3] = [0.0, 0.0, -1.5]
    moved = cameras_into_source_frame(c2w, s, R, t)

    def proj(c, X):
        w2c = np.linalg.inv(c)
        x = X @ w2c[:3, :3].T + w2c[:3, 3]
        return x[:, :2] / x[:, 2:]

    assert np.allclose(proj(moved[0], src), proj(c2w[0], dst))


@pytest.mark.slow
def test_photo_mode_end_to_end_tiny(tiny_decoder, data_root, tmp_path):
    photo = tmp_path / "photo.png"
    shutil.copyfile(data_root / "128" / "images" / "00000_08.png", photo)  # the image alone
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "scripts" / "inference_feedforward_full_guidance.py"), "--image", str(photo),
           "--decoder_checkpoint", str(tiny_decoder), "--image_scale", "0.1", "--camera_steps", "3", "--w_steps", "2",
           "--mlp_steps", "2", "--w_lr", "1e-2", "--mlp_lr", "1e-3", "--pg_steps", "2", "--ring_views", "3",
           "--turntable_frames", "2", "--output_dir", str(out), "--device", "cpu",
           "--encoder_checkpoint", str(tmp_path / "no_encoder.pth"), "--dino_checkpoint", str(tmp_path / "no_dino.pth")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    run = out / "photo"
    for name in ("input.png", "matte.png", "input_vs_render.png", "ring.png", "turntable.gif", "camera.json",
                 "summary.json", "w_initial.npy", "w_final.npy"):
        assert (run / name).is_file(), name
    assert (out / "config.yaml").is_file()
    initial, final = load_ply(run / "initial" / "splats.ply"), load_ply(run / "final" / "splats.ply")
    assert initial["means"].shape == final["means"].shape == (10144, 3)
    assert not torch.allclose(initial["sh0"], final["sh0"])  # refinement changed the head
    summary = json.loads((run / "summary.json").read_text())
    init = summary["initialisation"]
    assert init["w"].startswith("mean_w (no W-encoder checkpoint") and init["points"].startswith("template (no tracker")
    assert "W from mean_w" in res.stdout and "points from template" in res.stdout
    for stage in ("face", "camera_pnp_and_framing", "camera_refine", "w", "mlp", "per_gaussian", "photo_to_splats"):
        assert stage in summary["timings_s"]
    # the PnP camera of subject 128's frontal view, against its true camera (template frame ~ world frame
    # up to the subjects' head poses, a few degrees apart)
    parser = SubjectParser(data_root / "128")
    pnp = np.array(summary["camera"]["pnp"]["c2w"])
    assert rotation_error_deg(pnp[:3, :3], parser.c2w[8].double().numpy()[:3, :3]) < 15.0
    w, h = _image_size(run / "input.png")
    assert (w, h) == (55, 80)


def _image_size(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def _script_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("full_guidance_script",
                                                  REPO / "scripts" / "inference_feedforward_full_guidance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_bad_photo_inputs_are_one_line(tiny_decoder, tmp_path, capsys):
    from PIL import Image

    main = _script_main()
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(noise)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    cases = [
        (["--image", str(tmp_path / "missing.jpg"), "--decoder_checkpoint", str(tiny_decoder)], "file not found"),
        (["--image", str(noise), "--decoder_checkpoint", str(tmp_path / "nope.pth")], "decoder checkpoint not found"),
        (["--image", str(noise), "--sample_id", "306", "--decoder_checkpoint", str(tiny_decoder)], "replaces --sample_id"),
        (["--image", str(tmp_path), "--decoder_checkpoint", str(tiny_decoder), "--image_scale", "0.1",
          "--output_dir", str(tmp_path / "o"), "--device", "cpu"], "no photo could be reconstructed"),
    ]
    for args, message in cases:
        assert main(args) == 1, args
        captured = capsys.readouterr()
        err_lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
        assert len(err_lines) == 1 and message in err_lines[0], (args, captured.err[-1000:])
        assert "Traceback" not in captured.err
    # the folder case said why each photo was skipped, one line each
    assert "noise.png: no face found" in captured.out and "broken.jpg: not an image file" in captured.out


@pytest.mark.slow
def test_initialisation_uses_official_models_when_present(tiny_decoder, tmp_path, data_root):
    """With a W encoder, buffalo_l and a tracker on disk (tiny stand-ins), W comes from the encoder and the
    points and a cross-check pose from the tracker; without them, the mean W and the template points."""
    from face_fixtures import build_tiny_buffalo
    from official_layout import tiny_tracker_config

    from fastavatar.face.images import load_rgb
    from fastavatar.inference.photo import PhotoConfig, initialise
    from fastavatar.io.checkpoints import load_decoder, save_tracker_checkpoint, save_w_encoder_checkpoint
    from fastavatar.models.tracker import DinoTracker
    from fastavatar.models.w_encoder import WEncoder

    decoder, w_vectors, _ = load_decoder(tiny_decoder)
    save_w_encoder_checkpoint(tmp_path / "encoder.pth", WEncoder().eval(), 1, 1)
    save_tracker_checkpoint(tmp_path / "dino.pth", DinoTracker(tiny_tracker_config(decoder.num_gaussians)), 0, 0,
                            config={})
    buffalo = build_tiny_buffalo(tmp_path / "buffalo_l")
    image = load_rgb(data_root / "128" / "images" / "00000_08.png")
    cfg = PhotoConfig(encoder_checkpoint=str(tmp_path / "encoder.pth"), dino_checkpoint=str(tmp_path / "dino.pth"),
                      insightface_root=str(buffalo))
    init = initialise(cfg, decoder, w_vectors, image, torch.device("cpu"))
    assert init.w_source == "encoder" and init.points_source == "tracker"
    assert init.points.shape == (decoder.num_gaussians, 3) and init.tracker_c2w.shape == (4, 4)
    assert not torch.allclose(init.w, w_vectors.mean(0, keepdim=True))
    bare = initialise(PhotoConfig(encoder_checkpoint=str(tmp_path / "none.pth"),
                                  dino_checkpoint=str(tmp_path / "none.pth")), decoder, w_vectors, image,
                      torch.device("cpu"))
    assert bare.w_source.startswith("mean_w (no W-encoder checkpoint") and bare.points_source.startswith("template")
    torch.testing.assert_close(bare.w, w_vectors.mean(0, keepdim=True))
    torch.testing.assert_close(bare.points, decoder.template_means)


@pytest.mark.slow
def test_camera_stage_recovers_a_small_pose_error():
    """refine_camera pulls a camera rotated by 3 degrees back towards the one that rendered the target
    (regression: the pose had a zero gradient at the start)."""
    from fastavatar.core.cameras import look_at_c2w
    from fastavatar.inference.photo import CameraFitConfig, PhotoConfig, camera_c2w_K, refine_camera
    from fastavatar.inference.refine import FitConfig
    from fastavatar.render import render_splats

    gen = torch.Generator().manual_seed(0)
    n = 400
    splats = {"means": torch.randn(n, 3, generator=gen) * 0.06, "quats": torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
              "scales": torch.full((n, 3), -4.0), "opacities": torch.full((n,), 2.0),
              "sh0": torch.randn(n, 1, 3, generator=gen), "shN": torch.zeros(n, 15, 3)}
    true_c2w = look_at_c2w(torch.tensor([0.0, 0.0, 1.0]), torch.zeros(3), torch.tensor([0.0, -1.0, 0.0]))
    K = torch.tensor([[80.0, 0, 24], [0, 80.0, 24], [0, 0, 1]])
    target = render_splats(splats, true_c2w, K, 48, 48, backend="torch").rgb[0]
    start, _ = camera_c2w_K(true_c2w, K, torch.tensor([0.0, 0.05, 0.0]), torch.zeros(3), torch.zeros(()))
    cfg = PhotoConfig(camera=CameraFitConfig(camera_steps=40, camera_lr=3e-3, landmark_weight=0.0),
                      fit=FitConfig(ssim_weight=0.0, lpips_weight=0.0, render_backend="torch"))
    c2w, _, losses = refine_camera(splats, target, start, K, 48, 48, torch.zeros(1, 3), torch.zeros(1, 2), cfg,
                                   show_progress=False)
    before = rotation_error_deg(start[:3, :3].double().numpy(), true_c2w[:3, :3].double().numpy())
    after = rotation_error_deg(c2w[:3, :3].double().numpy(), true_c2w[:3, :3].double().numpy())
    assert before == pytest.approx(2.86, abs=0.05)
    assert after < 0.5 * before and losses[-1] < losses[0]
