"""build_rig.py: tracked subject vs FLAME fit, no silent subject, contradictory flags, missing FLAME file."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from fastavatar.animate import evaluate_rig, load_rig, mesh_rig_splats
from fastavatar.flame import flame_forward
from fastavatar.flame.fit import scale_flame_model
from fastavatar.io.ply import save_ply
from flame_fixtures import make_tiny_flame, save_tiny_flame_npz, splats_on_mesh

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("build_rig", ROOT / "scripts" / "build_rig.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def fitted_head(tmp_path_factory):
    """A head reconstructed on a scaled, posed, rigidly moved FLAME (no dataset subject)."""
    tmp = tmp_path_factory.mktemp("fit")
    model = make_tiny_flame()
    truth = {"shape": torch.tensor([[0.8, -0.5, 0.3]], dtype=torch.float64),
             "expr": torch.tensor([[0.5, 0.2, -0.4]], dtype=torch.float64),
             "jaw_pose": torch.tensor([[0.2, 0.0, 0.0]], dtype=torch.float64),
             "rotation": torch.tensor([[0.1, 0.6, -0.1]], dtype=torch.float64),
             "translation": torch.tensor([[0.05, -0.02, 0.3]], dtype=torch.float64)}
    verts = flame_forward(scale_flame_model(model, 1.3), **truth).vertices[0]
    splats = splats_on_mesh(verts, model.faces, offset=0.001)
    save_ply(tmp / "splats.ply", splats)
    return model, save_tiny_flame_npz(tmp / "tiny.npz", model), tmp / "splats.ply", splats, truth


def test_without_a_subject_it_fits_and_says_so(fitted_head, capsys):
    model, flame, ply, splats, truth = fitted_head
    assert _script().main(["--splats", str(ply), "--flame_model", str(flame), "--num_expr", "3"]) == 0
    out = capsys.readouterr().out
    assert "fitting FLAME" in out and "residual RMS" in out and "306" not in out
    rig = load_rig(ply.with_name("rig.npz"), num_gaussians=splats["means"].shape[0])
    assert rig.binding_mode == "index" and rig.flame_scale == pytest.approx(1.3, rel=0.01)
    # the rig reproduces the head at its fitted source pose, and the mesh reference agrees with it
    out_rig = evaluate_rig(rig, rig.source)
    assert (out_rig["means"] - splats["means"]).abs().max() < 1e-5
    ref = mesh_rig_splats(model, rig, rig.source)
    assert (ref["means"] - splats["means"]).abs().max() < 1e-5
    # the neutral (rest) head is the fitted identity with expression and pose removed: the jaw closes
    jaw = {"jaw_pose": torch.tensor([[0.3, 0.0, 0.0]])}
    assert (evaluate_rig(rig, jaw)["means"] - rig.rest["means"]).norm(dim=-1).max() > 1e-3


def test_tracked_subject_still_works_and_names_it(fitted_head, tmp_path, data_root, capsys):
    _, flame, _, _, _ = fitted_head
    from fastavatar.data import SubjectParser

    points = SubjectParser(data_root / "306", expected_points=None).points
    n = points.shape[0]
    splats = {"means": points, "quats": torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
              "scales": torch.full((n, 3), math.log(0.004)), "opacities": torch.full((n,), 3.0),
              "sh0": torch.zeros(n, 1, 3), "shN": torch.zeros(n, 15, 3)}
    save_ply(tmp_path / "splats.ply", splats)
    assert _script().main(["--splats", str(tmp_path / "splats.ply"), "--sample_id", "306", "--data_root", str(data_root),
                           "--flame_model", str(flame), "--num_expr", "3"]) == 0
    out = capsys.readouterr().out
    assert "points3D" in out and "fitting" not in out
    assert load_rig(tmp_path / "rig.npz").flame_scale == 1.0


@pytest.mark.parametrize("extra, message", [
    (["--sample_id", "306", "--subject_dir", "x"], "not both"),
    (["--data_root", "data/nersemble"], "--data_root needs --sample_id"),
    (["--sample_id", "306", "--fit"], "pick one"),
    (["--flame_param", "x.npz", "--fit_iterations", "5"], "only applies when fitting"),
])
def test_contradictory_flags_are_one_line_errors(fitted_head, extra, message, capsys):
    from fastavatar.cli import run_script

    _, flame, ply, _, _ = fitted_head
    assert run_script(_script().main, ["--splats", str(ply), "--flame_model", str(flame), *extra]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err, err


def test_missing_flame_file_names_it_and_where_it_goes(fitted_head, tmp_path, capsys):
    from fastavatar.cli import run_script

    _, _, ply, _, _ = fitted_head
    assert run_script(_script().main, ["--splats", str(ply), "--flame_model", str(tmp_path / "flame2023.pkl")]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "flame2023.pkl" in err and "pretrained_weights/flame" in err
