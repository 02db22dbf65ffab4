"""The training guards in isolation: run-folder claims, stale temps, the step guard, resume choice,
learning-rate override, history continuation, write failures and the script error wrapper."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from fastavatar.cli import TrainingStopped, one_line, run_script
from fastavatar.train import safety as S

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _quiet(_msg: str) -> None:
    pass


# ---------------------------------------------------------------------------- the run folder
def test_folder_with_another_runs_checkpoints_is_refused(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest.pth").write_bytes(b"x")
    (run / "checkpoints" / "epoch_0007.pth").write_bytes(b"y")
    with pytest.raises(S.RunFolderError, match="--resume .*--overwrite") as err:
        S.prepare_run_folder(run, resume=False, overwrite=False, log=_quiet)
    assert str(run) in str(err.value) and "epoch_0007.pth" in str(err.value)
    assert (run / "checkpoints" / "latest.pth").read_bytes() == b"x"  # untouched
    S.prepare_run_folder(run, resume=True, overwrite=False, log=_quiet)  # resuming is fine
    assert (run / "checkpoints" / "epoch_0007.pth").exists()


def test_overwrite_removes_the_earlier_run_and_says_so(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest.pth").write_bytes(b"x")
    (run / "history.json").write_text("[]")
    (run / "tb").mkdir()
    said = []
    S.prepare_run_folder(run, resume=False, overwrite=True, log=said.append)
    assert not (run / "checkpoints" / "latest.pth").exists() and not (run / "history.json").exists()
    assert not (run / "tb").exists() and "--overwrite" in said[0]


def test_resume_without_checkpoints_output_dir_file_and_contradiction(tmp_path):
    with pytest.raises(S.RunFolderError, match="no checkpoint"):
        S.prepare_run_folder(tmp_path / "fresh", resume=True, overwrite=False, log=_quiet)
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(S.RunFolderError, match="is a file"):
        S.prepare_run_folder(f, resume=False, overwrite=False, log=_quiet)
    with pytest.raises(S.RunFolderError, match="is a file"):
        S.prepare_run_folder(f / "sub", resume=False, overwrite=False, log=_quiet)
    with pytest.raises(S.RunFolderError, match="contradict"):
        S.prepare_run_folder(tmp_path / "x", resume=True, overwrite=True, log=_quiet)


def test_fresh_folder_is_created(tmp_path):
    S.prepare_run_folder(tmp_path / "a" / "b", resume=False, overwrite=False, log=_quiet)
    assert (tmp_path / "a" / "b" / "checkpoints").is_dir()
    assert list((tmp_path / "a" / "b" / "checkpoints").iterdir()) == []


def test_stale_temps_of_atomic_writes_are_removed(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    # what a kill -9 between torch.save and the rename leaves behind (names as atomic_path makes them)
    (ckpts / ".latest.pth.ab3_k9zq.pt").write_bytes(b"0" * 100)
    (tmp_path / ".history.json.x1y2z3w4.tmp").write_text("[")
    (ckpts / "latest.pth").write_bytes(b"keep")
    (ckpts / ".gitignore").write_text("keep")
    removed = S.remove_stale_temps([tmp_path, ckpts], log=_quiet)
    assert sorted(p.name for p in removed) == [".history.json.x1y2z3w4.tmp", ".latest.pth.ab3_k9zq.pt"]
    assert (ckpts / "latest.pth").exists() and (ckpts / ".gitignore").exists()


def test_temp_name_pattern_matches_what_atomic_path_makes(tmp_path):
    import fastavatar.io.atomic as atomic

    for name, suffix in (("latest.pth", ".pt"), ("history.json", ""), ("config.yaml", ""), ("val.png", ".png")):
        with atomic.atomic_path(tmp_path / name, suffix=suffix) as tmp:
            assert S.STALE_TEMP.match(tmp.name), tmp.name
            tmp.write_bytes(b"")


def test_write_guard_names_the_folder(tmp_path):
    with pytest.raises(S.RunFolderError) as err:
        with S.write_guard(tmp_path, "save latest.pth"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(tmp_path) in str(err.value) and "No space left" in str(err.value)
    with pytest.raises(S.RunFolderError, match="disk full"):
        with S.write_guard(tmp_path, "save latest.pth"):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
    with pytest.raises(RuntimeError, match="other"):  # unrelated errors are not disguised
        with S.write_guard(tmp_path, "save"):
            raise RuntimeError("other")


# ---------------------------------------------------------------------------- the step guard
def _guard(max_loss=0.0, max_param_abs=0.0):
    lin = torch.nn.Linear(3, 2)
    return lin, S.StepGuard({"mlp": list(lin.parameters())}, max_loss=max_loss, max_param_abs=max_param_abs,
                            advice="lower --mlp_lr")


def test_step_guard_loss():
    _, g = _guard(max_loss=100.0)
    g.check_loss(torch.tensor(3.0), 1)
    with pytest.raises(TrainingStopped, match="loss became nan at step 5.*lower --mlp_lr"):
        g.check_loss(torch.tensor(float("nan")), 5)
    with pytest.raises(TrainingStopped, match="exploded"):
        g.check_loss(torch.tensor(1e4), 6)


def test_step_guard_gradients_and_parameters():
    lin, g = _guard(max_param_abs=10.0)
    lin(torch.randn(4, 3)).sum().backward()
    g.check_gradients(1)
    g.check_parameters(1)
    lin.weight.grad[0, 0] = float("inf")
    with pytest.raises(TrainingStopped, match="mlp gradients became non-finite"):
        g.check_gradients(2)
    with torch.no_grad():
        lin.bias[0] = 50.0
    with pytest.raises(TrainingStopped, match="exploded .*50"):
        g.check_parameters(3)
    with torch.no_grad():
        lin.bias[0] = float("nan")
    with pytest.raises(TrainingStopped, match="non-finite"):
        g.check_parameters(4)


def test_huge_learning_rate_is_caught_by_the_parameter_threshold():
    """lr 1e9 keeps the loss finite for a while; the weights explode at once."""
    torch.manual_seed(0)
    lin, g = _guard(max_param_abs=1e4)
    opt = torch.optim.Adam(lin.parameters(), lr=1e9)
    lin(torch.randn(8, 3)).pow(2).mean().backward()
    g.check_gradients(1)
    opt.step()
    with pytest.raises(TrainingStopped, match="exploded"):
        g.check_parameters(1)


# ---------------------------------------------------------------------------- resume
def test_pick_resume_falls_back_to_newest_good_epoch(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for name in ("latest.pth", "epoch_0010.pth", "epoch_0005.pth", "epoch_0002.pth"):
        (ckpts / name).write_text(name)

    def load(path):
        if path.name in ("latest.pth", "epoch_0010.pth"):
            raise ValueError(f"{path}: truncated")
        return path.read_text()

    said = []
    with pytest.raises(S.RunFolderError, match="latest.pth: truncated.*--resume_fallback"):
        S.pick_resume_checkpoint(ckpts, load, fallback=False, log=said.append)
    path, state = S.pick_resume_checkpoint(ckpts, load, fallback=True, log=said.append)
    assert path.name == "epoch_0005.pth" and state == "epoch_0005.pth"
    assert any("epoch_0005.pth instead" in s for s in said)


def test_pick_resume_all_bad(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "latest.pth").write_text("x")

    def load(path):
        raise ValueError(f"{path}: empty")

    with pytest.raises(S.RunFolderError, match="no usable checkpoint"):
        S.pick_resume_checkpoint(ckpts, load, fallback=True, log=_quiet)


def test_changed_learning_rate_wins_on_resume_unchanged_keeps_decay():
    lin = torch.nn.Linear(2, 2)
    opts = {"mlp": torch.optim.Adam([lin.weight], lr=1e-3), "w": torch.optim.Adam([lin.bias], lr=1e-2)}
    saved = {"mlp": opts["mlp"].state_dict(), "w": opts["w"].state_dict()}
    saved["w"]["param_groups"][0]["lr"] = 5e-3  # decayed by the plateau scheduler in the earlier run
    for k, o in opts.items():
        o.load_state_dict(saved[k])
    said = []
    used = S.override_learning_rates(opts, {"mlp": ["mlp_lr"], "w": ["w_lr"]}, {"mlp_lr": 1e-5, "w_lr": 1e-2},
                                     {"mlp_lr": 1e-3, "w_lr": 1e-2}, log=said.append)
    assert used == {"mlp_lr": 1e-5, "w_lr": 5e-3}
    assert opts["mlp"].param_groups[0]["lr"] == 1e-5 and opts["w"].param_groups[0]["lr"] == 5e-3
    assert "mlp_lr=1e-05" in said[0] and "w_lr=0.005" in said[0]


def test_learning_rates_per_param_group():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW([{"params": a.parameters(), "lr": 1e-4}, {"params": b.parameters(), "lr": 1e-5}])
    said = []
    used = S.override_learning_rates({"tracker": opt}, {"tracker": ["lr", "backbone_lr"]},
                                     {"lr": 1e-4, "backbone_lr": 3e-6}, {"lr": 1e-4, "backbone_lr": 1e-5},
                                     log=said.append)
    assert used == {"lr": 1e-4, "backbone_lr": 3e-6}
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 3e-6]


def test_history_continues_and_drops_redone_epochs(tmp_path):
    path = tmp_path / "history.json"
    path.write_text(json.dumps([{"epoch": 1}, {"epoch": 2}, {"epoch": 3}]))
    said = []
    assert S.continue_history(path, 2, log=said.append) == [{"epoch": 1}, {"epoch": 2}]
    assert "dropped 1" in said[0]
    path.write_text("[{")
    assert S.continue_history(path, 2, log=said.append) == [] and "unreadable" in said[-1]


# ---------------------------------------------------------------------------- the script wrapper
def test_run_script_one_line_errors(capsys):
    def bad_value(argv):
        raise ValueError("configs/x.yaml: invalid YAML (mapping values are not allowed\n  in line 3)")

    assert run_script(bad_value) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: configs/x.yaml") and "Traceback" not in err

    def ctrl_c(argv):
        raise KeyboardInterrupt

    assert run_script(ctrl_c) == 130
    assert "interrupted" in capsys.readouterr().err

    def missing(argv):
        open("/nonexistent/dir/file.pth", "rb")

    assert run_script(missing) == 1
    assert capsys.readouterr().err.strip() == "error: /nonexistent/dir/file.pth: No such file or directory"

    def bug(argv):
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        run_script(bug)


def test_one_line_joins_lines():
    assert one_line(ValueError("a\n\n b ")) == "a | b"
