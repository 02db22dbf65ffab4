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

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from fastavatar.config import config_to_dict, option, save_config
from fastavatar.data import MultiViewDataset, SubjectParser, discover_subjects
from fastavatar.losses import delta_regularisers, load_lpips, photometric_loss
from fastavatar.metrics import image_metrics, mean_metrics
from fastavatar.train.common import (
    RunDir,
    check_finite,
    distributed_info,
    progress,
    resolve_device,
    seed_everything,
)
from fastavatar.utils.io import atomic_save_image, atomic_write_json


@dataclass
class DecoderTrainConfig:
    # data
    data_root: str = option("data/nersemble", "folder of subject folders (<id>/ or <id>_<VHAP name>/)")
    subjects: List[str] = option([], "subject ids to train on (empty: all found)")
    max_subjects: int = option(417, "use at most this many subjects (sorted by id)")
    image_scale: float = option(1.0, "image scale: 1, 0.5 or 0.25 (intrinsics scaled to match)")
    val_views: List[int] = option([8], "view indices held out for validation (camera 8 is near-frontal)")
    # model
    ply_file_path: str = option("pretrained_weights/averaged_model.ply", "canonical template PLY (10144 Gaussians)")
    init_from: str = option("", "optional decoder checkpoint to start from (official or ours)")
    hidden_dim: int = option(256, "hypernetwork width (official: 256)")
    body_layers: int = option(6, "hypernetwork body depth (official: 6)")
    decoder_init: str = option("zero_out", "MLP init: 'original' (xavier gain 0.02) or 'zero_out' (default init, zero output layers)")
    w_init_std: float = option(1.0, "std of the initial W vectors (the original used randn, std 1)")
    # optimisation
    max_epochs: int = option(400, "epochs over all (subject, view) items")
    batch_size: int = option(1, "items per step (per process)")
    views_per_subject: int = option(1, "views of the same subject rendered per item (shares one decoder pass)")
    num_workers: int = option(0, "DataLoader workers (images are cached in memory)")
    mlp_lr: float = option(1e-4, "hypernetwork learning rate")
    w_lr: float = option(1e-4, "W vector learning rate")
    base_lr: float = option(0.0, "template (base_*) learning rate; 0 freezes it")
    embedding_lr: float = option(0.0, "per-Gaussian embedding learning rate; 0 freezes it")
    grad_clip: float = option(1.0, "gradient-norm clip for the MLP and for W")
    l1_weight: float = option(0.6, "L1 loss weight")
    ssim_weight: float = option(0.3, "1-SSIM loss weight")
    lpips_weight: float = option(0.1, "LPIPS loss weight (skipped when the LPIPS trunk is absent)")
    scale_reg: float = option(0.0, "weight of mean |Δ log-scale|")
    pos_reg: float = option(0.0, "weight of mean |Δ position|")
    lpips_net: str = option("alex", "LPIPS trunk: alex or vgg")
    # rendering
    sh_degree: int = option(3, "SH degree rendered")
    near: float = option(0.01, "near plane (m)")
    far: float = option(1e10, "far plane (m)")
    backend: str = option("auto", "renderer: auto (gsplat on CUDA, torch otherwise), torch or gsplat")
    # bookkeeping
    output_dir: str = option("runs/decoder", "run folder: config.yaml, checkpoints/, tb/, images/, stats/")
    log_every: int = option(10, "steps between TensorBoard scalar logs")
    save_every: int = option(10, "epochs between numbered checkpoints (latest.pth is written every epoch)")
    eval_every: int = option(5, "epochs between validation passes")
    save_images: bool = option(True, "save render|target images at validation")
    save_ply_files: bool = option(False, "write each training subject's splats.ply at the end")
    resume: bool = option(False, "resume from output_dir/checkpoints/latest.pth")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    seed: int = option(42, "random seed")
    max_steps: int = option(0, "stop after this many steps in total (0: no limit; for smoke tests)")
    progress: bool = option(True, "show progress bars")


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
    from fastavatar.checkpoints import load_decoder
    from fastavatar.models.decoder import DecoderConfig, GaussianDecoder
    from fastavatar.ply import load_ply

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
                            sh_degree=cfg.sh_degree, near_plane=cfg.near, far_plane=cfg.far, backend=cfg.backend)
        preds.append(out.rgb)
        targets.append(item["image"].to(device)[None])
    return torch.cat(preds), torch.cat(targets)


