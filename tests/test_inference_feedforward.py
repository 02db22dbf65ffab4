"""End-to-end feed-forward inference on CPU with checkpoints and face models the test builds."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from face_fixtures import build_tiny_buffalo, insightface_sample_image
from fastavatar.io.checkpoints import save_decoder_checkpoint, save_tracker_checkpoint, save_w_encoder_checkpoint
from fastavatar.data import SubjectParser
from fastavatar.inference.feedforward import (
    FeedForwardConfig,
    MissingFileError,
    main,
    predicted_intrinsics,
    run,
    splat_statistics,
)
from fastavatar.models.decoder import GaussianDecoder
from fastavatar.models.tracker import DinoTracker, TrackerConfig
from fastavatar.models.vit import ViTConfig
from fastavatar.models.w_encoder import WEncoder
from fastavatar.io.ply import load_ply

N = 10144


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.one_torch_thread


def tiny_tracker_config() -> TrackerConfig:
    vit = ViTConfig(img_size=224, patch_size=14, embed_dim=32, depth=2, num_heads=2)
    return TrackerConfig(vit=vit, hidden_dim=32, dropout=0.0)


def build_checkpoints(folder, points: torch.Tensor):
    """Random official-layout decoder / W-encoder / tiny-ViT tracker checkpoints in ``folder``."""
    torch.manual_seed(0)
    template = {
        "means": points.clone(),
        "quats": torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(N, 1),
        "scales": torch.full((N, 3), math.log(0.004)),
        "opacities": torch.full((N,), 2.0),
        "sh0": torch.rand(N, 1, 3) - 0.5,
        "shN": torch.zeros(N, 15, 3),
    }
    decoder = GaussianDecoder(template)
    w_vectors = torch.randn(3, 512)
    save_decoder_checkpoint(folder / "decoder.pth", decoder, w_vectors, {"128": 0, "306": 1, "369": 2}, 1, 1)
    save_w_encoder_checkpoint(folder / "encoder.pth", WEncoder().eval(), 1, 1)
    tracker = DinoTracker(tiny_tracker_config())
    tracker.set_mean_shape(points)
    save_tracker_checkpoint(folder / "dino.pth", tracker, 1, 1)
    return folder / "encoder.pth", folder / "decoder.pth", folder / "dino.pth"


@pytest.fixture(scope="module")
def assets(tmp_path_factory, data_root):
    folder = tmp_path_factory.mktemp("ff_assets")
    points = SubjectParser(data_root / "306").points
    enc, dec, dino = build_checkpoints(folder, points)
    buffalo = build_tiny_buffalo(folder / "buffalo_l")
    return {"encoder": enc, "decoder": dec, "dino": dino, "buffalo": buffalo, "points": points}


def _argv(assets, image, out, *extra):
    return [
        "--image", str(image), "--output_dir", str(out), "--device", "cpu",
        "--encoder_checkpoint", str(assets["encoder"]), "--decoder_checkpoint", str(assets["decoder"]),
        "--dino_checkpoint", str(assets["dino"]), "--insightface_root", str(assets["buffalo"]),
        "--render_max_side", "48", "--num_novel_views", "3", "--render_backend", "torch", *extra,
    ]


def test_single_photo_writes_every_output(assets, data_root, tmp_path):
    out = tmp_path / "out"
    photo = data_root / "306" / "images" / "00000_08.png"
    assert main(_argv(assets, photo, out)) == 0

    splats = load_ply(out / "splats.ply")
    assert splats["means"].shape == (N, 3) and splats["shN"].shape == (N, 15, 3)
    w = np.load(out / "w_vector.npy")
    points = np.load(out / "dino_points.npy")
    pose = np.load(out / "dino_camera_pose.npy")
    assert w.shape == (1, 512) and points.shape == (N, 3) and pose.shape == (1, 4, 4)
    assert np.isfinite(w).all() and np.isfinite(points).all()
    # The tracker's mean shape is the subject's points, so predictions stay near them, and the
    # splat means are those points plus the decoder's bounded delta (|delta| <= 0.1).
    assert np.abs(points - assets["points"].numpy()).max() < 1.0
    delta = splats["means"].numpy() - points
    assert np.abs(delta).max() <= 0.1 + 1e-5
    rot = pose[0, :3, :3]
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-4)
    np.testing.assert_allclose(pose[0, 3], [0, 0, 0, 1])

    summary = json.loads((out / "summary.json").read_text())
    for key in ("image_path", "w_vector_shape", "dino_points_shape", "num_gaussians", "splat_statistics",
                "timings_s", "versions", "camera", "face", "images"):
        assert key in summary, key
    assert summary["num_gaussians"] == N and summary["dino_points_shape"] == [N, 3]
    stats = summary["splat_statistics"]
    assert set(stats) == {"means_std", "scales_mean", "opacities_mean"}
    assert stats == pytest.approx(splat_statistics(load_ply(out / "splats.ply")), rel=1e-4)
    for stage in ("load_image", "face_embedding", "tracker", "face_and_tracker_wall", "encoder", "decoder", "export",
                  "render"):
        assert summary["timings_s"][stage] >= 0.0, stage
    for dist in ("torch", "fastavatar", "gsplat", "onnxruntime"):
        assert dist in summary["versions"]
    assert summary["face"]["selection"] == "largest"

    images = sorted(p.name for p in (out / "images").iterdir())
    assert images == ["input_vs_render.png", "novel_00.png", "novel_01.png", "novel_02.png", "predicted_view.png"]
    view = np.asarray(Image.open(out / "images" / "predicted_view.png"))
    assert view.shape == (48, 33, 3)  # 550x802 aspect, longer side 48
    pair = np.asarray(Image.open(out / "images" / "input_vs_render.png"))
    assert pair.shape == (48, 66, 3)


def test_no_save_ply_and_no_render(assets, tmp_path):
    out = tmp_path / "out"
    photo = insightface_sample_image("Tom_Hanks_54745.png")
    assert main(_argv(assets, photo, out, "--no-save_ply", "--no-render")) == 0
    assert not (out / "splats.ply").exists() and not (out / "images").exists()
    assert (out / "w_vector.npy").is_file()
    assert json.loads((out / "summary.json").read_text())["ply_rows_written"] is None


def test_batch_mode_skips_corrupt_photo(assets, data_root, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(data_root / "306" / "images" / "00000_08.png", photos / "a_good.png")
    shutil.copy(insightface_sample_image("Tom_Hanks_54745.png"), photos / "c_good.png")
    (photos / "b_broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg at all")
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(photos / "d_noface.png")
    out = tmp_path / "out"
    assert main(_argv(assets, photos, out, "--no-render")) == 0
    assert (out / "a_good" / "splats.ply").is_file() and (out / "c_good" / "summary.json").is_file()
    assert not (out / "b_broken").exists() and not (out / "d_noface").exists()
    batch = json.loads((out / "batch_summary.json").read_text())
    assert [f["image"].split("/")[-1] for f in batch["failed"]] == ["b_broken.jpg", "d_noface.png"]
    assert len(batch["ok"]) == 2
    err = capsys.readouterr().err
    assert "b_broken.jpg" in err and "d_noface.png: no face detected" in err


def test_missing_checkpoint_is_one_clear_line(assets, tmp_path, capsys):
    argv = _argv(assets, insightface_sample_image("t1.jpg"), tmp_path / "o")
    argv[argv.index("--dino_checkpoint") + 1] = str(tmp_path / "nope" / "dino_encoder.pth")
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "dino_encoder.pth" in err and "pretrained_weights" in err
    with pytest.raises(MissingFileError):
        run(FeedForwardConfig(image=str(insightface_sample_image("t1.jpg")),
                              encoder_checkpoint=tmp_path / "x.pth", decoder_checkpoint=assets["decoder"],
                              dino_checkpoint=assets["dino"], insightface_root=str(assets["buffalo"])))


def test_missing_face_models_is_one_clear_line(assets, tmp_path, capsys):
    argv = _argv(assets, insightface_sample_image("t1.jpg"), tmp_path / "o")
    argv[argv.index("--insightface_root") + 1] = str(tmp_path / "empty")
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "det_10g.onnx" in err and "w600k_r50.onnx" in err and "\n" not in err


def test_predicted_intrinsics_is_nersemble_camera_at_550x802():
    K = predicted_intrinsics(550, 802)
    assert K[0, 0] == pytest.approx(2048.7) and K[1, 1] == pytest.approx(2048.7)
    assert K[0, 2] == pytest.approx(275.0) and K[1, 2] == pytest.approx(401.0)
    K2 = predicted_intrinsics(1100, 802)
    assert K2[0, 0] == pytest.approx(2 * 2048.7) and K2[1, 1] == pytest.approx(2048.7)


def test_script_help_runs():
    out = subprocess.run([sys.executable, "scripts/inference_feedforward_no_guidance.py", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for flag in ("--image", "--encoder_checkpoint", "--decoder_checkpoint", "--dino_checkpoint", "--output_dir",
                 "--device", "--seed", "--no-save_ply", "--insightface_root", "--num_novel_views"):
        assert flag in out.stdout, flag


def test_benchmark_reports_every_stage(assets):
    from fastavatar.bench.inference import BenchmarkConfig, benchmark

    out = benchmark(BenchmarkConfig(encoder_checkpoint=assets["encoder"], decoder_checkpoint=assets["decoder"],
                                    dino_checkpoint=assets["dino"], insightface_root=str(assets["buffalo"]),
                                    device="cpu", repeats=2, warmup=1))
    assert out["weights"] == "checkpoints" and out["notes"] == []
    medians = out["median_s"]
    for stage in ("face_embedding", "tracker", "encoder", "decoder", "export", "torch_stages", "end_to_end",
                  "end_to_end_overlapped"):
        assert medians[stage] is not None and medians[stage] > 0.0, stage
    assert medians["end_to_end"] >= medians["torch_stages"]
    json.dumps(out)  # serialisable


@pytest.mark.slow
def test_benchmark_random_weights_full_size(tmp_path):
    from fastavatar.bench.inference import BenchmarkConfig, benchmark

    out = benchmark(BenchmarkConfig(encoder_checkpoint=tmp_path / "e.pth", decoder_checkpoint=tmp_path / "d.pth",
                                    dino_checkpoint=tmp_path / "t.pth", insightface_root=str(tmp_path / "none"),
                                    device="cpu", repeats=1, warmup=0))
    assert out["weights"] == "random"
    assert any("random weights" in n for n in out["notes"]) and any("face stage not timed" in n for n in out["notes"])
    assert out["median_s"]["face_embedding"] is None and out["median_s"]["tracker"] > 0


def test_overlapped_face_stage_gives_identical_results(assets, data_root):
    from fastavatar.inference.feedforward import load_models, run_photo

    models = load_models(assets["encoder"], assets["decoder"], assets["dino"], str(assets["buffalo"]))
    photo = data_root / "128" / "images" / "00000_08.png"
    a = run_photo(models, photo, overlap=True)
    b = run_photo(models, photo, overlap=False)
    np.testing.assert_array_equal(a.face.embedding, b.face.embedding)
    assert torch.equal(a.w, b.w) and torch.equal(a.points, b.points)
    assert torch.equal(a.splats["means"], b.splats["means"])
    assert "face_and_tracker_wall" in a.timings and a.timings["face_embedding"] > 0
