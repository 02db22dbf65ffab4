"""Train Gaussian blendshapes (GaussianBlendshapes) on a tracked monocular video.

Input: a sequence in the INSTA/metrical-tracker or the VHAP-export layout
(:mod:`fastavatar.data.monocular`) and a starting rig: an analytic ``rig.npz``
(``scripts/build_rig.py``), or a reconstruction of the subject (``--splats``) that is rigged here
with the FLAME file and the sequence's tracked identity, in the pose of ``--source_frame``.
Model and losses: :mod:`fastavatar.animate.learn`. One random training frame per step (as the
paper); Adam with one learning rate per parameter kind. No densification: the Gaussian count is
the rig's, so the learned rig stays a sidecar of the same PLY.

Training runs in the shared loop (:mod:`fastavatar.train.loop`: TensorBoard, tqdm, resume,
atomic checkpoints, NaN guard); an epoch is ``steps_per_epoch`` random training frames, and
validation scores the held-out frames (``best.pth`` keeps the best PSNR).

Output in ``output_dir``: ``rig.npz`` (learned, same versioned format, ``kind = "learned"``),
``splats.ply`` (the learned neutral head, the PLY the rig belongs to), ``metrics.json``
(held-out PSNR/SSIM of the learned rig and of the starting rig), ``config.yaml``, TensorBoard
logs in ``tb/`` and resumable checkpoints in ``checkpoints/``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Tuple

import torch

from fastavatar.animate.learn import BlendshapeModel, BlendshapeModelConfig, photometric_terms
from fastavatar.config import config_to_dict, option
from fastavatar.train.loop import TrainLoopConfig, TrainTask


@dataclass
class BlendshapeTrainConfig(TrainLoopConfig, BlendshapeModelConfig):
    """Training options; the loop's knobs come from TrainLoopConfig, the model's masks, teeth and loss
    weights from BlendshapeModelConfig."""

    output_dir: str = option("runs/blendshapes", "run folder: rig.npz, splats.ply, metrics.json, tb/, checkpoints/")
    sequence: Optional[Path] = option(None, "tracked monocular sequence folder (INSTA checkpoint/+images/ or VHAP transforms.json)")
    rig: Optional[Path] = option(None, "starting analytic rig.npz (scripts/build_rig.py); or give --splats")
    splats: Optional[Path] = option(None, "starting reconstruction of the subject (rigged here; needs the FLAME file)")
    flame_model: Optional[Path] = option(None, "FLAME file for --splats (default pretrained_weights/flame/flame2023.pkl)")
    source_frame: int = option(0, "with --splats: the sequence frame whose pose the reconstruction shows")
    layout: Literal["auto", "insta", "vhap"] = option("auto", "sequence layout (auto: detected from the folder)")
    num_expr: int = option(50, "expression bases with learned deltas (the paper: 50)")
    max_frames: Optional[int] = option(None, "use at most this many frames of the sequence")
    num_test: int = option(350, "last frames held out for evaluation (the paper's INSTA split: 350)")
    val_frames: int = option(0, "held-out frames scored at each validation, evenly spaced (0: all)")
    image_scale: float = option(1.0, "train at this fraction of the frame resolution")
    max_epochs: int = option(80, "epochs of steps_per_epoch frames (80 x 500 = the paper's 40000 iterations)")
    steps_per_epoch: int = option(500, "optimisation steps per epoch, one random training frame each")
    grad_clip: float = option(0.0, "gradient-norm clip per parameter group (0: off, as the paper)")
    save_every: int = option(10, "epochs between numbered checkpoints (latest.pth is written every epoch)")
    lr_means: float = option(1.6e-4, "Adam lr of the neutral positions (metres)")
    lr_quats: float = option(1e-3, "Adam lr of the neutral rotations")
    lr_scales: float = option(5e-3, "Adam lr of the neutral log-scales")
    lr_opacities: float = option(5e-2, "Adam lr of the neutral opacity logits")
    lr_sh0: float = option(2.5e-3, "Adam lr of the neutral SH DC colour")
    lr_shN: float = option(1.25e-4, "Adam lr of the neutral SH bands 1-3")
    lr_dmeans: float = option(1e-5, "Adam lr of the position deltas")
    lr_drotvecs: float = option(1e-4, "Adam lr of the rotation deltas")
    lr_dlog_scales: float = option(5e-4, "Adam lr of the log-scale deltas")
    lr_dsh0: float = option(1.25e-3, "Adam lr of the colour deltas")
    lr_dopacities: float = option(5e-4, "Adam lr of the opacity deltas")
    sh_degree: int = option(3, "SH degree rendered")
    background: Tuple[float, float, float] = option((0.0, 0.0, 0.0), "render/target background (the paper: black)")
    render_backend: Literal["auto", "numba", "torch", "gsplat"] = option("auto", "renderer (fastavatar.render; auto: gsplat on CUDA, numba on CPU)")


class BlendshapeTrainError(ValueError):
    """A bad combination of inputs (one-line message)."""


def check_inputs(cfg: BlendshapeTrainConfig) -> None:
    """Contradictory or missing flags, before anything is read (one-line :class:`BlendshapeTrainError`)."""
    if cfg.sequence is None:
        raise BlendshapeTrainError("--sequence is required (a tracked monocular sequence folder)")
    if (cfg.rig is None) == (cfg.splats is None):
        raise BlendshapeTrainError("give exactly one of --rig (an analytic rig.npz) or --splats (a reconstruction to rig)")
    if cfg.rig is not None and cfg.flame_model is not None:
        raise BlendshapeTrainError("--flame_model is only used with --splats (a --rig already holds its FLAME data)")


def starting_rig(cfg: BlendshapeTrainConfig, sequence):
    """The analytic rig training starts from (from ``cfg.rig``, or rigging ``cfg.splats`` here)."""
    from fastavatar.animate import build_rig, load_rig

    check_inputs(cfg)
    if cfg.rig is not None:
        return load_rig(cfg.rig)
    from fastavatar.flame import load_flame_model
    from fastavatar.io.ply import load_ply

    if not 0 <= cfg.source_frame < len(sequence):
        raise BlendshapeTrainError(f"--source_frame {cfg.source_frame} out of range: the sequence has {len(sequence)} frames")
    model = load_flame_model(cfg.flame_model)
    params = dict(sequence.frames[cfg.source_frame].params)
    params.update(sequence.identity())
    return build_rig(model, load_ply(cfg.splats), params, num_expr=cfg.num_expr)


class _FrameCache:
    """Frames and masks at the training resolution, kept as uint8 after the first read."""

    def __init__(self, sequence, image_scale: float):
        self.sequence, self.scale, self.items = sequence, image_scale, {}

    def get(self, index: int):
        if index not in self.items:
            rgb, mask = self.sequence.load(index, self.scale)
            self.items[index] = (torch.cat([rgb, mask], -1) * 255 + 0.5).to(torch.uint8)
        packed = self.items[index].float() / 255.0
        return packed[..., :3], packed[..., 3:]


def render_frame(splats, sequence, index: int, cfg: BlendshapeTrainConfig, device):
    """Render raw splats in frame ``index``'s camera -> (rgb [H,W,3], alpha [H,W,1])."""
    from fastavatar.render import render_splats

    c2w, K, width, height = sequence.camera(index, cfg.image_scale)
    out = render_splats(splats, c2w.to(device), K.to(device), width, height, sh_degree=cfg.sh_degree,
                        background=cfg.background, backend=cfg.render_backend)
    return out.rgb[0], out.alpha[0]