def train_decoder(cfg: DecoderTrainConfig) -> Path:
    """Train; returns the run folder. Raises :class:`NonFiniteLossError` on NaN (checkpoints kept)."""
    rank, world, local_rank = distributed_info()
    distributed = world > 1
    if distributed:
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
        dist.init_process_group(backend=backend)
        device = torch.device(f"cuda:{local_rank}") if backend == "nccl" else torch.device("cpu")
    else:
        device = resolve_device(cfg.device)
    is_main = rank == 0
    seed_everything(cfg.seed + rank)
    run = RunDir(Path(cfg.output_dir), is_main=is_main)
    if is_main:
        save_config(cfg, run.path)

    roots = discover_subjects(cfg.data_root, cfg.subjects or None, verbose=is_main)[: cfg.max_subjects]
    parsers = [SubjectParser(p, image_scale=cfg.image_scale) for p in roots]
    ids = [p.subject_id for p in parsers]
    w_ids_to_idx = {sid.zfill(3): i for i, sid in enumerate(ids)}
    width, height = parsers[0].width, parsers[0].height
    all_views = range(len(parsers[0]))
    train_views = [v for v in all_views if v not in set(cfg.val_views)]
    train_set = MultiViewDataset(parsers, views=train_views)
    val_set = MultiViewDataset(parsers, views=[v for v in cfg.val_views if v < len(parsers[0])])

    decoder = build_decoder(cfg, device)
    model = DecoderWithW(decoder, len(parsers), decoder.config.w_dim, cfg.w_init_std, cfg.seed).to(device)
    lr_of = {"w": cfg.w_lr, "mlp": cfg.mlp_lr, "base": cfg.base_lr, "embedding": cfg.embedding_lr}
    groups = {
        "w": [model.w_vectors],
        "mlp": list(decoder.conditioning_mlp.parameters()),
        "base": [p for p in decoder.base_parameters() if isinstance(p, nn.Parameter)],
        "embedding": [decoder.gaussian_embeddings.weight],
    }
    optimizers = {}
    for name, params in groups.items():
        if lr_of[name] > 0:
            optimizers[name] = torch.optim.Adam(params, lr=lr_of[name])
        else:  # frozen, as Adam(lr=0) in the original, without the optimizer state
            for p in params:
                p.requires_grad_(False)
    schedulers = {k: torch.optim.lr_scheduler.ReduceLROnPlateau(o, mode="min", factor=0.8, patience=20)
                  for k, o in optimizers.items()}

    start_epoch, global_step = 0, 0
    latest = run.checkpoints / "latest.pth"
    if cfg.resume:
        if not latest.is_file():
            raise FileNotFoundError(f"{latest}: --resume given but no checkpoint to resume from")
        state = torch.load(latest, map_location="cpu", weights_only=False)
        decoder.load_state_dict(state["model_dict"], strict=True)
        with torch.no_grad():
            model.w_vectors.copy_(state["w_vectors"].to(device))
        for k, o in optimizers.items():
            if k in (state.get("optimizer_states") or {}):
                o.load_state_dict(state["optimizer_states"][k])
        for k, s in schedulers.items():
            if k in ((state.get("extra") or {}).get("scheduler_states") or {}):
                s.load_state_dict(state["extra"]["scheduler_states"][k])
        start_epoch, global_step = int(state["epoch"]), int(state["global_step"])
        if is_main:
            print(f"[train] resumed from {latest} at epoch {start_epoch}, step {global_step}")

    ddp_model = model
    sampler = None
    if distributed:
        from torch.nn.parallel import DistributedDataParallel
        from torch.utils.data.distributed import DistributedSampler

        ddp_model = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
        num_workers=cfg.num_workers, collate_fn=collate_items, drop_last=False,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    lpips_model = load_lpips(cfg.lpips_net, device, quiet=not is_main) if cfg.lpips_weight > 0 else None
    metric_lpips = lpips_model

    def save_checkpoint(epoch: int, numbered: bool) -> None:
        if not is_main:
            return
        from fastavatar.checkpoints import save_decoder_checkpoint

        kwargs = dict(decoder=decoder, w_vectors=model.w_vectors.detach().cpu(), w_ids_to_idx=w_ids_to_idx,
                      epoch=epoch, global_step=global_step, config=config_to_dict(cfg),
                      optimizer_states={k: o.state_dict() for k, o in optimizers.items()},
                      extra={"scheduler_states": {k: s.state_dict() for k, s in schedulers.items()},
                             "subject_ids": ids, "image_scale": cfg.image_scale})
        save_decoder_checkpoint(latest, **kwargs)
        if numbered:
            save_decoder_checkpoint(run.checkpoints / f"epoch_{epoch:04d}.pth", **kwargs)

    history = []
    stop = False
    for epoch in range(start_epoch, cfg.max_epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        ddp_model.train()
        losses = []
        t0 = time.time()
        bar = progress(loader, is_main and cfg.progress, desc=f"epoch {epoch + 1}/{cfg.max_epochs}", leave=False)
        for items in bar:
            items = _expand_views(items, train_set, cfg.views_per_subject, parsers, train_views)
            subject_rows = sorted({it["subject_index"] for it in items})
            rows_of_items = [subject_rows.index(it["subject_index"]) for it in items]
            out = ddp_model(torch.tensor(subject_rows, device=device))
            pred, target = _render_items(out, rows_of_items, items, cfg, width, height, device)
            parts = photometric_loss(pred, target, cfg.l1_weight, cfg.ssim_weight, cfg.lpips_weight, lpips_model)
            regs = delta_regularisers(out["raw_deltas"], cfg.scale_reg, cfg.pos_reg)
            loss = parts["total"] + sum(regs.values()) if regs else parts["total"]
            check_finite(loss.detach(), global_step, run.path)
            for o in optimizers.values():
                o.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(decoder.conditioning_mlp.parameters(), cfg.grad_clip)
                torch.nn.utils.clip_grad_norm_([model.w_vectors], cfg.grad_clip)
            for o in optimizers.values():
                o.step()
            global_step += 1
            losses.append(float(loss.detach()))
            if is_main and global_step % max(cfg.log_every, 1) == 0:
                run.scalar("train/loss", float(loss), global_step)
                for k, v in {**parts, **regs}.items():
                    run.scalar(f"train/{k}", float(v), global_step)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{float(loss):.4f}")
            if cfg.max_steps and global_step >= cfg.max_steps:
                stop = True
                break
        mean_loss = _all_reduce_mean(sum(losses) / max(len(losses), 1), distributed)
        for s in schedulers.values():
            s.step(mean_loss)
        record = {"epoch": epoch + 1, "step": global_step, "train_loss": mean_loss, "seconds": time.time() - t0}
        if is_main:
            run.scalar("train/epoch_loss", mean_loss, epoch + 1)
            run.scalar("train/w_lr", optimizers["w"].param_groups[0]["lr"] if "w" in optimizers else 0.0, epoch + 1)
        last_epoch = stop or epoch + 1 == cfg.max_epochs
        if is_main and len(val_set) and ((epoch + 1) % max(cfg.eval_every, 1) == 0 or last_epoch):
            record["val"] = validate(model, val_set, cfg, width, height, device, run, epoch + 1, metric_lpips)
        history.append(record)
        if is_main:
            print(f"[train] epoch {epoch + 1}: loss {mean_loss:.4f}"
                  + (f", val PSNR {record['val']['psnr']:.2f} dB" if "val" in record else "")
                  + f" ({record['seconds']:.1f} s)")
        save_checkpoint(epoch + 1, numbered=(epoch + 1) % max(cfg.save_every, 1) == 0 or last_epoch)
        if stop:
            break
    if is_main:
        atomic_write_json(run.path / "history.json", history)
        if cfg.save_ply_files:
            save_subject_plys(model, parsers, run.path / "ply")
    run.close()
    if distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
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


def _all_reduce_mean(value: float, distributed: bool) -> float:
    if not distributed:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


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
    for k, v in summary.items():
        run.scalar(f"val/{k}", v, epoch)
    atomic_write_json(run.path / "stats" / f"val_epoch{epoch:04d}.json", {"mean": summary, "per_view": rows})
    model.train()
    return summary


@torch.no_grad()
def save_subject_plys(model: DecoderWithW, parsers: List[SubjectParser], out_dir: Path) -> None:
    """Each training subject's decoded splats with absolute means (points + Δ) as a standard PLY."""
    from fastavatar.ply import save_ply

    device = model.w_vectors.device
    for row, parser in enumerate(parsers):
        splats = model.decoder.decode(model.w_vectors[row : row + 1], parser.points.to(device))[0]
        save_ply(Path(out_dir) / f"{parser.subject_id}.ply", splats)
