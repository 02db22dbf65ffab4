"""animate.py with a tracked sequence: side-by-side video and per-frame PSNR/SSIM/LPIPS against its frames."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fastavatar.animate import build_rig, evaluate_rig, save_rig
from fastavatar.animate.compare import CompareConfig, compare_with_sequence
from fastavatar.core.cameras import look_at_c2w
from fastavatar.data.monocular import load_monocular_sequence
from fastavatar.flame import flame_forward
from fastavatar.io.ply import save_ply
from fastavatar.render import render_splats
from flame_fixtures import make_tiny_flame, splats_on_mesh
from monocular_fixtures import write_vhap

pytestmark = pytest.mark.usefixtures("one_torch_thread")
S = 24


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seq")
    model = make_tiny_flame()
    splats = splats_on_mesh(flame_forward(model).vertices[0], model.faces)
    rig = build_rig(model, splats, {}, rest_mode="mesh").to(torch.float32)
    c2w = look_at_c2w(torch.tensor([0.0, 0.0, 0.6]), torch.zeros(3), torch.tensor([0.0, 1.0, 0.0]))
    K = torch.tensor([[S * 2.0, 0, S / 2], [0, S * 2.0, S / 2], [0, 0, 1]])
    g = torch.Generator().manual_seed(0)
    frames = [{"expr": torch.randn(1, 3, generator=g), "jaw_pose": torch.tensor([[0.1 * i, 0.0, 0.0]]),
               "rotation": torch.zeros(1, 3), "neck_pose": torch.zeros(1, 3), "eyes_pose": torch.zeros(1, 6),
               "translation": torch.zeros(1, 3)} for i in range(3)]
    images, masks = [], []
    for p in frames:
        out = render_splats(evaluate_rig(rig, p), c2w, K, S, S, background=(0.0, 0.0, 0.0), backend="torch")
        alpha = out.alpha[0]
        images.append((out.rgb[0] / alpha.clamp_min(1e-6)).clamp(0, 1))  # a matted frame: colour, and alpha as mask
        masks.append(alpha)
    seq = write_vhap(tmp / "seq", images, masks, frames, [c2w] * 3, K, rig.shape.reshape(1, -1))
    save_ply(tmp / "splats.ply", {k: v.float() for k, v in splats.items()})
    save_rig(tmp / "rig.npz", rig)
    return rig, seq, tmp


def test_compare_scores_every_frame_and_writes_side_by_side(tracked, tmp_path):
    import imageio.v3 as iio

    rig, seq, _ = tracked
    summary = compare_with_sequence(rig, load_monocular_sequence(seq), tmp_path, CompareConfig(render_backend="torch"))
    rows = json.loads(Path(summary["per_frame"]).read_text())
    assert [r["frame"] for r in rows] == ["00000_00", "00001_00", "00002_00"]
    # truth was rendered by this rig: only PNG quantisation and the mask's 8 bits remain
    assert all(r["psnr"] > 35 and r["ssim"] > 0.97 for r in rows) and summary["mean_psnr"] > 35
    video = iio.imread(summary["video"], index=None)
    assert video.shape[0] == 3 and video.shape[2] // 2 * 2 >= 2 * S - 1  # ground truth | render
    # a wrong rig (no expression / jaw) scores lower on the frames that move
    frozen = compare_with_sequence(rig.truncated(0), load_monocular_sequence(seq), tmp_path / "frozen",
                                   CompareConfig(render_backend="torch"))
    assert frozen["mean_psnr"] < summary["mean_psnr"] - 3


def test_animate_script_with_a_tracked_sequence(tracked, tmp_path):
    rig, seq, tmp = tracked
    spec = importlib.util.spec_from_file_location("animate", Path(__file__).resolve().parents[1] / "scripts" / "animate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--splats", str(tmp / "splats.ply"), "--flame_params", str(seq), "--output_dir", str(tmp_path),
                     "--render_backend", "torch"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_frames"] == 3 and summary["compare"]["mean_psnr"] > 35
    assert Path(summary["compare"]["video"]).is_file() and (tmp_path / "per_frame.json").is_file()
