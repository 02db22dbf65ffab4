"""Multi-process training (gloo on CPU, 2 processes) for the decoder, W-encoder and tracker trainers.

Each rank runs the real trainer entry point. A spy around ``run_training`` (test-side only) records,
per rank: the losses it computed, every checkpoint it wrote, the returned history and, after
training, the state of every module and parameter of the task. The test then checks that all
ranks ended with identical parameters (decoder: its W table too), that the epoch loss is the
mean over both ranks' items, and that only rank 0 wrote. Resume runs under ``torchrun``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from fastavatar.train.distributed import DistEnv, all_reduce_mean, weighted_mean

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _task_state(task) -> dict:
    """Every parameter the task trains: its modules' parameters (DDP wrappers skipped) and bare ones.

    Buffers are left out on purpose: BatchNorm running statistics are per rank under DDP (rank 0's
    are broadcast before each forward and saved), as in any DDP run without SyncBatchNorm."""
    from torch.nn.parallel import DistributedDataParallel

    state = {}
    for name, value in sorted(vars(task).items()):
        if isinstance(value, DistributedDataParallel):
            continue
        if isinstance(value, torch.nn.Module):
            for k, v in value.named_parameters():
                state[f"{name}.{k}"] = v.detach().cpu().clone()
        elif isinstance(value, torch.nn.Parameter):
            state[name] = value.detach().cpu().clone()
    return state


def _worker(rank: int, world: int, port: int, kind: str, cfg_kwargs: dict, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    sys.path.insert(0, str(TESTS))
    import importlib

    module = importlib.import_module(f"fastavatar.train.{kind}")
    real_run = module.run_training
    record = {"rank": rank, "saves": [], "loss_sum": 0.0, "items": 0}

    def spy(task, cfg, run, env):
        real_save, real_losses = task.save_checkpoint, task.losses

        def save(path, *a, **k):
            record["saves"].append(str(path))
            return real_save(path, *a, **k)

        def losses(batch):
            parts, n = real_losses(batch)
            record["loss_sum"] += float(parts["total"].detach()) * n
            record["items"] += n
            return parts, n

        task.save_checkpoint, task.losses = save, losses
        record["initial"] = _task_state(task)
        history = real_run(task, cfg, run, env)
        record["history"] = history
        record["final"] = _task_state(task)
        record["env"] = (env.rank, env.world_size, env.backend, str(env.device))
        return history

    module.run_training = spy
    config_cls, train_fn = {
        "decoder": ("DecoderTrainConfig", "train_decoder"),
        "encoder": ("EncoderTrainConfig", "train_encoder"),
        "tracker": ("TrackerTrainConfig", "train_tracker"),
    }[kind]
    cfg = getattr(module, config_cls)(**cfg_kwargs)
    getattr(module, train_fn)(cfg)
    torch.save(record, Path(out_dir) / f"rank{rank}.pt")


def run_two_ranks(kind: str, cfg_kwargs: dict, tmp_path: Path):
    out = tmp_path / "records"
    out.mkdir()
    mp.spawn(_worker, args=(2, free_port(), kind, cfg_kwargs, str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def check_ranks(records, run_dir: Path, trained_prefixes):
    r0, r1 = records
    assert r0["env"][:3] == (0, 2, "gloo") and r1["env"][:3] == (1, 2, "gloo")
    # the same parameters on every rank after the steps, and they did change
    assert r0["final"].keys() == r1["final"].keys()
    for k in r0["final"]:
        assert torch.equal(r0["final"][k], r1["final"][k]), f"{k} differs between ranks"
    moved = [k for k in r0["final"] if k.startswith(trained_prefixes) and r0["final"][k].is_floating_point()
             and not torch.equal(r0["final"][k], r0["initial"][k])]
    assert moved, "training changed no parameter"
    # each rank saw its own shard; the epoch loss is the mean over both ranks' items
    assert r0["items"] > 0 and r1["items"] > 0
    mean = (r0["loss_sum"] + r1["loss_sum"]) / (r0["items"] + r1["items"])
    for rec in records:
        assert len(rec["history"]) == 1
        assert rec["history"][0]["train_loss"] == pytest.approx(mean, rel=1e-5)
    local0 = r0["loss_sum"] / r0["items"]
    local1 = r1["loss_sum"] / r1["items"]
    assert local0 != pytest.approx(local1, rel=1e-6), "ranks trained on the same items"
    # one writer: rank 0 wrote the checkpoints, rank 1 nothing
    assert r0["saves"] and not r1["saves"]
    assert (run_dir / "checkpoints" / "latest.pth").is_file()
    history = json.loads((run_dir / "history.json").read_text())
    assert history[0]["train_loss"] == pytest.approx(mean, rel=1e-5)
    return r0


# ----------------------------------------------------------------------------- helpers


def _helper_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from fastavatar.train.distributed import (broadcast_from_main, close_distributed, init_distributed, main_writes,
                                              make_sampler, set_epoch)

    env = init_distributed("cpu", "auto")
    result = {"mean": all_reduce_mean(float(rank + 1), env), "weighted": weighted_mean(10.0 * rank, rank + 1, env),
              "broadcast": broadcast_from_main({"val": 1.5} if env.is_main else {}, env)}
    sampler = make_sampler(list(range(10)), env, shuffle=True, seed=3)
    set_epoch(sampler, 0)
    result["epoch0"] = list(sampler)
    set_epoch(sampler, 1)
    result["epoch1"] = list(sampler)
    with main_writes(env) as write:
        if write:
            (Path(out_dir) / "written_by_0").write_text("ok")
    result["seen_after_barrier"] = (Path(out_dir) / "written_by_0").is_file()
    torch.save(result, Path(out_dir) / f"{rank}.pt")
    close_distributed(env)


def test_distributed_helpers_two_gloo_ranks(tmp_path):
    mp.spawn(_helper_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"{i}.pt") for i in range(2)]
    assert r[0]["mean"] == r[1]["mean"] == 1.5  # (1 + 2) / 2
    assert r[0]["weighted"] == pytest.approx(10.0 / 3)  # (0 + 10) / (1 + 2)
    assert r[1]["broadcast"] == {"val": 1.5}
    # disjoint shards covering everything, reshuffled per epoch
    assert sorted(r[0]["epoch0"] + r[1]["epoch0"]) == list(range(10))
    assert r[0]["epoch0"] != r[0]["epoch1"]
    assert r[1]["seen_after_barrier"]  # rank 1 sees rank 0's file once main_writes returns


def _nan_on_one_rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Two ranks train a tiny DDP model; rank 1's loss turns NaN at step 2. Records how each rank ended."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from fastavatar.cli import TrainingStopped
    from fastavatar.train.distributed import close_distributed, init_distributed, wrap_ddp
    from fastavatar.train.loop import TrainLoopConfig, TrainTask, open_run, run_training

    env = init_distributed("cpu", "auto")
    model = wrap_ddp(torch.nn.Linear(3, 1), env)

    class Task(TrainTask):
        name = "nan-probe"

        def __init__(self):
            self.optimizers = {"model": torch.optim.SGD(model.parameters(), lr=0.1)}
            self.schedulers = {}
            self.step = 0

        def batches(self, epoch):
            return [torch.ones(4, 3)] * 3

        def losses(self, batch):
            self.step += 1
            loss = model(batch).pow(2).mean()
            if rank == 1 and self.step == 2:
                loss = loss * float("nan")
            return {"total": loss}, batch.shape[0]

        def clip_groups(self):
            return [list(model.parameters())]

        def save_checkpoint(self, path, epoch, global_step, record):
            torch.save({"epoch": epoch}, path)

    cfg = TrainLoopConfig(output_dir=str(Path(out_dir) / "run"), max_epochs=2, progress=False)
    outcome = "finished"
    try:
        run_training(Task(), cfg, open_run(cfg, env, tensorboard=False), env)
    except TrainingStopped as exc:
        outcome = f"stopped: {exc}"
    (Path(out_dir) / f"{rank}.txt").write_text(outcome)
    close_distributed(env)


def test_nan_loss_on_one_rank_stops_every_rank(tmp_path):
    """A NaN on one rank must stop all ranks at that step (the others would otherwise wait forever in the
    backward's all-reduce); nothing from the bad step is saved."""
    ctx = mp.start_processes(_nan_on_one_rank_worker, args=(2, free_port(), str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    deadline = 120.0
    import time

    t0 = time.monotonic()
    while not ctx.join(timeout=1.0):
        if time.monotonic() - t0 > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a rank hung after another rank's loss became NaN")
    for rank in range(2):
        outcome = (tmp_path / f"{rank}.txt").read_text()
        assert outcome.startswith("stopped:") and "at step 2" in outcome, (rank, outcome)
    assert not (tmp_path / "run" / "checkpoints" / "latest.pth").exists()


def _session_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Both ranks stop with the same error inside :func:`distributed_session` (as on a NaN stop)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from fastavatar.train.distributed import distributed_session

    outcome = "went on"
    try:
        with distributed_session("cpu", "auto") as env:
            all_reduce_mean(1.0, env)
            raise RuntimeError(f"stop on rank {env.rank}")
    except RuntimeError as exc:
        outcome = f"{exc}; still in the group: {dist.is_initialized()}"
    (Path(out_dir) / f"{rank}.txt").write_text(outcome)


def test_session_leaves_the_group_when_the_run_raises(tmp_path):
    """An error inside the session destroys the process group before it propagates, so the process
    exits outside the group (exit code 0 here: mp.spawn raises for a rank that aborted in teardown)."""
    mp.spawn(_session_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert (tmp_path / f"{rank}.txt").read_text() == f"stop on rank {rank}; still in the group: False"


def _refused_folder_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Two ranks open a run folder that holds another run's checkpoint; records how each rank ended."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from fastavatar.train.distributed import all_reduce_mean, close_distributed, init_distributed
    from fastavatar.train.loop import TrainLoopConfig, open_run
    from fastavatar.train.safety import RunFolderError

    env = init_distributed("cpu", "auto")
    cfg = TrainLoopConfig(output_dir=str(Path(out_dir) / "run"), max_epochs=1, progress=False)
    try:
        open_run(cfg, env, tensorboard=False)
        all_reduce_mean(1.0, env)  # the first collective of training: a rank that went on would wait here
        outcome = "opened"
    except RunFolderError as exc:
        outcome = f"refused: {exc}"
    (Path(out_dir) / f"{rank}.txt").write_text(outcome)
    close_distributed(env)


def test_refused_run_folder_stops_every_rank(tmp_path):
    """Only rank 0 checks the run folder; when it refuses one (another run's checkpoints, no --resume or
    --overwrite), every rank must stop with the same line instead of going on to train and hang."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest.pth").write_bytes(b"another run's checkpoint")
    ctx = mp.start_processes(_refused_folder_worker, args=(2, free_port(), str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    import time

    t0 = time.monotonic()
    while not ctx.join(timeout=1.0):
        if time.monotonic() - t0 > 120.0:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a rank hung after rank 0 refused the run folder")
    outcomes = [(tmp_path / f"{rank}.txt").read_text() for rank in range(2)]
    assert all(o.startswith("refused:") and "--resume" in o for o in outcomes), outcomes
    assert outcomes[0] == outcomes[1]
    assert (tmp_path / "run" / "checkpoints" / "latest.pth").read_bytes() == b"another run's checkpoint"


def test_single_process_env():
    env = DistEnv.single("cpu")
    assert not env.distributed and env.is_main
    assert all_reduce_mean(torch.tensor(2.5), env) == 2.5 and weighted_mean(6.0, 3, env) == 2.0


def test_nccl_without_cuda_is_a_clear_error(monkeypatch):
    from fastavatar.train.distributed import DistributedSetupError, init_distributed

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(DistributedSetupError, match="nccl needs CUDA"):
        init_distributed("cpu", "nccl")


# ----------------------------------------------------------------------------- decoder


@pytest.fixture(scope="module")
def template_path(tmp_path_factory, data_root):
    from fastavatar.data import SubjectParser
    from fastavatar.io.ply import save_ply
    from fastavatar.train.template import initial_splats

    path = tmp_path_factory.mktemp("tpl") / "template.ply"
    save_ply(path, initial_splats(SubjectParser(data_root / "306", image_scale=0.125)))
    return path


def decoder_kwargs(data_root, template_path, out, **kw):
    base = dict(data_root=str(data_root), subjects=["306", "369"], image_scale=0.125, val_views=[8],
                ply_file_path=str(template_path), hidden_dim=16, body_layers=1, max_epochs=1, max_steps=2,
                batch_size=2, mlp_lr=3e-3, w_lr=3e-2, w_init_std=0.1, lpips_weight=0.0, output_dir=str(out),
                eval_every=1, save_every=1, progress=False, device="cpu", log_every=1)
    base.update(kw)
    return base


@pytest.mark.slow
def test_decoder_ranks_stay_identical(tmp_path, data_root, template_path):
    run_dir = tmp_path / "run"
    records = run_two_ranks("decoder", decoder_kwargs(data_root, template_path, run_dir), tmp_path)
    r0 = check_ranks(records, run_dir, ("model.", "w_vectors", "decoder."))
    w_keys = [k for k in r0["final"] if k.endswith("w_vectors")]
    assert w_keys, "the W table is part of the compared state"
    assert any(not torch.equal(r0["final"][k], r0["initial"][k]) for k in w_keys)


# ----------------------------------------------------------------------------- encoder


@pytest.fixture(scope="module")
def encoder_setup(tmp_path_factory):
    sys.path.insert(0, str(TESTS))
    from face_fixtures import build_tiny_buffalo
    from fastavatar.io.checkpoints import save_decoder_checkpoint
    from fastavatar.models.decoder import DecoderConfig, GaussianDecoder

    folder = tmp_path_factory.mktemp("enc")
    n = 16
    template = {"means": torch.randn(n, 3) * 0.05, "quats": torch.tensor([1.0, 0, 0, 0]).repeat(n, 1),
                "scales": torch.full((n, 3), -5.0), "opacities": torch.zeros(n), "sh0": torch.zeros(n, 1, 3),
                "shN": torch.zeros(n, 15, 3)}
    decoder = GaussianDecoder(template, DecoderConfig(hidden_dim=8, body_layers=2, gaussians_per_round=n))
    torch.manual_seed(1)
    path = folder / "decoder.pth"
    save_decoder_checkpoint(path, decoder, torch.randn(3, 512), {"128": 0, "306": 1, "369": 2}, 5, 50)
    return {"buffalo": build_tiny_buffalo(folder / "buffalo_l"), "decoder": path, "cache": folder / "cache"}


def encoder_kwargs(data_root, setup, out, **kw):
    base = dict(data_root=str(data_root), decoder_load_path=str(setup["decoder"]), insightface_root=str(setup["buffalo"]),
                embedding_cache_dir=str(setup["cache"]), output_dir=str(out), device="cpu", batch_size=8,
                max_epochs=1, max_steps=2, save_every=1, encoder_lr=1e-3, progress=False, log_every=1)
    base.update(kw)
    return base


@pytest.mark.slow
def test_encoder_ranks_stay_identical(tmp_path, data_root, encoder_setup):
    run_dir = tmp_path / "run"
    records = run_two_ranks("encoder", encoder_kwargs(data_root, encoder_setup, run_dir), tmp_path)
    check_ranks(records, run_dir, ("encoder.",))


# ----------------------------------------------------------------------------- tracker


def tracker_kwargs(data_root, out, **kw):
    base = dict(data_root=str(data_root), output_dir=str(out), device="cpu", random_backbone=True,
                vit_embed_dim=32, vit_depth=2, vit_num_heads=2, vit_img_size=56, hidden_dim=32,
                image_scale=0.125, batch_size=4, max_epochs=1, max_steps=2, save_every=1, lr=1e-3, progress=False,
                val_subjects=["369"], log_every=1)
    base.update(kw)
    return base


@pytest.mark.slow
def test_tracker_ranks_stay_identical(tmp_path, data_root):
    run_dir = tmp_path / "run"
    records = run_two_ranks("tracker", tracker_kwargs(data_root, run_dir), tmp_path)
    check_ranks(records, run_dir, ("tracker.",))


# ----------------------------------------------------------------------------- resume under torchrun


def _cli(kwargs: dict) -> list:
    args = []
    for k, v in kwargs.items():
        if isinstance(v, bool):
            args.append(f"--{k}" if v else f"--no-{k}")
        elif isinstance(v, (list, tuple)):
            args += [f"--{k}", *map(str, v)]
        else:
            args += [f"--{k}", str(v)]
    return args


def torchrun(script: str, kwargs: dict, timeout: int = 600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "scripts" / script), *_cli(kwargs)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    return out


def check_resume(run_dir: Path, first_step: int):
    ckpt = torch.load(run_dir / "checkpoints" / "latest.pth", map_location="cpu", weights_only=False)
    assert int(ckpt["epoch"]) == 2 and int(ckpt["global_step"]) == 2 * first_step
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]  # epoch 1 kept from the first run, epoch 2 added
    return ckpt


@pytest.mark.slow
def test_decoder_resume_under_torchrun(tmp_path, data_root, template_path):
    run_dir = tmp_path / "ddp"
    kw = decoder_kwargs(data_root, template_path, run_dir, max_steps=0, max_epochs=1)
    out = torchrun("train_decoder.py", kw)
    first = torch.load(run_dir / "checkpoints" / "latest.pth", map_location="cpu", weights_only=False)
    # 2 subjects x 15 training views = 30 items over 2 ranks x batch 2 -> ceil(15 / 2) = 8 steps
    assert int(first["global_step"]) == 8
    assert out.stdout.count("epoch 1:") == 1  # only rank 0 prints
    out = torchrun("train_decoder.py", {**kw, "max_epochs": 2, "resume": True})
    assert "resumed from" in out.stdout
    second = check_resume(run_dir, 8)
    assert not torch.equal(first["w_vectors"], second["w_vectors"])


@pytest.mark.slow
def test_encoder_resume_under_torchrun(tmp_path, data_root, encoder_setup):
    run_dir = tmp_path / "ddp"
    kw = encoder_kwargs(data_root, encoder_setup, run_dir, max_steps=0, max_epochs=1)
    torchrun("train_encoder.py", kw)
    first = torch.load(run_dir / "checkpoints" / "latest.pth", map_location="cpu", weights_only=False)
    torchrun("train_encoder.py", {**kw, "max_epochs": 2, "resume": True})
    check_resume(run_dir, int(first["global_step"]))


@pytest.mark.slow
def test_tracker_resume_under_torchrun(tmp_path, data_root):
    run_dir = tmp_path / "ddp"
    kw = tracker_kwargs(data_root, run_dir, max_steps=0, max_epochs=1)
    torchrun("train_tracker.py", kw)
    first = torch.load(run_dir / "checkpoints" / "latest.pth", map_location="cpu", weights_only=False)
    torchrun("train_tracker.py", {**kw, "max_epochs": 2, "resume": True})
    check_resume(run_dir, int(first["global_step"]))


# ----------------------------------------------------------------------------- NCCL (GPU machines)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nccl_decoder_training(tmp_path, data_root, template_path):
    """NCCL: 2 ranks on 2 GPUs, or 1 rank when only one GPU (NCCL refuses two ranks on one device)."""
    n = min(2, torch.cuda.device_count())
    run_dir = tmp_path / "nccl"
    kw = decoder_kwargs(data_root, template_path, run_dir, device="cuda", dist_backend="nccl", max_steps=0)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={free_port()}",
           str(REPO / "scripts" / "train_decoder.py"), *_cli(kw)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{n} process(es), backend nccl" in out.stdout
    ckpt = torch.load(run_dir / "checkpoints" / "latest.pth", map_location="cpu", weights_only=False)
    assert int(ckpt["epoch"]) == 1
