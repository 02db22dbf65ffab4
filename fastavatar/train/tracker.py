"""DINOv2 point + pose tracker training (spec §5.3; the original never released this script).

Data: VHAP/NeRSemble subjects in COLMAP layout (:class:`fastavatar.data.SubjectParser`). One
item = one view of one subject:
- input: the view (white background) squashed to 224x224 and ImageNet-normalised
  (:func:`fastavatar.face.tracker_input.preprocess_for_tracker`, ``squash`` like the released
  inference, or ``pad``);
- targets: the subject's 10144 FLAME-face centroids ``points [N,3]`` (world frame, as the
  no-guidance path feeds them straight to the decoder) and that view's OpenCV c2w
  ``rotation_matrix [3,3]`` / ``translation [3]``.

Losses (:func:`fastavatar.losses.tracker_loss`): points L2 (MSE, released) or L1,
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
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Literal, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from fastavatar.config import config_to_dict, option, save_config
from fastavatar.data.subject_ids import normalize_subject_id
from fastavatar.io.atomic import atomic_write_json, atomic_write_text
from fastavatar.runtime import seed_everything
from fastavatar.train.distributed import DistEnv, distributed_session, make_sampler, set_epoch, wrap_ddp
from fastavatar.train.loop import TrainLoopConfig, TrainTask, open_run, restore_single_model, run_training


@dataclass
class TrackerTrainConfig(TrainLoopConfig):
    """Tracker training (the shared loop's knobs: :class:`fastavatar.train.loop.TrainLoopConfig`)."""

    # loop defaults for this trainer
    output_dir: str = option("runs/tracker", "run folder: config.yaml, checkpoints/, tb/, metadata.json, args.json",
                             aliases=("save_path",))
    # data
    data_root: str = option("data/nersemble", "folder of subject folders (<id>/ with sparse/ and images/)")
    max_subjects: int = option(417, "use at most this many subjects (sorted by id)")
    val_subjects: List[str] = option([], "subject ids held out for validation (empty: the last subject if >= 2)")
    image_scale: float = option(0.5, "scale at which views are read before the 224x224 resize")
    allow_resize: bool = option(False, "resize images / masks whose size differs from their COLMAP camera (else an error)")
    on_bad_subject: Literal["skip", "stop"] = option(
        "skip", "a subject folder that cannot be parsed: skip it (said, and listed in data_summary.json) or stop")
    preprocess: Literal["squash", "pad"] = option("squash", "tracker input: squash (released inference) or pad (aspect kept)")
    num_workers: int = option(0, "DataLoader workers")
    cache_images: bool = option(True, "keep preprocessed 224x224 inputs in memory")
    # model
    backbone_weights: str = option("pretrained_weights/dinov2_vitb14_pretrain.pth", "DINOv2 backbone weights (facebookresearch names)")
    random_backbone: bool = option(False, "start from a random backbone (tests / smoke runs only)")
    dino_model: Literal["dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14"] = option("dinov2_vitb14", "backbone preset: dinov2_vits14, dinov2_vitb14, dinov2_vitl14")
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
    points_loss: Literal["l2", "l1"] = option("l2", "points loss: l2 (MSE, released) or l1")
    points_weight: float = option(1.0, "weight of the points loss")
    rotation_weight: float = option(1.0, "weight of the geodesic rotation loss (radians)")
    translation_weight: float = option(1.0, "weight of the translation MSE")
    scheduler_patience: int = option(5, "ReduceLROnPlateau patience (epochs)")
    scheduler_factor: float = option(0.5, "ReduceLROnPlateau factor")



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
        from fastavatar.face.tracker_input import preprocess_for_tracker

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
    from fastavatar.io.checkpoints.tracker import load_backbone_weights
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
        load_backbone_weights(tracker.backbone, path)
    return tracker


@torch.no_grad()
def evaluate(tracker, loader, cfg: TrackerTrainConfig, device: torch.device) -> Dict[str, float]:
    """Mean losses and errors on ``loader``: point error (m), rotation error (deg), centre error (m)."""
    from fastavatar.losses import geodesic_angle, tracker_loss

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


class TrackerTask(TrainTask):
    """The DINOv2 tracker on (subject, view) items, for :func:`fastavatar.train.loop.run_training`."""

    name = "tracker"
    lr_keys = {"tracker": ["lr", "backbone_lr"]}  # param group 0: heads, 1: backbone (when trained)

    def __init__(self, cfg: TrackerTrainConfig, tracker, train_p, val_p, env: DistEnv, run_path: Path) -> None:
        device = env.device
        self.cfg, self.tracker, self.device, self.run_path, self.is_main = cfg, tracker, device, run_path, env.is_main
        self.ddp_tracker = wrap_ddp(tracker, env)
        self.train_subjects = [p.subject_id for p in train_p]
        self.val_subjects = [p.subject_id for p in val_p]
        train_ds = TrackerViews(train_p, cfg.preprocess, cfg.cache_images)
        val_ds = TrackerViews(val_p, cfg.preprocess, cfg.cache_images) if val_p else None
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.sampler = make_sampler(train_ds, env, shuffle=True, seed=cfg.seed)  # torchrun: one shard per rank
        self.train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=self.sampler is None,
                                       sampler=self.sampler, generator=self.gen, num_workers=cfg.num_workers,
                                       drop_last=False)
        self.val_loader = DataLoader(val_ds, batch_size=cfg.batch_size, shuffle=False,
                                     num_workers=cfg.num_workers) if val_ds is not None else None
        head_params = [p for n, p in tracker.named_parameters() if not n.startswith("encoder.dino.")]
        self.groups = [{"params": head_params, "lr": cfg.lr}]
        if not cfg.freeze_backbone:
            self.groups.append({"params": list(tracker.backbone.parameters()), "lr": cfg.backbone_lr})
        optimizer = torch.optim.AdamW(self.groups, weight_decay=cfg.weight_decay)
        self.optimizers = {"tracker": optimizer}
        self.schedulers = {"tracker": torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.scheduler_factor, patience=cfg.scheduler_patience)}
        self.weights = {"points": cfg.points_weight, "rotation": cfg.rotation_weight,
                        "translation": cfg.translation_weight}
        self.last_val: Dict[str, float] = {}
        self.epoch, self.global_step = 0, 0

    def start(self, start_epoch: int) -> None:
        if self.is_main:
            _write_sidecars(self.run_path, self.tracker, self.cfg)  # after a resume: the restored mean shape

    def batches(self, epoch: int):
        set_epoch(self.sampler, epoch)
        self.tracker.train()
        for batch in self.train_loader:
            yield {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def losses(self, batch):
        from fastavatar.losses import tracker_loss

        pred = self.ddp_tracker(batch["image"])
        points_loss = "l1" if self.cfg.points_loss == "l1" else "mse"
        return tracker_loss(pred, batch, points_loss=points_loss, weights=self.weights), batch["image"].shape[0]

    def clip_groups(self):
        return [[p for g in self.groups for p in g["params"]]]

    def validate(self, epoch: int) -> Dict[str, float]:
        if self.val_loader is None:
            return {}
        self.last_val = evaluate(self.tracker, self.val_loader, self.cfg, self.device)
        return self.last_val

    def scheduler_metric(self, train_loss: float, val) -> float:
        return self.last_val.get("loss_total", train_loss)

    def save_checkpoint(self, path: Path, epoch: int, global_step: int, record) -> None:
        from fastavatar.io.checkpoints import save_tracker_checkpoint

        self.epoch, self.global_step = epoch, global_step
        extra = {"train_loss": record["train_loss"], "val": dict(self.last_val), "epoch_seconds": record["seconds"],
                 "train_subjects": self.train_subjects, "val_subjects": self.val_subjects}
        save_tracker_checkpoint(path, self.tracker, epoch=epoch, global_step=global_step,
                                config=config_to_dict(self.cfg), optimizer_dict=self.optimizers["tracker"].state_dict(),
                                scheduler_dict=self.schedulers["tracker"].state_dict(), extra=extra)

    def load_checkpoint(self, ckpt) -> None:
        self.epoch, self.global_step = restore_single_model(ckpt, self.tracker, "model_state_dict",
                                                            self.optimizers["tracker"], self.schedulers["tracker"])
        self.gen.manual_seed(self.cfg.seed + self.epoch + 1)

    def epoch_summary(self, record) -> str:
        msg = f"train loss {record['train_loss']:.5f}"
        val = record.get("val")
        if val:
            msg += (f", val points {val['point_error_m'] * 1000:.1f} mm, rot {val['rotation_error_deg']:.2f} deg, "
                    f"trans {val['translation_error_m']:.3f} m")
        return msg


def train_tracker(cfg: TrackerTrainConfig) -> Dict[str, object]:
    """Run tracker training; returns final metrics (also written to ``metrics.json``)."""
    from fastavatar.data import discover_subjects
    from fastavatar.data.colmap import parse_subjects

    if cfg.points_loss not in ("l1", "l2"):
        raise ValueError(f"--points_loss must be l1 or l2, got {cfg.points_loss!r}")
    seed_everything(cfg.seed)
    tracker = build_tracker(cfg)  # fails fast on missing backbone weights, before any output
    with distributed_session(cfg.device, cfg.dist_backend) as env:
        device = env.device
        run = open_run(cfg, env)
        if env.is_main:
            save_config(cfg, run.path)
        try:
            skipped: list = []
            dirs = discover_subjects(cfg.data_root, verbose=env.is_main, skipped=skipped)[: max(0, cfg.max_subjects)]
            parsers = parse_subjects(dirs, cfg.on_bad_subject, verbose=env.is_main, skipped=skipped,
                                     image_scale=cfg.image_scale, allow_resize=cfg.allow_resize)
            if env.is_main:
                atomic_write_json(run.path / "data_summary.json",
                                  {"subjects": [p.subject_id for p in parsers], "skipped": skipped})
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
            if env.is_main:
                print(f"[tracker] train subjects {[p.subject_id for p in train_p]}, val subjects {[p.subject_id for p in val_p]}")

            tracker.set_mean_shape(torch.stack([p.points for p in train_p]).mean(dim=0))
            task = TrackerTask(cfg, tracker.to(device).train(), train_p, val_p, env, run.path)
            run_training(task, cfg, run, env)
            metrics = {"epoch": task.epoch, "global_step": task.global_step, "val": task.last_val,
                       "train_subjects": task.train_subjects, "val_subjects": task.val_subjects}
            if not math.isfinite(metrics["val"].get("loss_total", 0.0)):
                raise RuntimeError("validation loss is not finite")
            if env.is_main:
                atomic_write_json(run.path / "metrics.json", metrics)
            return metrics
        finally:
            run.close()
