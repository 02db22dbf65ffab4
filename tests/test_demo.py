"""The README main job (scripts/demo.py), end to end at toy size: every promised output exists."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastavatar.io.ply import load_ply

REPO = Path(__file__).resolve().parents[1]


def _finite_scores(m):
    return all(math.isfinite(m[k]) for k in ("psnr", "ssim")) and m["psnr"] > 0 and 0 < m["ssim"] <= 1


def test_demo_script_end_to_end_tiny(tmp_path, data_root):
    pytest.importorskip("ai_edge_litert", reason='the demo starts from a photo: pip install -e ".[face]"')
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--data_root", str(data_root), "--image_scale", "0.125",
         "--template_iterations", "3", "--decoder_epochs", "1", "--decoder_hidden_dim", "16",
         "--decoder_body_layers", "1", "--w_steps", "2", "--mlp_steps", "2", "--pg_steps", "2", "--turntable_frames", "3",
         "--camera_steps", "2", "--output_dir", str(out), "--device", "cpu", "--render_backend", "torch"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "results on the 15 unseen views of subject 128" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["unseen_views"]) == {"template", "decoder_mean_w", "fit", "final", "photo_w_mlp", "photo"}
    assert all(_finite_scores(m) for m in summary["unseen_views"].values()), summary["unseen_views"]
    assert summary["per_gaussian"].startswith("2 steps")
    assert summary["input_view"] == "00000_08.png" and summary["num_unseen_views"] == 15
    recon = out / "reconstruction"
    assert load_ply(recon / "splats.ply")["means"].shape == (10144, 3)
    assert len(list((recon / "renders").glob("*.png"))) == 16
    assert (recon / "turntable.gif").stat().st_size > 0
    per_view = json.loads((recon / "per_view.json").read_text())
    assert [v["seen"] for v in per_view].count(True) == 1
    assert (out / "template.ply").is_file() and (out / "config.yaml").is_file()
    assert (out / "decoder_run" / "checkpoints" / "latest.pth").is_file()

    # the photo stage: a plain copy of the input view's image, reconstructed without calibration
    assert "from a plain photo" in proc.stdout and "photo mode " in proc.stdout
    photo = out / "photo"
    copied = photo / "photo_input" / "00000_08.png"
    assert copied.read_bytes() == (data_root / "128" / "images" / "00000_08.png").read_bytes()
    assert sorted(p.name for p in (photo / "photo_input").iterdir()) == ["00000_08.png"]  # the image alone
    assert load_ply(photo / "splats.ply")["means"].shape == (10144, 3)
    assert len(list((photo / "renders").glob("*.png"))) == 16
    assert (photo / "turntable.gif").stat().st_size > 0 and (photo / "input.png").is_file()
    photo_summary = json.loads((photo / "summary.json").read_text())
    assert photo_summary["photo"] == str(copied)
    assert photo_summary["initialisation"]["w"].startswith("mean_w") and photo_summary["timings_s"]["camera_refine"] > 0
    assert set(photo_summary["unseen_views"]) == {"template", "decoder_mean_w", "photo_w_mlp", "photo", "calibrated_fit"}
    assert photo_summary["unseen_views"]["photo"] == summary["unseen_views"]["photo"]
    # the photo-mode scores are of the photo head, not a copy of the calibrated ones
    assert summary["unseen_views"]["photo"]["psnr"] != summary["unseen_views"]["final"]["psnr"]
    for key in ("pnp_rotation_error_deg", "refined_rotation_error_deg"):
        assert math.isfinite(summary["photo_mode"][key]) and 0 <= summary["photo_mode"][key] < 30, summary["photo_mode"]
    assert photo_summary["alignment"]["rmse_m"] < 0.02  # Procrustes put the head on subject 128's points
    photo_per_view = json.loads((photo / "per_view.json").read_text())
    assert [v["seen"] for v in photo_per_view].count(True) == 1 and len(photo_per_view) == 16
    assert (photo / "template_landmarks_from_306_369.npz").is_file()


def test_demo_without_face_runtime_is_one_line(tmp_path, data_root):
    """Without ai-edge-litert the demo stops before any work with one line saying what to install."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    # a path hook that makes `import ai_edge_litert` fail, as on an install without the [face] extra
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ai_edge_litert' or name.startswith('ai_edge_litert.'):\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, _Block())\n")
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--data_root", str(data_root),
                           "--output_dir", str(out), "--device", "cpu"], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "ai-edge-litert" in lines[0] and 'pip install -e ".[face]"' in lines[0], proc.stderr
    assert "--no-photo" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()  # nothing was written or trained


def test_demo_refuses_an_earlier_demo_before_any_work(tmp_path, data_root):
    """A second demo into the same folder stops at once with one line naming --overwrite (not after the
    template stage, and without touching the earlier decoder)."""
    out = tmp_path / "demo"
    checkpoints = out / "decoder_run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "latest.pth").write_bytes(b"the earlier demo's decoder")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--data_root", str(data_root),
                           "--output_dir", str(out), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "earlier demo" in lines[0] and "--overwrite" in lines[0], proc.stderr
    assert "[demo] 1/5" not in proc.stdout and not (out / "template.ply").exists()
    assert (checkpoints / "latest.pth").read_bytes() == b"the earlier demo's decoder"