def _frame_params(sequence, index: int, device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in sequence.frames[index].params.items()}


@torch.no_grad()
def evaluate_rig_on_frames(rig, sequence, frames: List[int], cfg: BlendshapeTrainConfig, device, cache=None) -> Dict[str, float]:
    """Mean PSNR and SSIM of a rig (fast path, :func:`evaluate_rig`) over ``frames``; ground truth is the
    frame composited with its mask onto the background (the paper's protocol)."""
    from fastavatar.animate import evaluate_rig, pack_rig
    from fastavatar.eval.metrics import image_metrics

    rig = pack_rig(rig)
    cache = cache or _FrameCache(sequence, cfg.image_scale)
    background = torch.tensor(cfg.background, device=device)
    rows = []
    for i in frames:
        rgb, _ = render_frame(evaluate_rig(rig, _frame_params(sequence, i, device)), sequence, i, cfg, device)
        target, mask = (t.to(device) for t in cache.get(i))
        rows.append(image_metrics(rgb, target * mask + background * (1 - mask)))
    return {"psnr": sum(r["psnr"] for r in rows) / len(rows), "ssim": sum(r["ssim"] for r in rows) / len(rows),
            "num_frames": len(rows)}


class BlendshapeTask(TrainTask):
    """Learned Gaussian blendshapes on one tracked sequence, for :func:`fastavatar.train.loop.run_training`."""

    name = "blendshapes"

    def __init__(self, cfg: BlendshapeTrainConfig, sequence, rig, train_ids: List[int], val_ids: List[int], device):
        self.cfg, self.sequence, self.device = cfg, sequence, device
        self.train_ids, self.val_ids = train_ids, val_ids
        self.model = BlendshapeModel(rig, cfg).to(device)
        groups = [{"params": [getattr(self.model, f"rest_{key}")], "lr": getattr(cfg, f"lr_{key}")}
                  for key in ("means", "quats", "scales", "opacities", "sh0", "shN")]
        groups += [{"params": [getattr(self.model, f"res_{name}")], "lr": getattr(cfg, f"lr_{name}")}
                   for name in ("dmeans", "drotvecs", "dlog_scales", "dsh0", "dopacities")]
        self.optimizers = {"blendshapes": torch.optim.Adam(groups, eps=1e-15)}
        self.schedulers: Dict[str, Any] = {}
        self.cache = _FrameCache(sequence, cfg.image_scale)
        self.background = torch.tensor(cfg.background, device=device)
        self.last_val: Dict[str, float] = {}

    def batches(self, epoch: int):
        rng = random.Random(self.cfg.seed * 100003 + epoch)  # the same frames after a resume
        for _ in range(self.cfg.steps_per_epoch):
            yield rng.choice(self.train_ids)

    def losses(self, index: int):
        target, mask = (t.to(self.device) for t in self.cache.get(index))
        rgb, alpha = render_frame(self.model(_frame_params(self.sequence, index, self.device)), self.sequence, index,
                                  self.cfg, self.device)
        terms = photometric_terms(rgb, alpha, target, mask, self.background, self.cfg)
        terms.update(self.model.regularisers())
        terms["total"] = sum(terms.values())
        return terms, 1

    def clip_groups(self):
        return [list(self.model.parameters())]

    def validate(self, epoch: int) -> Dict[str, float]:
        ids = self.val_ids
        if self.cfg.val_frames and self.cfg.val_frames < len(ids):
            step = len(ids) / self.cfg.val_frames
            ids = [ids[int(i * step)] for i in range(self.cfg.val_frames)]
        scores = evaluate_rig_on_frames(self.model.to_rig(), self.sequence, ids, self.cfg, self.device, self.cache)
        self.last_val = {"psnr": scores["psnr"], "ssim": scores["ssim"]}
        return self.last_val

    def best_score(self, val: Mapping[str, float]) -> Optional[float]:
        return val.get("psnr")

    def save_checkpoint(self, path: Path, epoch: int, global_step: int, record) -> None:
        from fastavatar.io.atomic import atomic_torch_save

        atomic_torch_save({
            "model_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer_dict": self.optimizers["blendshapes"].state_dict(),
            "epoch": int(epoch), "global_step": int(global_step), "config": config_to_dict(self.cfg),
            "format": "fastavatar-blendshapes-train",
            "extra": {"best_score": record["best_score"], "val": dict(self.last_val), "train_loss": record["train_loss"]},
        }, path)

    def load_checkpoint(self, ckpt) -> None:
        if ckpt.get("format") != "fastavatar-blendshapes-train":
            raise ValueError(f"not a blendshape training checkpoint (format {ckpt.get('format')!r})")
        self.model.load_state_dict(ckpt["model_dict"], strict=True)
        self.optimizers["blendshapes"].load_state_dict(ckpt["optimizer_dict"])

    def epoch_summary(self, record) -> str:
        val = record.get("val")
        return f"train loss {record['train_loss']:.5f}" + (f", held-out PSNR {val['psnr']:.2f} dB" if val else "")


