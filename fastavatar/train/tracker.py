"""DINOv2 point + pose tracker training (spec §5.3; the original never released this script).

Data: VHAP/NeRSemble subjects in COLMAP layout (:class:`fastavatar.data.SubjectParser`). One
item = one view of one subject:
- input: the view (white background) squashed to 224x224 and ImageNet-normalised
  (:func:`fastavatar.models.tracker.preprocess_for_tracker`, ``squash`` like the released
  inference, or ``pad``);
- targets: the subject's 10144 FLAME-face centroids ``points [N,3]`` (world frame, as the
  no-guidance path feeds them straight to the decoder) and that view's OpenCV c2w
  ``rotation_matrix [3,3]`` / ``translation [3]``.

Losses (:func:`fastavatar.models.tracker.tracker_loss`): points L2 (MSE, released) or L1,
geodesic rotation angle, translation MSE; each weighted. The ``mean_shape`` buffer is set to
the training subjects' mean point cloud (the released loader reads such a ``mean_shape`` from
``metadata.json``), so the head learns residuals around it.

The backbone starts from ``pretrained_weights/dinov2_vitb14_pretrain.pth`` (facebookresearch
names; a clear error when missing) unless ``--random_backbone``; ``--freeze_backbone``
(default) trains only the heads and the learnable mean shape.

Validation: held-out subjects (``--val_subjects``; default the last subject when there are at
least two): mean point error (m), rotation error (deg), camera-centre error (m). TensorBoard,
tqdm, atomic resumable checkpoints in the released layout (``model_state_dict`` with the
``encoder.`` prefix, plus optimizer/scheduler/config), and ``metadata.json`` / ``args.json``
sidecars in the run folder (= ``checkpoints/..``, where the released loader looks).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from fastavatar.config import config_to_dict, option, save_config
from fastavatar.utils.io import atomic_write_json, atomic_write_text


@dataclass
class TrackerTrainConfig:
    # data
    data_root: str = option("data/nersemble", "folder of subject folders (<id>/ with sparse/ and images/)")
    max_subjects: int = option(417, "use at most this many subjects (sorted by id)")
    val_subjects: List[str] = option([], "subject ids held out for validation (empty: the last subject if >= 2)")
    image_scale: float = option(0.5, "scale at which views are read before the 224x224 resize")
    preprocess: str = option("squash", "tracker input: squash (released inference) or pad (aspect kept)")
    num_workers: int = option(0, "DataLoader workers")
    cache_images: bool = option(True, "keep preprocessed 224x224 inputs in memory")
    # model
    backbone_weights: str = option("pretrained_weights/dinov2_vitb14_pretrain.pth", "DINOv2 backbone weights (facebookresearch names)")
    random_backbone: bool = option(False, "start from a random backbone (tests / smoke runs only)")
    dino_model: str = option("dinov2_vitb14", "backbone preset: dinov2_vits14, dinov2_vitb14, dinov2_vitl14")
    vit_embed_dim: int = option(0, "override backbone width (0: preset; tests use a tiny ViT)")
    vit_depth: int = option(0, "override backbone depth (0: preset)")
    vit_num_heads: int = option(0, "override backbone heads (0: preset)")
    vit_img_size: int = option(518, "backbone pretraining resolution (pos_embed grid)")
    hidden_dim: int = option(1024, "head MLP width (released: 1024)")
    num_layers: int = option(3, "hidden blocks per head (released: 3)")
    dropout: float = option(0.1, "head dropout during training")
    freeze_backbone: bool = option(True, "train only the heads and the learnable mean shape")
    # optimisation
    lr: float = option(1e-4, "Adam learning rate of the heads")
    backbone_lr: float = option(1e-5, "learning rate of the backbone when not frozen")
    weight_decay: float = option(0.0, "AdamW weight decay")
    batch_size: int = option(8, "views per step")
    max_epochs: int = option(100, "epochs")
    points_loss: str = option("l2", "points loss: l2 (MSE, released) or l1")
    points_weight: float = option(1.0, "weight of the points loss")
    rotation_weight: float = option(1.0, "weight of the geodesic rotation loss (radians)")
    translation_weight: float = option(1.0, "weight of the translation MSE")
    gradient_clip_norm: float = option(1.0, "gradient-norm clip (0 disables)")
    scheduler_patience: int = option(5, "ReduceLROnPlateau patience (epochs)")
    scheduler_factor: float = option(0.5, "ReduceLROnPlateau factor")
    seed: int = option(42, "random seed")
    # bookkeeping
    output_dir: str = option("runs/tracker", "run folder: config.yaml, checkpoints/, tb/, metadata.json, args.json")
    device: str = option("auto", "torch device: auto, cpu, cuda")
    resume: bool = option(False, "continue from output_dir/checkpoints/latest.pth")
    save_every: int = option(10, "write checkpoints/epoch_XXXX.pth every this many epochs (latest.pth every epoch)")
    eval_every: int = option(1, "validate every this many epochs")
    log_every: int = option(10, "TensorBoard step-scalar interval (steps)")
    progress_bar: bool = option(True, "show tqdm progress bars")


class TrackerViews(Dataset):
    """(subject, view) items -> ``image [3,224,224]``, ``points [N,3]``, ``rotation_matrix [3,3]``,
    ``translation [3]``, ``subject_index``."""

    def __init__(self, parsers: Sequence, preprocess: str = "squash", cache: bool = True) -> None:
        self.parsers = list(parsers)
        self.items = [(s, v) for s, p in enumerate(self.parsers) for v in range(len(p))]
        self.preprocess = preprocess
        self.cache = cache
        self._images: Dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        from fastavatar.models.tracker import preprocess_for_tracker

        s, v = self.items[index]
        parser = self.parsers[s]
        image = self._images.get((s, v))
        if image is None:
            image = preprocess_for_tracker(parser.load_image(v), mode=self.preprocess)
            if self.cache:
                self._images[(s, v)] = image
        c2w = parser.c2w[v]
        return {"image": image, "points": parser.points, "rotation_matrix": c2w[:3, :3],
                "translation": c2w[:3, 3], "subject_index": s}


def build_tracker(cfg: TrackerTrainConfig):
    """A DinoTracker per config, backbone loaded from ``backbone_weights`` unless random."""
    from fastavatar.models.tracker import DinoTracker, TrackerConfig
    from fastavatar.models.vit import ViTConfig

    vit = ViTConfig.preset(cfg.dino_model)
    if cfg.vit_embed_dim:
        vit.embed_dim = cfg.vit_embed_dim
    if cfg.vit_depth:
        vit.depth = cfg.vit_depth
    if cfg.vit_num_heads:
        vit.num_heads = cfg.vit_num_heads
    vit.img_size = cfg.vit_img_size
    tcfg = TrackerConfig(dino_model=cfg.dino_model, vit=vit, hidden_dim=cfg.hidden_dim, num_layers=cfg.num_layers,
                         dropout=cfg.dropout, freeze_dino=cfg.freeze_backbone)
    tracker = DinoTracker(tcfg)
    if not cfg.random_backbone:
        path = Path(cfg.backbone_weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"DINOv2 backbone weights not found: {path}; put dinov2_vitb14_pretrain.pth (facebookresearch/dinov2 "
                f"ViT-B/14) in pretrained_weights/ (see pretrained_weights/README.md), or pass --random_backbone for a smoke run"
            )
        tracker.load_backbone_weights(path)
    return tracker


@torch.no_grad()
def evaluate(tracker, loader, cfg: TrackerTrainConfig, device: torch.device) -> Dict[str, float]:
    """Mean losses and errors on ``loader``: point error (m), rotation error (deg), centre error (m)."""
    from fastavatar.models.tracker import geodesic_angle, tracker_loss

    tracker.eval()
    sums: Dict[str, float] = {}
    count = 0
    for batch in loader:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        pred = tracker(batch["image"])
        losses = tracker_loss(pred, batch, points_loss="l1" if cfg.points_loss == "l1" else "mse",
                              weights={"points": cfg.points_weight, "rotation": cfg.rotation_weight,
                                       "translation": cfg.translation_weight})
        b = batch["image"].shape[0]
        values = {
            "loss_total": float(losses["total"]),
            "point_error_m": float((pred["points"] - batch["points"]).norm(dim=-1).mean()),
            "rotation_error_deg": float(torch.rad2deg(geodesic_angle(pred["rotation_matrix"], batch["rotation_matrix"])).mean()),
            "translation_error_m": float((pred["translation"] - batch["translation"]).norm(dim=-1).mean()),
        }
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v * b
        count += b
    tracker.train()
    return {k: v / max(count, 1) for k, v in sums.items()}


def _write_sidecars(run_path: Path, tracker, cfg: TrackerTrainConfig) -> None:
    """``metadata.json`` / ``args.json`` as the released loader reads them (ckpt/../..)."""
    tc = tracker.config
    metadata = {"max_points": tc.max_points, "dino_model": tc.dino_model, "use_rotation_6d": tc.use_rotation_6d,
                "predict_point_residuals": tc.predict_point_residuals,
                "mean_shape": tracker.encoder.mean_shape.detach().cpu().tolist()}
    atomic_write_text(run_path / "metadata.json", json.dumps(metadata))
    atomic_write_json(run_path / "args.json", {"hidden_dim": tc.hidden_dim, "num_layers": tc.num_layers,
                                               **config_to_dict(cfg)})


def train_tracker(cfg: TrackerTrainConfig) -> Dict[str, object]:
    """Run tracker training; returns final metrics (also written to ``metrics.json``)."""
    from fastavatar.checkpoints import load_checkpoint_file, normalize_subject_id, save_tracker_checkpoint
    from fastavatar.data import SubjectParser, discover_subjects
    from fastavatar.models.tracker import tracker_loss
    from fastavatar.train.common import RunDir, check_finite, progress, resolve_device, seed_everything

    if cfg.points_loss not in ("l1", "l2"):
        raise ValueError(f"--points_loss must be l1 or l2, got {cfg.points_loss!r}")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    tracker = build_tracker(cfg)  # fails fast on missing backbone weights, before any output
    run = RunDir(Path(cfg.output_dir))
    save_config(cfg, run.path)
    try:
        dirs = discover_subjects(cfg.data_root)[: max(0, cfg.max_subjects)]
        parsers = [SubjectParser(d, image_scale=cfg.image_scale) for d in progress(dirs, enabled=cfg.progress_bar, desc="subjects")]
        ids = [normalize_subject_id(p.subject_id) for p in parsers]
        wanted = [normalize_subject_id(s) for s in cfg.val_subjects]
        unknown = [s for s in wanted if s not in ids]
        if unknown:
            raise ValueError(f"{cfg.data_root}: --val_subjects {unknown} not found (have {ids})")
        if not wanted and len(parsers) >= 2:
            wanted = [ids[-1]]
        train_p = [p for p, i in zip(parsers, ids) if i not in wanted]
        val_p = [p for p, i in zip(parsers, ids) if i in wanted]
        if not train_p:
            raise ValueError(f"{cfg.data_root}: every subject is held out for validation; nothing to train on")
        n_points = {tuple(p.points.shape) for p in parsers}
        if n_points != {(tracker.config.max_points, 3)}:
            raise ValueError(f"{cfg.data_root}: subjects have points {sorted(n_points)}, the tracker predicts "
                             f"{tracker.config.max_points} points")
        print(f"[tracker] train subjects {[p.subject_id for p in train_p]}, val subjects {[p.subject_id for p in val_p]}")

        tracker.set_mean_shape(torch.stack([p.points for p in train_p]).mean(dim=0))
        tracker = tracker.to(device).train()
        train_ds = TrackerViews(train_p, cfg.preprocess, cfg.cache_images)
        val_ds = TrackerViews(val_p, cfg.preprocess, cfg.cache_images) if val_p else None
        gen = torch.Generator().manual_seed(cfg.seed)
        train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, generator=gen,
                                  num_workers=cfg.num_workers, drop_last=False)
        val_loader = DataLoader(val_ds, batch_size=cfg.batch_size, shuffle=False,
                                num_workers=cfg.num_workers) if val_ds is not None else None

        head_params = [p for n, p in tracker.named_parameters() if not n.startswith("encoder.dino.")]
        groups = [{"params": head_params, "lr": cfg.lr}]
        if not cfg.freeze_backbone:
            groups.append({"params": list(tracker.backbone.parameters()), "lr": cfg.backbone_lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.scheduler_factor, patience=cfg.scheduler_patience)
        start_epoch, global_step = 1, 0
        if cfg.resume:
            latest = run.latest_checkpoint()
            if latest is None:
                raise FileNotFoundError(f"--resume: no checkpoint at {run.checkpoints / 'latest.pth'}")
            ckpt = load_checkpoint_file(latest)
            tracker.load_state_dict(ckpt["model_state_dict"], strict=True)
            if ckpt.get("optimizer_dict"):
                optimizer.load_state_dict(ckpt["optimizer_dict"])
            if ckpt.get("scheduler_dict"):
                scheduler.load_state_dict(ckpt["scheduler_dict"])
            start_epoch, global_step = int(ckpt["epoch"]) + 1, int(ckpt["global_step"])
            gen.manual_seed(cfg.seed + start_epoch)
            print(f"[tracker] resumed from {latest} (epoch {ckpt['epoch']}, step {global_step})")
        _write_sidecars(run.path, tracker, cfg)

        weights = {"points": cfg.points_weight, "rotation": cfg.rotation_weight, "translation": cfg.translation_weight}
        points_loss = "l1" if cfg.points_loss == "l1" else "mse"
        val_metrics: Dict[str, float] = {}
        epoch = start_epoch - 1
        for epoch in progress(range(start_epoch, cfg.max_epochs + 1), enabled=cfg.progress_bar, desc="epochs"):
            t0 = time.perf_counter()
            epoch_sum, epoch_count = 0.0, 0
            for batch in train_loader:
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                pred = tracker(batch["image"])
                losses = tracker_loss(pred, batch, points_loss=points_loss, weights=weights)
                global_step += 1
                check_finite(losses["total"], global_step, run.path, "tracker loss")
                optimizer.zero_grad(set_to_none=True)
                losses["total"].backward()
                if cfg.gradient_clip_norm > 0:
                    torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.gradient_clip_norm)
                optimizer.step()
                b = batch["image"].shape[0]
                epoch_sum += float(losses["total"].detach()) * b
                epoch_count += b
                if global_step % max(1, cfg.log_every) == 0:
                    for k, v in losses.items():
                        run.scalar(f"train/{k}", float(v.detach()), global_step)
            train_loss = epoch_sum / max(epoch_count, 1)
            run.scalar("epoch/train_loss", train_loss, epoch)
            run.scalar("epoch/lr", optimizer.param_groups[0]["lr"], epoch)
            if val_loader is not None and (epoch % max(1, cfg.eval_every) == 0 or epoch == cfg.max_epochs):
                val_metrics = evaluate(tracker, val_loader, cfg, device)
                for k, v in val_metrics.items():
                    run.scalar(f"val/{k}", v, epoch)
            scheduler.step(val_metrics.get("loss_total", train_loss) if val_metrics else train_loss)
            extra = {"train_loss": train_loss, "val": dict(val_metrics), "epoch_seconds": time.perf_counter() - t0,
                     "train_subjects": [p.subject_id for p in train_p], "val_subjects": [p.subject_id for p in val_p]}
            state = dict(epoch=epoch, global_step=global_step, config=config_to_dict(cfg),
                         optimizer_dict=optimizer.state_dict(), scheduler_dict=scheduler.state_dict(), extra=extra)
            save_tracker_checkpoint(run.checkpoints / "latest.pth", tracker, **state)
            if epoch % max(1, cfg.save_every) == 0 or epoch == cfg.max_epochs:
                save_tracker_checkpoint(run.checkpoints / f"epoch_{epoch:04d}.pth", tracker, **state)
            msg = f"[tracker] epoch {epoch}: train loss {train_loss:.5f}"
            if val_metrics:
                msg += (f", val points {val_metrics['point_error_m'] * 1000:.1f} mm, rot "
                        f"{val_metrics['rotation_error_deg']:.2f} deg, trans {val_metrics['translation_error_m']:.3f} m")
            print(msg)
        metrics = {"epoch": epoch, "global_step": global_step, "val": val_metrics,
                   "train_subjects": [p.subject_id for p in train_p], "val_subjects": [p.subject_id for p in val_p]}
        if not math.isfinite(metrics["val"].get("loss_total", 0.0)):
            raise RuntimeError("validation loss is not finite")
        atomic_write_json(run.path / "metrics.json", metrics)
        return metrics
    finally:
        run.close()
