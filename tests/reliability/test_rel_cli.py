"""Script-level reliability: every bad file, flag or folder is a non-zero exit, no traceback, and a
last stderr line naming the culprit; malicious files given to any script flag run nothing."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from rel_cli import REPO, assert_clean_failure, run_cli
from rel_fixtures import (BAD_CHECKPOINT_KINDS, BAD_PLY_KINDS, good_ply_table, make_bad_checkpoint, make_bad_ply,
                          ply_names, save_sh0_ply, save_tiny_decoder, _ply_bytes)
from rel_payloads import make_payload

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DATA = REPO / "data" / "nersemble"
TRAIN_BASE = ["--data_root", DATA, "--subjects", "306", "--image_scale", "0.0625", "--hidden_dim", "16",
              "--body_layers", "1", "--max_epochs", "1", "--lpips_weight", "0", "--device", "cpu", "--render_backend", "torch",
              "--no-progress", "--max_steps", "1", "--eval_every", "100"]


@pytest.fixture(scope="module")
def good_decoder(tmp_path_factory) -> Path:
    return save_tiny_decoder(tmp_path_factory.mktemp("dec") / "decoder.pth", hidden_dim=16)


@pytest.fixture(scope="module")
def good_ply(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ply") / "splats.ply"
    path.write_bytes(_ply_bytes(good_ply_table(), ply_names()))
    return path


# ---------------------------------------------------------------------------- checkpoint flags
@pytest.mark.parametrize("kind", BAD_CHECKPOINT_KINDS)
def test_train_decoder_init_from_bad_checkpoint(tmp_path, good_decoder, kind):
    marker = tmp_path / "RAN"
    bad = make_bad_checkpoint(kind, tmp_path / "init.pth", good_decoder, marker)
    res = run_cli("train_decoder.py", [*TRAIN_BASE, "--init_from", bad, "--output_dir", tmp_path / "run"])
    assert_clean_failure(res, bad)
    assert not marker.exists()


@pytest.mark.parametrize("kind", BAD_CHECKPOINT_KINDS + ("other_config",))
def test_train_decoder_resume_from_bad_latest(tmp_path, good_decoder, template, kind):
    marker = tmp_path / "RAN"
    latest = tmp_path / "run" / "checkpoints" / "latest.pth"
    if kind == "other_config":
        latest.parent.mkdir(parents=True)
        save_tiny_decoder(latest, hidden_dim=24)  # the run asks for hidden_dim 16
    else:
        make_bad_checkpoint(kind, latest, good_decoder, marker)
    res = run_cli("train_decoder.py", [*TRAIN_BASE, "--ply_file_path", template, "--resume",
                                       "--output_dir", tmp_path / "run"])
    line = assert_clean_failure(res, "latest.pth")
    assert "--resume_fallback" in line
    assert not marker.exists()


def test_full_guidance_encoder_payload_is_an_error_not_swallowed(tmp_path, good_decoder):
    marker = tmp_path / "RAN"
    bad = make_bad_checkpoint("payload", tmp_path / "encoder.pth", good_decoder, marker)
    res = run_cli("inference_feedforward_full_guidance.py",
                  ["--data_root", DATA, "--sample_id", "306", "--decoder_checkpoint", good_decoder,
                   "--encoder_checkpoint", bad, "--output_dir", tmp_path / "out", "--device", "cpu",
                   "--image_scale", "0.0625"])
    assert_clean_failure(res, bad)
    assert not marker.exists()


def _payload_flame(tmp_path: Path, marker: Path) -> Path:
    import pickle

    path = tmp_path / "generic_model.pkl"
    entries = {k: np.zeros((2, 3)) for k in ("shapedirs", "posedirs", "J_regressor", "kintree_table", "weights", "f")}
    entries["v_template"] = make_payload("os_system", marker)  # the loader must reach it and refuse it as data
    path.write_bytes(pickle.dumps(entries, protocol=2))
    return path


def test_build_rig_flame_payload(tmp_path, good_ply):
    marker = tmp_path / "RAN"
    flame = _payload_flame(tmp_path, marker)
    res = run_cli("build_rig.py", ["--splats", good_ply, "--data_root", DATA, "--sample_id", "306",
                                   "--flame_model", flame, "--output", tmp_path / "rig.npz"])
    assert_clean_failure(res, flame)
    assert not marker.exists()


def test_full_guidance_points_from_flame_payload(tmp_path, good_decoder):
    marker = tmp_path / "RAN"
    flame = _payload_flame(tmp_path, marker)
    res = run_cli("inference_feedforward_full_guidance.py",
                  ["--data_root", DATA, "--sample_id", "306", "--decoder_checkpoint", good_decoder,
                   "--encoder_checkpoint", tmp_path / "none.pth", "--points_from", "flame", "--flame_model", flame,
                   "--output_dir", tmp_path / "out", "--device", "cpu", "--image_scale", "0.0625"])
    assert_clean_failure(res, flame)
    assert not marker.exists()


# ---------------------------------------------------------------------------- config and flags
def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", ["missing", "invalid", "unknown_key", "wrong_type", "not_mapping"])
def test_config_file_problems(tmp_path, case):
    text = {"invalid": "max_epochs: [1\n", "unknown_key": "max_epochz: 3\n", "wrong_type": "max_epochs: lots\n",
            "not_mapping": "- 1\n- 2\n"}.get(case)
    path = _yaml(tmp_path, text) if text is not None else tmp_path / "nope.yaml"
    res = run_cli("train_decoder.py", ["--config", path, "--output_dir", tmp_path / "run"])
    line = assert_clean_failure(res, path)
    if case in ("unknown_key", "wrong_type"):
        assert "max_epoch" in line


@pytest.mark.parametrize("flags,named", [
    (["--device", "foo"], "--device"),
    (["--max_epochs", "0"], "--max_epochs"),
    (["--image_scale", "nan"], "--image_scale"),
    (["--image_scale", "0"], "--image_scale"),
    (["--subjects", "abc"], "abc"),
    (["--val_views", "99"], "--val_views"),
    (["--batch_size", "0"], "--batch_size"),
])
def test_bad_training_flags(tmp_path, flags, named):
    base = [a for a in TRAIN_BASE]
    for flag in flags[::2]:  # the case's value replaces the base's
        if flag in base:
            i = base.index(flag)
            del base[i: i + 2]
    res = run_cli("train_decoder.py", [*base, *flags, "--output_dir", tmp_path / "run"])
    assert_clean_failure(res, named)


def test_output_dir_that_is_a_file(tmp_path):
    f = tmp_path / "run"
    f.write_text("x")
    res = run_cli("train_decoder.py", [*TRAIN_BASE, "--output_dir", f])
    assert_clean_failure(res, f)
    assert f.read_text() == "x"


def test_rerun_into_a_finished_run_is_refused(tmp_path, good_decoder):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copyfile(good_decoder, ckpts / "latest.pth")
    before = (ckpts / "latest.pth").read_bytes()
    res = run_cli("train_decoder.py", [*TRAIN_BASE, "--output_dir", tmp_path / "run"])
    line = assert_clean_failure(res, tmp_path / "run")
    assert "--resume" in line and "--overwrite" in line
    assert (ckpts / "latest.pth").read_bytes() == before


@pytest.mark.parametrize("flags,named", [
    (["--input_views", "99"], "--input_views"),
    (["--input_views", "xyz"], "--input_views"),
    (["--device", "foo"], "--device"),
])
def test_bad_guided_flags(tmp_path, good_decoder, flags, named):
    res = run_cli("inference_feedforward_full_guidance.py",
                  ["--data_root", DATA, "--sample_id", "306", "--decoder_checkpoint", good_decoder,
                   "--output_dir", tmp_path / "out", "--image_scale", "0.0625", *flags])
    assert_clean_failure(res, named)


def test_evaluate_bad_seen_views(tmp_path, good_ply):
    res = run_cli("evaluate.py", ["--splats", good_ply, "--data_root", DATA, "--sample_id", "306",
                                  "--seen_views", "99", "--output_dir", tmp_path / "ev", "--image_scale", "0.0625"])
    assert_clean_failure(res, "--seen_views")


# ---------------------------------------------------------------------------- PLYs
@pytest.mark.parametrize("kind", BAD_PLY_KINDS)
@pytest.mark.parametrize("script", ["view.py", "evaluate.py", "animate.py"])
def test_bad_ply(tmp_path, script, kind):
    bad = make_bad_ply(kind, tmp_path / "splats.ply")
    args = {
        "view.py": [bad, "--port", "0"],
        "evaluate.py": ["--splats", bad, "--data_root", DATA, "--sample_id", "306", "--output_dir", tmp_path / "ev",
                        "--image_scale", "0.0625"],
        "animate.py": ["--splats", bad, "--output_dir", tmp_path / "anim"],
    }[script]
    res = run_cli(script, args, subprocess_mode=script == "view.py" or None, timeout=60)
    assert_clean_failure(res, bad)


def test_evaluate_accepts_sh_degree_0(tmp_path):
    ply = save_sh0_ply(tmp_path / "sh0.ply")
    res = run_cli("evaluate.py", ["--splats", ply, "--data_root", DATA, "--sample_id", "306", "--output_dir",
                                  tmp_path / "ev", "--image_scale", "0.0625", "--device", "cpu"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "ev" / "results.json").is_file()


# ---------------------------------------------------------------------------- viewer
def _busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s, s.getsockname()[1]


@pytest.mark.parametrize("flags,named", [(["--port", "99999"], "--port"), (["--port", "-1"], "--port"),
                                         (["--host", "256.1.1.1"], "256.1.1.1")])
def test_viewer_invalid_port_or_host_exits(good_ply, flags, named):
    res = run_cli("view.py", [good_ply, *flags], subprocess_mode=True, timeout=60)
    assert_clean_failure(res, named)


def test_viewer_port_in_use_exits(good_ply):
    sock, port = _busy_port()
    try:
        res = run_cli("view.py", [good_ply, "--port", port], subprocess_mode=True, timeout=60)
    finally:
        sock.close()
    assert_clean_failure(res, str(port))


# ---------------------------------------------------------------------------- images
@pytest.mark.parametrize("case", ["missing", "text"])
def test_benchmark_inference_bad_image(tmp_path, case):
    img = tmp_path / "photo.png"
    if case == "text":
        img.write_text("not an image")
    res = run_cli("benchmark_inference.py", ["--image", img, "--device", "cpu"])
    assert_clean_failure(res, img)


# ---------------------------------------------------------------------------- broken subject folders
def _data_root(tmp_path: Path, edit=None, subjects=("306",)) -> Path:
    root = tmp_path / "data"
    for sid in subjects:
        shutil.copytree(DATA / sid, root / sid, ignore=shutil.ignore_patterns("flame_param", "*.json"))
    if edit is not None:
        edit(root)
    return root


def _train_on(root: Path, tmp_path: Path, template: Path, *extra):
    base = list(TRAIN_BASE)
    i = base.index("--data_root")
    base[i + 1] = root
    j = base.index("--subjects")
    del base[j: j + 2]
    return run_cli("train_decoder.py", [*base, "--ply_file_path", template, "--output_dir", tmp_path / "run", *extra])


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    from fastavatar.data import SubjectParser
    from fastavatar.io.ply import save_ply
    from fastavatar.train.template import initial_splats

    path = tmp_path_factory.mktemp("tpl") / "template.ply"
    save_ply(path, initial_splats(SubjectParser(DATA / "306", image_scale=0.125)))
    return path


def test_truncated_points3d_is_caught_before_pycolmap(tmp_path, template):
    def cut(root):
        p = root / "306" / "sparse" / "0" / "points3D.bin"
        p.write_bytes(p.read_bytes()[:200_000])

    root = _data_root(tmp_path, cut)
    res = _train_on(root, tmp_path, template, "--on_bad_subject", "stop")
    assert_clean_failure(res, root / "306" / "sparse" / "0" / "points3D.bin")


@pytest.mark.parametrize("case", ["image_text", "image_size", "mask_size"])
def test_bad_images_are_errors_naming_the_file(tmp_path, template, case):
    from PIL import Image

    name = "00000_03.png"

    def edit(root):
        folder = "fg_masks" if case == "mask_size" else "images"
        p = root / "306" / folder / name
        if case == "image_text":
            p.write_text("not a png")
        else:
            with Image.open(p) as img:
                img.resize((img.width // 2, img.height // 2)).save(p)

    root = _data_root(tmp_path, edit)
    folder = "fg_masks" if case == "mask_size" else "images"
    res = _train_on(root, tmp_path, template, "--on_bad_subject", "stop")
    line = assert_clean_failure(res, root / "306" / folder / name)
    if case != "image_text":
        assert "--allow_resize" in line


def test_allow_resize_accepts_a_smaller_image(tmp_path, template):
    from PIL import Image

    def edit(root):
        p = root / "306" / "images" / "00000_03.png"
        with Image.open(p) as img:
            img.resize((img.width // 2, img.height // 2)).save(p)

    root = _data_root(tmp_path, edit)
    res = _train_on(root, tmp_path, template, "--allow_resize")
    assert res.returncode == 0, res.stderr[-2000:]


def test_unparseable_subject_is_skipped_with_a_reason_and_listed(tmp_path, template):
    def break_369(root):
        shutil.rmtree(root / "369" / "sparse")

    root = _data_root(tmp_path, break_369, subjects=("306", "369"))
    res = _train_on(root, tmp_path, template)
    assert res.returncode == 0, res.stderr[-2000:]
    said = [ln for ln in (res.stdout + res.stderr).splitlines() if "369" in ln and "skip" in ln]
    assert said and "sparse" in said[0], res.stdout[-2000:]
    import json

    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert summary["subjects"] == ["306"] and summary["skipped"][0]["subject"] == "369"
    assert "sparse" in summary["skipped"][0]["reason"]


def test_unparseable_subject_stops_the_run_by_flag(tmp_path, template):
    def break_369(root):
        (root / "369" / "sparse" / "0" / "cameras.bin").write_bytes(b"\x00" * 3)

    root = _data_root(tmp_path, break_369, subjects=("306", "369"))
    res = _train_on(root, tmp_path, template, "--on_bad_subject", "stop")
    assert_clean_failure(res, root / "369")


@pytest.mark.parametrize("flags,named", [(["--render_max_side", "0"], "--render_max_side"),
                                         (["--det_size", "-8"], "--det_size"),
                                         (["--device", "foo"], "--device")])
def test_bad_feedforward_flags(tmp_path, flags, named):
    res = run_cli("inference_feedforward_no_guidance.py",
                  ["--image", DATA / "306" / "images" / "00000_08.png", "--output_dir", tmp_path / "out", *flags])
    assert_clean_failure(res, named)