def train_blendshapes(cfg: BlendshapeTrainConfig) -> Dict[str, object]:
    """Train and write the learned rig (see module doc). Returns the metrics dict (also ``metrics.json``)."""
    from fastavatar.animate.rig import save_rig
    from fastavatar.config import save_config
    from fastavatar.data.monocular import load_monocular_sequence
    from fastavatar.io.atomic import atomic_write_json
    from fastavatar.io.ply import save_ply
    from fastavatar.runtime import resolve_device, seed_everything
    from fastavatar.train.distributed import DistEnv
    from fastavatar.train.loop import open_run, run_training

    check_inputs(cfg)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    sequence = load_monocular_sequence(cfg.sequence, None if cfg.layout == "auto" else cfg.layout, cfg.max_frames)
    train_ids, test_ids = sequence.split(cfg.num_test)
    init_rig = starting_rig(cfg, sequence)
    if init_rig.num_expr < cfg.num_expr:
        print(f"[blendshapes] the starting rig has {init_rig.num_expr} expression bases; learning deltas for those "
              f"(--num_expr {cfg.num_expr} asked for more)")
    init_rig = init_rig.truncated(min(cfg.num_expr, init_rig.num_expr)).to(torch.float32, device=device)
    run = open_run(cfg, DistEnv.single(device))  # refuses another run's checkpoints; cleans interrupted writes
    save_config(cfg, run.path)
    try:
        task = BlendshapeTask(cfg, sequence, init_rig, train_ids, test_ids, device)
        history = run_training(task, cfg, run, DistEnv.single(device))
        learned = task.model.to_rig()
        metrics = {
            "train_frames": len(train_ids), "test_frames": len(test_ids),
            "steps": history[-1]["step"] if history else None,
            "learned": evaluate_rig_on_frames(learned, sequence, test_ids, cfg, device, task.cache),
            "starting_rig": evaluate_rig_on_frames(init_rig, sequence, test_ids, cfg, device, task.cache),
        }
        save_rig(run.path / "rig.npz", learned)
        save_ply(run.path / "splats.ply", {k: v.detach().float().cpu() for k, v in learned.rest.items()})
        atomic_write_json(run.path / "metrics.json", metrics)
    finally:
        run.close()
    print(f"[blendshapes] held-out PSNR {metrics['learned']['psnr']:.2f} dB (starting rig "
          f"{metrics['starting_rig']['psnr']:.2f} dB) over {len(test_ids)} frames; wrote {run.path / 'rig.npz'}")
    return metrics
