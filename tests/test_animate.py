"""Rigging, Gaussian blendshapes, SH rotation, rig I/O, sequences and the animate/build_rig scripts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastavatar.animate import (
    AnimateConfig,
    DemoSequenceConfig,
    RigError,
    bind_splats,
    build_rig,
    demo_sequence,
    evaluate_rig,
    evaluate_rig_reference,
    load_flame_sequence,
    pack_rig,
    load_rig,
    mesh_rig_splats,
    render_sequence,
    rotate_sh,
    save_rig,
)
from fastavatar.animate.binding import sh_basis_rest
from fastavatar.core.sh import eval_sh, sh_basis
from fastavatar.core.cameras import look_at_c2w
from fastavatar.flame import flame_forward
from fastavatar.flame.points import triangle_centres
from fastavatar.render import render_splats
from fastavatar.core.rotations import matrix_to_quat, quat_multiply, quat_to_matrix
from flame_fixtures import make_tiny_flame, random_params, save_tiny_flame_npz, splats_on_mesh

W, H = 40, 48


@pytest.fixture(scope="module")
def scene():
    model = make_tiny_flame()
    params = random_params(model, seed=11)
    src = flame_forward(model, **params).vertices[0]
    splats = splats_on_mesh(src, model.faces)
    anchors = triangle_centres(src, model.faces)
    rig = build_rig(model, splats, params, anchors=anchors)
    rig_mesh = build_rig(model, splats, params, anchors=anchors, rest_mode="mesh")
    return {"model": model, "params": params, "src": src, "splats": splats, "anchors": anchors,
            "rig": rig.to(torch.float32), "rig_mesh": rig_mesh.to(torch.float32)}


def _camera(centre, angle=0.0):
    eye = centre + 0.6 * torch.tensor([math.sin(angle), 0.1, math.cos(angle)])
    c2w = look_at_c2w(eye, centre, torch.tensor([0.0, 1.0, 0.0]))
    K = torch.tensor([[60.0, 0, W / 2], [0, 60.0, H / 2], [0, 0, 1]])
    return c2w, K


def _render(splats, c2w, K):
    return render_splats({k: v.float() for k, v in splats.items()}, c2w, K, W, H, backend="torch").rgb[0]


def _psnr(a, b):
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else -10 * math.log10(mse)


def _quat_angle(a, b):
    """Rotation angle between quaternions (chord form: accurate near 0 in float32, sign-free)."""
    a, b = F.normalize(a.double(), dim=-1), F.normalize(b.double(), dim=-1)
    chord = torch.minimum((a - b).norm(dim=-1), (a + b).norm(dim=-1))
    return 4 * torch.asin((chord / 2).clamp(max=1))


# ------------------------------------------------------------------ binding


def test_index_binding_detected(scene):
    rig = scene["rig"]
    assert rig.binding_mode == "index" and rig.index_max_error < 1e-9
    assert torch.equal(rig.triangle_ids, torch.arange(rig.num_gaussians))


def test_nearest_binding_when_index_check_fails(scene):
    model, src, splats = scene["model"], scene["src"], scene["splats"]
    shuffled = scene["anchors"][torch.randperm(model.num_faces, generator=torch.Generator().manual_seed(0))]
    binding = bind_splats(splats, src, model.faces, anchors=shuffled)
    assert binding.mode == "nearest" and binding.index_max_error > 1e-3
    assert torch.all(binding.barycentrics >= -1e-9) and torch.allclose(binding.barycentrics.sum(1), torch.ones(1, dtype=torch.float64))
    # Gaussians sit ~3 mm off their centroid on ~2 cm triangles: most nearest triangles are their own
    assert (binding.triangle_ids == torch.arange(model.num_faces)).float().mean() > 0.8


def test_index_plus_nearest_for_extra_gaussians(scene):
    model, src, splats = scene["model"], scene["src"], scene["splats"]
    extra = {k: torch.cat([v, v[:5]]) for k, v in splats.items()}  # 5 more Gaussians than faces (like teeth)
    anchors = torch.cat([scene["anchors"], scene["anchors"][:5] + 0.001])
    binding = bind_splats(extra, src, model.faces, anchors=anchors)
    assert binding.mode == "index+nearest"
    assert torch.equal(binding.triangle_ids[: model.num_faces], torch.arange(model.num_faces))


# ------------------------------------------------------------------ rest, round trip, LBS


def test_zero_expression_zero_pose_reproduces_rest_exactly(scene):
    for rig in (scene["rig"], scene["rig_mesh"]):
        out = evaluate_rig(rig, {})
        assert torch.equal(out["means"], rig.rest["means"])
        assert torch.equal(out["scales"], rig.rest["scales"])
        assert torch.allclose(out["quats"], F.normalize(rig.rest["quats"], dim=-1), atol=1e-7)  # no joint turns
        assert torch.allclose(out["shN"], rig.rest["shN"], atol=1e-6)
    # mesh rigging at zero params == Gaussians placed on the rest mesh (FLAME with expression 0, pose 0)
    ref = mesh_rig_splats(scene["model"], scene["rig_mesh"], {})
    assert torch.allclose(ref["means"], scene["rig_mesh"].rest["means"], atol=1e-7)


def test_identity_lbs_in_rig(scene):
    rig = scene["rig"]
    zero_pose = {"rotation": torch.zeros(1, 3), "neck_pose": torch.zeros(1, 3), "jaw_pose": torch.zeros(1, 3),
                 "eyes_pose": torch.zeros(1, 6), "expr": torch.zeros(1, rig.num_expr)}
    assert torch.equal(evaluate_rig(rig, zero_pose)["means"], rig.rest["means"])
    # pure translation moves every Gaussian by exactly that vector
    t = torch.tensor([[0.01, -0.02, 0.03]])
    moved = evaluate_rig(rig, {"translation": t})["means"]
    assert torch.allclose(moved - rig.rest["means"], t.expand_as(moved), atol=1e-7)


@pytest.mark.parametrize("which", ["rig", "rig_mesh"])
def test_source_parameters_reproduce_reconstruction(scene, which):
    rig, splats = scene[which], scene["splats"]
    ref = mesh_rig_splats(scene["model"], rig, rig.source)
    assert (ref["means"] - splats["means"]).abs().max() < 1e-6
    assert _quat_angle(ref["quats"], splats["quats"]).max() < 1e-3
    assert torch.allclose(ref["shN"], splats["shN"], atol=1e-5)
    if which == "rig":  # the blendshape rig is exact at the source frame by construction
        out = evaluate_rig(rig, rig.source)
        assert (out["means"] - splats["means"]).abs().max() < 1e-6
        assert torch.allclose(out["shN"], splats["shN"], atol=1e-5)


def test_source_round_trip_render_psnr(scene):
    rig, splats = scene["rig"], scene["splats"]
    centre = splats["means"].mean(0)
    for angle in (0.0, 0.8):
        c2w, K = _camera(centre, angle)
        static = _render(splats, c2w, K)
        assert static.std() > 0.05  # the head is in view
        for animated in (evaluate_rig(rig, rig.source), mesh_rig_splats(scene["model"], rig, rig.source)):
            assert _psnr(_render(animated, c2w, K), static) >= 40.0


def test_blendshapes_track_mesh_rigging(scene):
    rig, model, params = scene["rig_mesh"], scene["model"], scene["params"]
    expr = params["expr"].float()
    errors, angles, motions = [], [], []
    for s in (0.25, 0.5, 1.0, 2.0, 3.0):
        p = {"expr": expr * s}
        a, b = evaluate_rig(rig, p), mesh_rig_splats(model, rig, p)
        errors.append(float((a["means"] - b["means"]).norm(dim=-1).max()))
        angles.append(float(_quat_angle(a["quats"], b["quats"]).max()))
        motions.append(float((b["means"] - rig.rest["means"]).norm(dim=-1).max()))
    assert errors[0] < 1e-4 and angles[0] < 0.01  # small at small |expression|
    assert all(e <= 0.05 * m for e, m in zip(errors, motions))  # <= 5% of the motion itself, up to 3x
    assert all(e1 <= e2 for e1, e2 in zip(errors, errors[1:]))  # and it grows with |expression|
    assert angles[-1] < 0.2
    # a single unit basis is exact (the blendshape is the secant at 1)
    one = {"expr": F.one_hot(torch.tensor([1]), rig.num_expr).float()}
    a, b = evaluate_rig(rig, one), mesh_rig_splats(model, rig, one)
    assert (a["means"] - b["means"]).abs().max() < 1e-6 and _quat_angle(a["quats"], b["quats"]).max() < 1e-3


def test_pose_drives_like_mesh_rigging(scene):
    rig, model = scene["rig_mesh"], scene["model"]
    p = {"rotation": torch.tensor([[0.0, 0.4, 0.0]]), "jaw_pose": torch.tensor([[0.25, 0.0, 0.0]])}
    a, b = evaluate_rig(rig, p), mesh_rig_splats(model, rig, p)
    moved = (b["means"] - rig.rest["means"]).norm(dim=-1).max()
    assert moved > 0.02
    assert (a["means"] - b["means"]).norm(dim=-1).max() < 0.1 * moved
    # global rotation alone is rigid, hence exact for both
    g = {"rotation": torch.tensor([[0.1, -0.5, 0.2]])}
    assert (evaluate_rig(rig, g)["means"] - mesh_rig_splats(model, rig, g)["means"]).abs().max() < 1e-6


# ------------------------------------------------------------------ rotations and SH


def test_fast_rig_path_equals_the_reference(scene):
    """evaluate_rig (packed, component-major, joint maths on the CPU) == evaluate_rig_reference ([N, C])
    for random expressions and poses, in float64 and float32, with and without SH rotation."""
    g = torch.Generator().manual_seed(5)
    for rig in (scene["rig"], scene["rig"].to(torch.float32)):
        packed = pack_rig(rig)
        for _ in range(3):
            p = {"expr": torch.randn(1, rig.num_expr, generator=g), "rotation": 0.4 * torch.randn(1, 3, generator=g),
                 "neck_pose": 0.2 * torch.randn(1, 3, generator=g), "jaw_pose": 0.3 * torch.randn(1, 3, generator=g),
                 "eyes_pose": 0.1 * torch.randn(1, 6, generator=g), "translation": torch.randn(1, 3, generator=g)}
            fast, ref = evaluate_rig(packed, p), evaluate_rig_reference(rig, p)
            tol = 1e-10 if rig.rest["means"].dtype == torch.float64 else 2e-5
            for key in ref:
                assert torch.allclose(fast[key], ref[key], atol=tol), key
            assert (ref["means"] - rig.rest["means"]).abs().max() > 1e-3  # the frame really moves the head
        no_sh = evaluate_rig(packed, p, rotate_colours=False)
        assert torch.equal(no_sh["shN"], rig.rest["shN"]) and torch.allclose(no_sh["means"], ref["means"], atol=tol)


def test_matrix_quat_round_trip():
    q = F.normalize(torch.randn(200, 4, dtype=torch.float64), dim=-1)
    r = quat_to_matrix(q)
    q2 = matrix_to_quat(r)
    assert torch.allclose(quat_to_matrix(q2), r, atol=1e-12) and torch.all(q2[:, 0] >= 0)
    assert torch.allclose(quat_to_matrix(quat_multiply(q, q2)), r @ r, atol=1e-12)


def test_sh_rotation_is_exact_for_bands_1_to_3():
    g = torch.Generator().manual_seed(0)
    shn = torch.randn(50, 15, 3, generator=g, dtype=torch.float64)
    rot = quat_to_matrix(torch.randn(50, 4, generator=g, dtype=torch.float64))
    d = F.normalize(torch.randn(50, 3, generator=g, dtype=torch.float64), dim=-1)
    rotated = rotate_sh(shn, rot)
    # colours with the renderer's basis (fastavatar.core.sh), band 0 zero: rotation moves only bands 1-3
    zero = torch.zeros(50, 1, 3, dtype=torch.float64)
    colour_new = eval_sh(3, d, torch.cat([zero, rotated], 1))
    colour_old = eval_sh(3, (rot.transpose(1, 2) @ d[..., None])[..., 0], torch.cat([zero, shn], 1))
    assert torch.allclose(colour_new, colour_old, atol=1e-12)
    assert not torch.allclose(rotated, shn, atol=1e-2)


def test_animate_sh_basis_is_the_renderers():
    """The component-major basis used for SH rotation equals fastavatar.core.sh (the renderer's) bands 1-3."""
    from fastavatar.animate.binding import _sh_basis_soa

    d = F.normalize(torch.randn(64, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64), dim=-1)
    reference = sh_basis(3, d)[:, 1:]
    assert torch.allclose(sh_basis_rest(d), reference, atol=1e-15)
    assert torch.allclose(_sh_basis_soa(d[:, 0], d[:, 1], d[:, 2]).T, reference, atol=1e-15)
    assert reference.abs().max() > 0.1  # a real basis, not zeros


def test_rigid_motion_of_gaussians_and_camera_leaves_render_unchanged(scene):
    splats = {k: v.double() for k, v in scene["splats"].items()}
    centre = splats["means"].mean(0)
    c2w, K = _camera(centre.float(), 0.3)
    base = _render(splats, c2w, K)
    q = F.normalize(torch.tensor([0.9, 0.2, -0.3, 0.25], dtype=torch.float64), dim=0)
    r = quat_to_matrix(q)
    t = torch.tensor([0.05, -0.02, 0.1], dtype=torch.float64)
    moved = dict(splats)
    moved["means"] = splats["means"] @ r.T + t
    moved["quats"] = quat_multiply(q.expand(len(splats["quats"]), 4), splats["quats"])
    moved["shN"] = rotate_sh(splats["shN"], r.expand(len(splats["quats"]), 3, 3))
    motion = torch.eye(4, dtype=torch.float64)
    motion[:3, :3], motion[:3, 3] = r, t
    c2w_moved = (motion @ c2w.double()).float()
    after = _render(moved, c2w_moved, K)
    assert (after - base).abs().max() < 1e-4
    no_sh = dict(moved, shN=splats["shN"])  # forgetting the SH rotation changes view-dependent colour
    assert (_render(no_sh, c2w_moved, K) - base).abs().max() > 1e-3


# ------------------------------------------------------------------ rig file


def test_rig_save_load_round_trip_and_errors(scene, tmp_path):
    rig = scene["rig"]
    path = tmp_path / "rig.npz"
    save_rig(path, rig)
    loaded = load_rig(path, num_gaussians=rig.num_gaussians)
    assert loaded.binding_mode == rig.binding_mode and loaded.rest_mode == "source"
    assert torch.equal(loaded.expr_dmeans, rig.expr_dmeans) and torch.equal(loaded.triangle_ids, rig.triangle_ids)
    out_a, out_b = evaluate_rig(rig, scene["params"]), evaluate_rig(loaded, scene["params"])
    assert torch.equal(out_a["means"], out_b["means"])
    with pytest.raises(RigError, match="Gaussians") as info:
        load_rig(path, num_gaussians=rig.num_gaussians + 1)
    assert "\n" not in str(info.value)
    data = dict(np.load(path))
    data["version"] = np.int64(99)
    bad = tmp_path / "rig_v99.npz"
    np.savez(bad, **data)
    with pytest.raises(RigError, match="version 99"):
        load_rig(bad)


# ------------------------------------------------------------------ sequences and scripts


def test_demo_sequence_parts():
    cfg = DemoSequenceConfig(fps=10, seconds_per_part=1.0, num_expr=20, sweep_bases=2)
    frames = demo_sequence(cfg)
    assert len(frames) == 2 * 5 + 10 + 10  # sweep: 2 bases x 5 frames; jaw and head turn: 10 frames each
    expr = torch.cat([f["expr"] for f in frames])
    jaw = torch.cat([f["jaw_pose"] for f in frames])[:, 0]
    yaw = torch.cat([f["rotation"] for f in frames])[:, 1]
    assert expr.shape[1] == 20 and expr[:, 0].abs().max() == pytest.approx(cfg.expr_amplitude, rel=0.05)
    assert expr[:, 2:].abs().max() == 0
    assert jaw.max() == pytest.approx(cfg.jaw_open, rel=0.05) and jaw.min() >= 0 and jaw.max() <= cfg.jaw_open
    assert yaw.max() > 0.9 * cfg.head_yaw and yaw.min() < -0.9 * cfg.head_yaw


def test_load_vhap_sequence(data_root):
    frames = load_flame_sequence(data_root / "306" / "flame_param")
    assert len(frames) == 1 and frames[0]["expr"].shape == (1, 100)
    assert "shape" not in frames[0] and "static_offset" not in frames[0]


def test_render_sequence_writes_video(scene, tmp_path):
    rig = scene["rig"]
    frames = demo_sequence(DemoSequenceConfig(fps=4, seconds_per_part=1.0, num_expr=rig.num_expr, sweep_bases=1))[:5]
    c2w, K = _camera(rig.rest["means"].mean(0))
    summary = render_sequence(frames, rig, c2w, K, W, H, tmp_path, AnimateConfig(render_backend="torch", save_ply=True, fps=4))
    video = Path(summary["video"])
    assert video.is_file() and video.stat().st_size > 0 and summary["num_frames"] == 5
    assert len(list((tmp_path / "frames").glob("*.ply"))) == 5
    import imageio.v3 as iio

    read = iio.imread(video, index=None)
    assert read.shape[0] == 5


def test_build_rig_and_animate_scripts(tmp_path, data_root):
    """End to end on sample subject 306 with the tiny model (its centres do not match: nearest binding)."""
    import importlib.util

    from fastavatar.io.ply import save_ply

    root = Path(__file__).resolve().parents[1]

    def load(name):
        spec = importlib.util.spec_from_file_location(name, root / "scripts" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    from fastavatar.data import SubjectParser

    model = make_tiny_flame()
    flame_path = save_tiny_flame_npz(tmp_path / "tiny_flame.npz", model)
    points = SubjectParser(data_root / "306", expected_points=None).points  # [10144, 3], like a decoded head
    n = points.shape[0]
    splats = {"means": points, "quats": torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
              "scales": torch.full((n, 3), math.log(0.004)), "opacities": torch.full((n,), 3.0),
              "sh0": torch.randn(n, 1, 3) * 0.5, "shN": torch.zeros(n, 15, 3)}
    save_ply(tmp_path / "splats.ply", splats)
    assert load("build_rig").main(["--splats", str(tmp_path / "splats.ply"), "--subject_dir", str(data_root / "306"),
                                   "--flame_model", str(flame_path), "--num_expr", "3"]) == 0
    rig = load_rig(tmp_path / "rig.npz", num_gaussians=splats["means"].shape[0])
    assert rig.binding_mode == "nearest" and rig.num_expr == 3
    out_dir = tmp_path / "anim"
    assert load("animate").main(["--splats", str(tmp_path / "splats.ply"), "--output_dir", str(out_dir),
                                 "--max_frames", "2", "--render_backend", "torch", "--image_scale", "0.1",
                                 "--subject_dir", str(data_root / "306"), "--camera", "8", "--orbit", "20"]) == 0
    import json

    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["num_frames"] == 2 and Path(summary["video"]).is_file() and summary["driving"] == "demo"
    assert (summary["width"], summary["height"]) == (55, 80)  # camera 8 of the subject at 0.1 scale


def test_video_falls_back_to_gif_without_ffmpeg(tmp_path, monkeypatch):
    import imageio.v3 as iio

    from fastavatar.animate import sequence

    monkeypatch.setattr(sequence, "ffmpeg_available", lambda: False)
    frames = [np.full((8, 10, 3), 40 * i, dtype=np.uint8) for i in range(4)]
    path = sequence.write_video(frames, tmp_path / "clip.mp4", fps=5)
    assert path.suffix == ".gif" and path.is_file() and not (tmp_path / "clip.mp4").exists()
    read = iio.imread(path, index=None)
    assert read.shape[0] == 4 and read[3].mean() > read[0].mean()
