"""Decoder training: per-subject W vectors and the hypernetwork, trained jointly on multi-view
captures (spec §5.1), with the original's bugs fixed:

- white background composited once (the original applied alpha twice);
- LPIPS fed [-1, 1] (``normalize=True``); it is skipped with a one-line note when the trunk
  weights are not in the torch-hub cache;
- ``ReduceLROnPlateau`` without the removed ``verbose`` argument;
- the scale regulariser pulls the log-scale deltas toward zero (the original's mean(exp(Δ))
  pushed them negative);
- ``--save_ply_files`` writes absolute means (points + Δ), keyed by string subject ids.

Improvements: batch size > 1 (items of the same subject share one decoder pass), several views
per subject per step, DistributedDataParallel under ``torchrun`` (the W table lives inside the
DDP module, so its rows are all-reduced like every other parameter and all ranks stay in sync),
a held-out validation split (views), TensorBoard, resumable atomic checkpoints, a NaN guard.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Literal, Optional

import torch
import torch.nn as nn

from fastavatar.config import config_to_dict, option, save_config
from fastavatar.data import MultiViewDataset, SubjectParser, discover_subjects
from fastavatar.data.colmap import parse_subjects
from fastavatar.losses import delta_regularisers, load_lpips, photometric_loss
from fastavatar.render.released_flags import check_render_flags, gsplat_only_kwargs
from fastavatar.eval.metrics import image_metrics, mean_metrics
from fastavatar.data.subject_ids import make_w_ids_to_idx
from fastavatar.io.atomic import atomic_save_image, atomic_write_json
from fastavatar.io.checkpoints import save_decoder_checkpoint
from fastavatar.runtime import seed_everything
from fastavatar.train.common import RunDir
from fastavatar.train.distributed import DistEnv, distributed_session, make_sampler, set_epoch, wrap_ddp
from fastavatar.train.loop import TrainLoopConfig, TrainTask, open_run, run_training


@dataclass
class DecoderTrainConfig(TrainLoopConfig):
    """Decoder training (the shared loop's knobs: :class:`fastavatar.train.loop.TrainLoopConfig`)."""

    # loop defaults for this trainer
    output_dir: str = option("runs/decoder", "run folder: config.yaml, checkpoints/, tb/, images/, stats/",
                             aliases=("save_path",))
    max_epochs: int = option(400, "epochs over all (subject, view) items")
    eval_every: int = option(5, "epochs between validation passes (the last epoch is always validated)")
    # data
    data_root: str = option("data/nersemble", "folder of subject folders (<id>/ or <id>_<VHAP name>/)")
    subjects: List[str] = option([], "subject ids to train on (empty: all found)")
    max_subjects: int = option(417, "use at most this many subjects (sorted by id)")
    image_scale: float = option(1.0, "image scale: 1, 0.5 or 0.25 (intrinsics scaled to match)")
    val_views: List[int] = option([8], "view indices held out for validation (camera 8 is near-frontal)")
    allow_resize: bool = option(False, "resize images / masks whose size differs from their COLMAP camera (else an error)")
    on_bad_subject: Literal["skip", "stop"] = option(
        "skip", "a subject folder that cannot be parsed: skip it (said, and listed in data_summary.json) or stop")
    # model
    ply_file_path: str = option("pretrained_weights/averaged_model.ply", "canonical template PLY (10144 Gaussians)")
    init_from: str = option("", "optional decoder checkpoint to start from (official or ours)")
    hidden_dim: int = option(256, "hypernetwork width (official: 256)")
    body_layers: int = option(6, "hypernetwork body depth (official: 6)")
    decoder_init: Literal["zero_out", "original"] = option("zero_out", "MLP init: 'original' (xavier gain 0.02) or 'zero_out' (default init, zero output layers)")
    w_init_std: float = option(1.0, "std of the initial W vectors (the original used randn, std 1)")
    # optimisation
    batch_size: int = option(1, "items per step (per process)")
    views_per_subject: int = option(1, "views of the same subject rendered per item (shares one decoder pass)")
    num_workers: int = option(0, "DataLoader workers (images are cached in memory)")
    mlp_lr: float = option(1e-4, "hypernetwork learning rate")
    w_lr: float = option(1e-4, "W vector learning rate")
    base_lr: float = option(0.0, "template (base_*) learning rate; 0 freezes it")
    embedding_lr: float = option(0.0, "per-Gaussian embedding learning rate; 0 freezes it")
    l1_weight: float = option(0.6, "L1 loss weight")
    ssim_weight: float = option(0.3, "1-SSIM loss weight")
    lpips_weight: float = option(0.1, "LPIPS loss weight (skipped when the LPIPS trunk is absent)")
    scale_reg: float = option(0.0, "weight of mean |Δ log-scale|")
    pos_reg: float = option(0.0, "weight of mean |Δ position|")
    lpips_net: Literal["alex", "vgg"] = option("alex", "LPIPS trunk: alex or vgg")
    # rendering
    sh_degree: int = option(3, "SH degree rendered")
    near: float = option(0.01, "near plane (m)", aliases=("near_plane",))
    far: float = option(1e10, "far plane (m)", aliases=("far_plane",))
    render_backend: Literal["auto", "numba", "torch", "gsplat"] = option(
        "auto", "renderer: auto (gsplat on CUDA, numba on CPU, torch without numba), numba, torch or gsplat")
    camera_model: str = option("pinhole", "camera model (the released flag): only pinhole is supported")
    antialiased: bool = option(False, "gsplat's rasterize_mode='antialiased' (opacity compensation, all backends)")
    packed: bool = option(False, "gsplat packed mode (gsplat only; the CPU backends say they do not use it)")
    sparse_grad: bool = option(False, "gsplat sparse gradients, needs --packed (gsplat only)")
    # bookkeeping
    save_images: bool = option(True, "save render|target images at validation")
    save_ply_files: bool = option(False, "write each training subject's splats.ply at the end")

    def check(self) -> None:
        """One-line ValueError naming the flag of the first out-of-range value."""
        import math

        super().check()
        check_render_flags(self)
        if not (isinstance(self.image_scale, (int, float)) and 0 < self.image_scale <= 1):
            raise ValueError(f"--image_scale must be in (0, 1], got {self.image_scale}")
        for name in ("batch_size", "views_per_subject", "max_subjects", "hidden_dim", "body_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("mlp_lr", "w_lr", "base_lr", "embedding_lr", "w_init_std", "l1_weight", "ssim_weight",
                     "lpips_weight", "scale_reg", "pos_reg"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"--{name} must be a finite number >= 0, got {value}")
        if not 0 <= self.sh_degree <= 3:
            raise ValueError(f"--sh_degree must be 0..3, got {self.sh_degree}")
        if self.num_workers < 0:
            raise ValueError(f"--num_workers must be >= 0, got {self.num_workers}")


class DecoderWithW(nn.Module):
    """The trainable unit: decoder + W table, so DDP synchronises both."""

    def __init__(self, decoder: nn.Module, num_subjects: int, w_dim: int, w_init_std: float, seed: int) -> None:
        super().__init__()
        self.decoder = decoder
        gen = torch.Generator().manual_seed(seed)
        self.w_vectors = nn.Parameter(torch.randn(num_subjects, w_dim, generator=gen) * w_init_std)

    def forward(self, rows: torch.Tensor) -> dict:
        return self.decoder(self.w_vectors[rows])


def collate_items(items: List[dict]) -> List[dict]:
    return items


def build_decoder(cfg: DecoderTrainConfig, device):
    from fastavatar.io.checkpoints import load_decoder
    from fastavatar.models.decoder import DecoderConfig, GaussianDecoder
    from fastavatar.io.ply import load_ply

    if cfg.init_from:
        decoder, _, _ = load_decoder(cfg.init_from, device="cpu")
        return decoder.to(device)
    template_path = Path(cfg.ply_file_path)
    if not template_path.is_file():
        raise FileNotFoundError(
            f"{template_path}: template not found; build one with `python scripts/build_template.py "
            f"--data_root {cfg.data_root} --output {template_path}` or put the official averaged_model.ply there"
        )
    template = load_ply(template_path)
    dcfg = DecoderConfig(hidden_dim=cfg.hidden_dim, body_layers=cfg.body_layers, init=cfg.decoder_init,
                         sh_degree=3, seed=cfg.seed)
    return GaussianDecoder(template, dcfg).to(device)


def _render_items(model_out: dict, rows_of_items: List[int], items: List[dict], cfg, width, height, device):
    """Render each item with its subject's decoded splats; returns (pred [B,H,W,3], target [B,H,W,3])."""
    from fastavatar.models.decoder import splats_from_output
    from fastavatar.render import render_splats

    preds, targets = [], []
    for u, item in zip(rows_of_items, items):
        one = {k: (v[u : u + 1] if torch.is_tensor(v) else v) for k, v in model_out.items() if k != "raw_deltas"}
        splats = splats_from_output(one, item["points"].to(device))[0]
        out = render_splats(splats, item["c2w"].to(device), item["K"].to(device), width, height,
                            sh_degree=cfg.sh_degree, near_plane=cfg.near, far_plane=cfg.far, backend=cfg.render_backend,
                            antialiased=cfg.antialiased, **gsplat_only_kwargs(cfg, device))
        preds.append(out.rgb)
        targets.append(item["image"].to(device)[None])
    return torch.cat(preds), torch.cat(targets)


class DecoderTask(TrainTask):
    """Decoder + W table on (subject, view) items, for :func:`fastavatar.train.loop.run_training`."""

    name = "train"
    lr_keys = {"w": ["w_lr"], "mlp": ["mlp_lr"], "base": ["base_lr"], "embedding": ["embedding_lr"]}

    def __init__(self, cfg: DecoderTrainConfig, env: DistEnv, run: RunDir) -> None:
        self.cfg, self.env, self.run = cfg, env, run
        device = env.device
        self.skipped: List[dict] = []
        roots = discover_subjects(cfg.data_root, cfg.subjects or None, verbose=env.is_main,
                                  skipped=self.skipped)[: cfg.max_subjects]
        self.parsers = parse_subjects(roots, cfg.on_bad_subject, verbose=env.is_main, skipped=self.skipped,
                                      image_scale=cfg.image_scale, allow_resize=cfg.allow_resize)
        self.ids = [p.subject_id for p in self.parsers]
        self.w_ids_to_idx = make_w_ids_to_idx(self.ids)  # rows follow the parsers (both sorted by id)
        self.width, self.height = self.parsers[0].width, self.parsers[0].height
        num_views = len(self.parsers[0])
        bad_views = [v for v in cfg.val_views if not 0 <= v < num_views]
        if bad_views:
            raise ValueError(f"--val_views {bad_views}: the subjects have {num_views} views (0..{num_views - 1})")
        all_views = range(num_views)
        self.train_views = [v for v in all_views if v not in set(cfg.val_views)]
        self.train_set = MultiViewDataset(self.parsers, views=self.train_views)
        self.val_set = MultiViewDataset(self.parsers, views=[v for v in cfg.val_views if v < len(self.parsers[0])])

        self.decoder = build_decoder(cfg, device)
        self.model = DecoderWithW(self.decoder, len(self.parsers), self.decoder.config.w_dim, cfg.w_init_std,
                                  cfg.seed).to(device)
        lr_of = {"w": cfg.w_lr, "mlp": cfg.mlp_lr, "base": cfg.base_lr, "embedding": cfg.embedding_lr}
        groups = {
            "w": [self.model.w_vectors],
            "mlp": list(self.decoder.conditioning_mlp.parameters()),
            "base": [p for p in self.decoder.base_parameters() if isinstance(p, nn.Parameter)],
            "embedding": [self.decoder.gaussian_embeddings.weight],
        }
        self.optimizers = {}
        for name, params in groups.items():
            if lr_of[name] > 0:
                self.optimizers[name] = torch.optim.Adam(params, lr=lr_of[name])
            else:  # frozen, as Adam(lr=0) in the original, without the optimizer state
                for p in params:
                    p.requires_grad_(False)
        self.schedulers = {k: torch.optim.lr_scheduler.ReduceLROnPlateau(o, mode="min", factor=0.8, patience=20)
                           for k, o in self.optimizers.items()}

        self.ddp_model = wrap_ddp(self.model, env)  # the W table is inside: its rows are all-reduced too
        self.sampler = make_sampler(self.train_set, env, shuffle=True, seed=cfg.seed)
        self.loader = torch.utils.data.DataLoader(
            self.train_set, batch_size=cfg.batch_size, shuffle=self.sampler is None, sampler=self.sampler,
            num_workers=cfg.num_workers, collate_fn=collate_items, drop_last=False,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        self.lpips_model = load_lpips(cfg.lpips_net, device, quiet=not env.is_main) if cfg.lpips_weight > 0 else None

    def batches(self, epoch: int):
        set_epoch(self.sampler, epoch - 1)
        self.ddp_model.train()
        return self.loader

    def losses(self, items):
        cfg, device = self.cfg, self.env.device
        items = _expand_views(items, self.train_set, cfg.views_per_subject, self.parsers, self.train_views)
        subject_rows = sorted({it["subject_index"] for it in items})
        rows_of_items = [subject_rows.index(it["subject_index"]) for it in items]
        out = self.ddp_model(torch.tensor(subject_rows, device=device))
        pred, target = _render_items(out, rows_of_items, items, cfg, self.width, self.height, device)
        parts = photometric_loss(pred, target, cfg.l1_weight, cfg.ssim_weight, cfg.lpips_weight, self.lpips_model)
        regs = delta_regularisers(out["raw_deltas"], cfg.scale_reg, cfg.pos_reg)
        photometric = parts.pop("total")
        loss = photometric + sum(regs.values()) if regs else photometric
        return {**parts, "photometric": photometric, **regs, "total": loss}, len(items)

    def clip_groups(self):
        return [list(self.decoder.conditioning_mlp.parameters()), [self.model.w_vectors]]

    def validate(self, epoch: int) -> Dict[str, float]:
        if not len(self.val_set):
            return {}
        return validate(self.model, self.val_set, self.cfg, self.width, self.height, self.env.device, self.run, epoch,
                        self.lpips_model)

    def save_checkpoint(self, path: Path, epoch: int, global_step: int, record) -> None:
        save_decoder_checkpoint(
            path, decoder=self.decoder, w_vectors=self.model.w_vectors.detach().cpu(), w_ids_to_idx=self.w_ids_to_idx,
            epoch=epoch, global_step=global_step, config=config_to_dict(self.cfg),
            optimizer_states={k: o.state_dict() for k, o in self.optimizers.items()},
            extra={"scheduler_states": {k: s.state_dict() for k, s in self.schedulers.items()},
                   "subject_ids": self.ids, "image_scale": self.cfg.image_scale, "best_score": record["best_score"]})

    def load_checkpoint(self, ckpt) -> None:
        self.decoder.load_state_dict(ckpt["model_dict"], strict=True)
        with torch.no_grad():
            self.model.w_vectors.copy_(ckpt["w_vectors"].to(self.env.device))
        for k, o in self.optimizers.items():
            if k in (ckpt.get("optimizer_states") or {}):
                o.load_state_dict(ckpt["optimizer_states"][k])
        for k, s in self.schedulers.items():
            if k in ((ckpt.get("extra") or {}).get("scheduler_states") or {}):
                s.load_state_dict(ckpt["extra"]["scheduler_states"][k])

    def epoch_summary(self, record) -> str:
        val = record.get("val")
        return f"loss {record['train_loss']:.4f}" + (f", val PSNR {val['psnr']:.2f} dB" if val else "")


def train_decoder(cfg: DecoderTrainConfig) -> Path:
    """Train; returns the run folder. Raises :class:`NonFiniteLossError` on NaN (checkpoints kept)."""
    with distributed_session(cfg.device, cfg.dist_backend) as env:
        seed_everything(cfg.seed + env.rank)
        run = open_run(cfg, env)
        if env.is_main:
            save_config(cfg, run.path)
        task = DecoderTask(cfg, env, run)
        if env.is_main:
            atomic_write_json(run.path / "data_summary.json", {"subjects": task.ids, "skipped": task.skipped})
        run_training(task, cfg, run, env)
        if env.is_main and task.skipped:
            print(f"[train] skipped {len(task.skipped)} subject(s): "
                  + "; ".join(f"{s['subject']} ({s['reason']})" for s in task.skipped) + " (see data_summary.json)")
        if env.is_main and cfg.save_ply_files:
            save_subject_plys(task.model, task.parsers, run.path / "ply")
        run.close()
        return run.path


def _expand_views(items, dataset: MultiViewDataset, views_per_subject: int, parsers, train_views) -> List[dict]:
    """Add ``views_per_subject - 1`` random extra training views of each item's subject."""
    if views_per_subject <= 1:
        return items
    out = []
    for it in items:
        out.append(it)
        others = [v for v in train_views if v != it["view_index"]]
        pick = torch.randperm(len(others))[: views_per_subject - 1].tolist()
        for j in pick:
            out.append(dataset[dataset.index_of(it["subject_index"], others[j])])
    return out


@torch.no_grad()
def validate(model: DecoderWithW, val_set: MultiViewDataset, cfg, width, height, device, run: RunDir, epoch: int,
             lpips_model) -> Dict[str, Optional[float]]:
    """Render every held-out view; log metrics, write stats/val_epoch_XXXX.json and image grids."""
    model.eval()
    rows = []
    for index in range(len(val_set)):
        item = val_set[index]
        out = model(torch.tensor([item["subject_index"]], device=device))
        pred, target = _render_items(out, [0], [item], cfg, width, height, device)
        metrics = image_metrics(pred[0].cpu(), target[0].cpu(), item["mask"], lpips_model)
        rows.append({"subject_id": item["subject_id"], "view": item["image_name"], **metrics})
        side_by_side = torch.cat([pred[0].cpu(), target[0].cpu()], dim=1)
        run.image(f"val/{item['subject_id']}_{item['view_index']:02d}", side_by_side, epoch)
        if cfg.save_images:
            atomic_save_image(run.images / f"val_epoch{epoch:04d}_{item['subject_id']}_{item['view_index']:02d}.png",
                              side_by_side.numpy())
    summary = mean_metrics([{k: r[k] for k in ("psnr", "ssim", "lpips")} for r in rows])
    atomic_write_json(run.path / "stats" / f"val_epoch{epoch:04d}.json", {"mean": summary, "per_view": rows})
    model.train()
    return summary


@torch.no_grad()
def save_subject_plys(model: DecoderWithW, parsers: List[SubjectParser], out_dir: Path) -> None:
    """Each training subject's decoded splats with absolute means (points + Δ) as a standard PLY."""
    from fastavatar.io.ply import save_ply

    device = model.w_vectors.device
    for row, parser in enumerate(parsers):
        splats = model.decoder.decode(model.w_vectors[row : row + 1], parser.points.to(device))[0]
        save_ply(Path(out_dir) / f"{parser.subject_id}.ply", splats)
