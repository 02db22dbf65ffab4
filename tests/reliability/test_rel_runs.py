"""kill -9 during training and during a checkpoint write, Ctrl-C, then resume: no checkpoint is
corrupt, no temp file is left behind, the history is continuous, and at most one save interval
(latest.pth is written every epoch) is lost."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastavatar.io.integrity import read_checkpoint
from rel_cli import REPO

DATA = REPO / "data" / "nersemble"
SCRIPT = REPO / "scripts" / "train_decoder.py"
EPOCHS = 6


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    from fastavatar.data import SubjectParser
    from fastavatar.io.ply import save_ply
    from fastavatar.train.template import initial_splats

    path = tmp_path_factory.mktemp("tpl") / "template.ply"
    save_ply(path, initial_splats(SubjectParser(DATA / "306", image_scale=0.125)))
    return path


def _args(template: Path, run: Path, *extra) -> list:
    return [str(a) for a in ["--data_root", DATA, "--subjects", "306", "--image_scale", "0.0625", "--hidden_dim", "16",
                             "--body_layers", "1", "--batch_size", "4", "--max_epochs", EPOCHS, "--save_every", "2",
                             "--lpips_weight", "0", "--device", "cpu", "--render_backend", "torch", "--no-progress",
                             "--eval_every", "100", "--no-save_images", "--ply_file_path", template,
                             "--output_dir", run, *extra]]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _finished_epochs(stdout: str) -> list:
    return [int(m) for m in re.findall(r"\] epoch (\d+):", stdout)]


def _assert_consistent_after_resume(run: Path, epoch_at_kill: int, resumed: subprocess.CompletedProcess) -> None:
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    assert "Traceback" not in out
    ckpts = run / "checkpoints"
    leftovers = [p.name for p in ckpts.iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temp files left behind: {leftovers}"
    for p in ckpts.glob("*.pth"):
        read_checkpoint(p)  # CRC, stamp and finiteness: none is corrupt
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1)), history
    m = re.search(r"resumed from \S+ \(epoch (\d+)", out)
    assert m, out[-2000:]
    resumed_at = int(m.group(1))
    assert epoch_at_kill - resumed_at <= 1, (epoch_at_kill, resumed_at)  # at most one save interval lost
    assert read_checkpoint(ckpts / "latest.pth")["epoch"] == EPOCHS


@pytest.mark.slow
def test_kill9_during_training_then_resume(tmp_path, template):
    run = tmp_path / "run"
    log = tmp_path / "out.txt"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), *_args(template, run)], stdout=fh,
                                stderr=subprocess.STDOUT, env=_env(), cwd=str(REPO))
        deadline = time.time() + 240
        while time.time() < deadline and len(_finished_epochs(log.read_text())) < 3 and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.7)  # somewhere inside epoch 4
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = _finished_epochs(log.read_text())
    assert 3 <= len(done) < EPOCHS, log.read_text()[-2000:]
    for p in (run / "checkpoints").glob("*.pth"):
        read_checkpoint(p)
    resumed = subprocess.run([sys.executable, str(SCRIPT), *_args(template, run, "--resume")], capture_output=True,
                             text=True, env=_env(), cwd=str(REPO), timeout=300)
    _assert_consistent_after_resume(run, max(done), resumed)


_KILL_IN_SAVE = """
import os, runpy, signal, sys
real = os.replace
seen = {"n": 0}
def replace(src, dst, *a, **k):
    if str(dst).endswith("latest.pth"):
        seen["n"] += 1
        if seen["n"] == 3:  # the third latest.pth: its temp file is fully written, the rename never happens
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **k)
os.replace = replace
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_kill9_during_a_checkpoint_write_then_resume(tmp_path, template):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", _KILL_IN_SAVE, str(SCRIPT), *_args(template, run)],
                          capture_output=True, text=True, env=_env(), cwd=str(REPO), timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    temps = [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".latest.pth.")]
    assert len(temps) == 1, "the interrupted write left its temp file (what the resume must clean up)"
    assert read_checkpoint(run / "checkpoints" / "latest.pth")["epoch"] == 2  # the old latest is intact
    resumed = subprocess.run([sys.executable, str(SCRIPT), *_args(template, run, "--resume")], capture_output=True,
                             text=True, env=_env(), cwd=str(REPO), timeout=300)
    assert "removed 1 temp file" in resumed.stdout
    _assert_consistent_after_resume(run, 3, resumed)


def test_ctrl_c_during_training_is_one_line_and_resumable(tmp_path, template):
    run = tmp_path / "run"
    log = tmp_path / "out.txt"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), *_args(template, run)], stdout=fh,
                                stderr=subprocess.PIPE, text=True, env=_env(), cwd=str(REPO))
        deadline = time.time() + 240
        while time.time() < deadline and len(_finished_epochs(log.read_text())) < 2 and proc.poll() is None:
            time.sleep(0.05)  # epoch 1 is saved once epoch 2 is printed
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err.strip().splitlines()[-1]
    assert "--resume" in err.strip().splitlines()[-1]
    read_checkpoint(run / "checkpoints" / "latest.pth")


def _namespaces_available() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_namespaces = pytest.mark.skipif(not _namespaces_available(),
                                      reason="needs `unshare -rm` (user + mount namespaces) to mount a small tmpfs")


def _in_tmpfs(run: Path, mount_opts: str, argv: list) -> subprocess.CompletedProcess:
    """Run ``argv`` in a private mount namespace where ``run`` is a fresh tmpfs (``mount_opts``)."""
    run.mkdir(parents=True, exist_ok=True)
    script = f'mount -t tmpfs -o {mount_opts} tmpfs "$0" && exec "$@"'
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, str(run), *argv], capture_output=True, text=True,
                          env=_env(), cwd=str(REPO), timeout=300)


@needs_namespaces
def test_full_disk_is_one_line_naming_the_folder_and_keeps_the_last_checkpoint(tmp_path, template):
    run = tmp_path / "run"
    # one checkpoint of this tiny decoder is ~6 MB: the first latest.pth fits, the second one's temp does not
    check = "\n".join([
        "import runpy, sys",
        "sys.argv = sys.argv[1:]",
        "try:",
        "    runpy.run_path(sys.argv[0], run_name='__main__')",
        "finally:",
        "    from fastavatar.io.integrity import read_checkpoint",
        "    run = sys.argv[sys.argv.index('--output_dir') + 1]",
        "    print('LATEST_EPOCH', read_checkpoint(run + '/checkpoints/latest.pth')['epoch'])",
    ])
    argv = [sys.executable, "-c", check, str(SCRIPT), *_args(template, run)[:-2], "--output_dir", str(run),
            "--save_every", "100", "--max_epochs", "3"]
    res = _in_tmpfs(run, "size=9m", argv)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out[-3000:]
    assert "Traceback" not in out
    line = [ln for ln in res.stderr.splitlines() if ln.strip()][-1]
    assert line.startswith("error:") and str(run) in line and "No space left" in line, line
    assert "LATEST_EPOCH 1" in res.stdout  # the last good checkpoint stayed, readable


@needs_namespaces
def test_read_only_output_folder_is_one_line(tmp_path, template):
    run = tmp_path / "run"
    res = _in_tmpfs(run, "ro,size=1m", [sys.executable, str(SCRIPT), *_args(template, run)])
    out = res.stdout + res.stderr
    assert res.returncode == 1 and "Traceback" not in out, out[-3000:]
    line = [ln for ln in res.stderr.splitlines() if ln.strip()][-1]
    assert str(run) in line and "Read-only" in line, line
