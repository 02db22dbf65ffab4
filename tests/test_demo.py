"""The README main job (scripts/demo.py), end to end at toy size: every promised output exists."""

import json
import subprocess
import sys
from pathlib import Path

from fastavatar.io.ply import load_ply

REPO = Path(__file__).resolve().parents[1]


def test_demo_script_end_to_end_tiny(tmp_path, data_root):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--data_root", str(data_root), "--image_scale", "0.125",
         "--template_iterations", "3", "--decoder_epochs", "1", "--decoder_hidden_dim", "16",
         "--decoder_body_layers", "1", "--w_steps", "2", "--mlp_steps", "2", "--pg_steps", "2", "--turntable_frames", "3",
         "--output_dir", str(out), "--device", "cpu", "--render_backend", "torch"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "results on the 15 unseen views of subject 128" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["unseen_views"]) == {"template", "decoder_mean_w", "fit", "final"}
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
