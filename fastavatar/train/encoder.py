"""W-encoder training: ArcFace embedding -> the decoder's learned per-subject W (spec §5.2).

Data: every photo of every subject under ``data_root`` (``<id>/images/*.png``) is embedded
once with insightface ``buffalo_l`` (cached, see :mod:`fastavatar.face.cache`); photos without
a detected face are reported and skipped. Targets are the rows of the trained decoder
checkpoint's ``w_vectors`` selected through ``w_ids_to_idx`` (detached: the decoder is not
trained here).

Loss (as released): ``mse_weight * MSE(pred, w) + cosine_weight * (1 - cos(pred, w))
+ contrastive_weight * InfoNCE(pred; positives = same subject)``.

Fixes relative to the released script:
- a final batch of one no longer crashes BatchNorm (:class:`fastavatar.models.w_encoder.WEncoder`);
- subjects missing from the decoder's W table are named in one warning and excluded (the
  original silently skipped whole batches, returning a loss of 0);
- targets are detached; ``ReduceLROnPlateau`` has no removed ``verbose`` argument;
- validation on held-out views (camera 8 by default) instead of training batches; the
  scheduler steps on the validation loss when there is one (training loss otherwise);
- TensorBoard scalars, tqdm, atomic resumable checkpoints (``latest.pth`` every epoch,
  ``epoch_XXXX.pth`` every ``save_every`` epochs, ``best.pth`` on validation cosine), the resolved
  config saved as ``config.yaml``, and a NaN loss stops training with the last good
  checkpoint untouched.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from fastavatar.config import config_to_dict, option, save_config
from fastavatar.io.atomic import atomic_write_json
from fastavatar.runtime import seed_everything
from fastavatar.train.distributed import (DistEnv, barrier, distributed_session, make_sampler,
                                          set_epoch, wrap_ddp)
from fastavatar.train.loop import TrainLoopConfig, TrainTask, open_run, restore_single_model, run_training


@dataclass
class EncoderTrainConfig(TrainLoopConfig):
    """W-encoder training (the shared loop's knobs: :class:`fastavatar.train.loop.TrainLoopConfig`)."""

    # loop defaults for this trainer
    output_dir: str = option("runs/encoder", "run folder: config.yaml, checkpoints/, tb/, metrics.json",
                             aliases=("save_path",))
    max_epochs: int = option(400, "epochs")
    save_every: int = option(50, "epochs between numbered checkpoints (latest.pth is written every epoch)")
    # data
    data_root: str = option("data/nersemble", "folder of subject folders (<id>/images/*.png)")
    decoder_load_path: str = option("pretrained_weights/decoder_neutral_flame.pth",
                                    "trained decoder checkpoint (its w_vectors / w_ids_to_idx are the targets)")
    max_subjects: int = option(417, "use at most this many subjects (sorted by id)")
    val_cameras: List[str] = option(["08"], "camera suffixes held out for validation (00000_08.png -> '08')")
    insightface_root: Optional[str] = option(None, "folder with det_10g.onnx + w600k_r50.onnx (buffalo_l)")
    embedding_cache_dir: Optional[str] = option(None, "embedding cache (default ~/.cache/fastavatar/embeddings; never the data folder)")
    # optimisation
    encoder_lr: float = option(1e-4, "Adam learning rate")
    batch_size: int = option(64, "embeddings per step (per process under torchrun)")
    num_workers: int = option(0, "the released flag: the embeddings sit in memory, so no loader workers run (said when > 0)")
    mse_weight: float = option(0.1, "weight of MSE(pred, w)")
    cosine_weight: float = option(1.0, "weight of 1 - cos(pred, w)")
    contrastive_weight: float = option(0.0, "weight of the InfoNCE term (positives = same subject)")
    contrastive_temperature: float = option(0.07, "InfoNCE temperature")
    scheduler_patience: int = option(5, "ReduceLROnPlateau patience (epochs)")
    scheduler_factor: float = option(0.5, "ReduceLROnPlateau factor")


# ----------------------------------------------------------------------------- losses
def info_nce(pred: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised InfoNCE over a batch. pred [B, D], labels [B] (subject rows).

    Per anchor with at least one positive: -log(sum_pos exp(s/t) / sum_{j != i} exp(s/t)) with
    s the cosine similarity; averaged over those anchors (0 when no anchor has a positive).
    """
    z = F.normalize(pred, dim=1)
    sim = z @ z.t() / temperature  # [B, B]
    b = sim.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=sim.device)
    sim = sim.masked_fill(eye, float("-inf"))
    positives = (labels[:, None] == labels[None, :]) & ~eye
    has_pos = positives.any(dim=1)
    if not has_pos.any():
        return pred.sum() * 0.0
    log_all = torch.logsumexp(sim, dim=1)
    log_pos = torch.logsumexp(sim.masked_fill(~positives, float("-inf")), dim=1)
    return (log_all - log_pos)[has_pos].mean()


def encoder_loss(pred: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, cfg: EncoderTrainConfig) -> Dict[str, torch.Tensor]:
    """pred/target [B, 512], labels [B] -> ``mse``, ``cosine`` (mean cos), ``contrastive``, ``total``."""
    mse = F.mse_loss(pred, target)
    cosine = F.cosine_similarity(pred, target, dim=1).mean()
    contrastive = info_nce(pred, labels, cfg.contrastive_temperature) if cfg.contrastive_weight > 0 else pred.sum() * 0.0
    total = cfg.mse_weight * mse + cfg.cosine_weight * (1.0 - cosine) + cfg.contrastive_weight * contrastive
    return {"mse": mse, "cosine": cosine, "contrastive": contrastive, "total": total}


# ----------------------------------------------------------------------------- data
@dataclass
class EmbeddingSet:
    """Embeddings of all usable photos: train and validation parts."""

    train_embeddings: torch.Tensor  # [M, 512] raw ArcFace
    train_rows: torch.Tensor  # [M] W-table rows
    val_embeddings: torch.Tensor  # [V, 512]
    val_rows: torch.Tensor  # [V]
    subjects: List[str]  # subject ids used
    excluded_subjects: List[str]  # ids missing from the decoder's W table
    failed_images: List[Tuple[str, str]]  # (path, reason) of photos with no usable face


def _camera_suffix(path: Path) -> str:
    return path.stem.rsplit("_", 1)[-1]


def collect_embeddings(cfg: EncoderTrainConfig, w_ids_to_idx: Dict[str, int], device: str, show_progress: bool = True) -> EmbeddingSet:
    """Embed every photo of every usable subject (through the cache) and split train / val."""
    from fastavatar.data.subject_ids import normalize_subject_id
    from fastavatar.data import discover_subjects, subject_id_from_dir
    from fastavatar.face.cache import EmbeddingCache, default_cache_dir, embed_with_cache
    from fastavatar.face.embedding import FaceEmbedder, FaceError
    from fastavatar.face.images import ImageError, list_images
    from fastavatar.runtime import progress

    subject_dirs = discover_subjects(cfg.data_root)[: max(0, cfg.max_subjects)]
    usable, excluded = [], []
    for folder in subject_dirs:
        sid = normalize_subject_id(subject_id_from_dir(folder) or folder.name)
        (usable if sid in w_ids_to_idx else excluded).append((sid, folder))
    excluded_ids = [sid for sid, _ in excluded]
    if excluded_ids:
        warnings.warn(
            f"subjects {excluded_ids} are not in the decoder's W table ({cfg.decoder_load_path}); they are excluded",
            stacklevel=2,
        )
    if not usable:
        raise ValueError(
            f"{cfg.data_root}: none of the subjects {[s for s, _ in excluded]} is in the decoder's W table "
            f"{cfg.decoder_load_path} (it has {sorted(w_ids_to_idx)[:6]}...)"
        )
    embedder = FaceEmbedder(cfg.insightface_root, device=device)
    cache_dir = Path(cfg.embedding_cache_dir) if cfg.embedding_cache_dir else default_cache_dir()
    cache = EmbeddingCache(cache_dir, embedder.model_id, forbidden_roots=[cfg.data_root])
    items = [(sid, path) for sid, folder in usable for path in list_images(folder / "images")]
    val_suffixes = {str(s).zfill(2) for s in cfg.val_cameras}
    train_e, train_r, val_e, val_r, failed = [], [], [], [], []
    for sid, path in progress(items, enabled=show_progress, desc="embeddings", unit="img"):
        try:
            result = embed_with_cache(embedder, path, cache)
        except (FaceError, ImageError) as exc:
            failed.append((str(path), str(exc)))
            continue
        row = int(w_ids_to_idx[sid])
        if _camera_suffix(path) in val_suffixes:
            val_e.append(result.embedding)
            val_r.append(row)
        else:
            train_e.append(result.embedding)
            train_r.append(row)
    if failed:
        names = ", ".join(Path(p).parent.parent.name + "/" + Path(p).name for p, _ in failed[:5])
        print(f"[encoder] warning: {len(failed)} photo(s) without a usable face skipped: {names}"
              + (" ..." if len(failed) > 5 else ""))
    if not train_e:
        raise ValueError(f"{cfg.data_root}: no training photo with a detected face (val cameras {sorted(val_suffixes)})")
    print(f"[encoder] embeddings: {len(train_e)} train, {len(val_e)} val from {len(usable)} subjects "
          f"(cache {cache_dir}: {cache.hits} hits, {cache.misses} computed)")

    def stack(e, r):
        if not e:
            return torch.zeros(0, 512), torch.zeros(0, dtype=torch.long)
        return torch.from_numpy(np.stack(e).astype(np.float32)), torch.tensor(r, dtype=torch.long)

    te, tr = stack(train_e, train_r)
    ve, vr = stack(val_e, val_r)
    return EmbeddingSet(te, tr, ve, vr, [s for s, _ in usable], excluded_ids, failed)


# ----------------------------------------------------------------------------- training
@torch.no_grad()
def evaluate(encoder, embeddings: torch.Tensor, rows: torch.Tensor, w_vectors: torch.Tensor,
             cfg: EncoderTrainConfig, device: torch.device) -> Dict[str, float]:
    """Mean MSE / cosine / total loss on a held-out set (eval mode)."""
    encoder.eval()
    totals = {"mse": 0.0, "cosine": 0.0, "total": 0.0}
    n = embeddings.shape[0]
    for s in range(0, n, max(1, cfg.batch_size)):
        e = embeddings[s : s + cfg.batch_size].to(device)
        r = rows[s : s + cfg.batch_size].to(device)
        losses = encoder_loss(encoder(e), w_vectors[r], r, cfg)
        for k in totals:
            totals[k] += float(losses[k]) * e.shape[0]
    encoder.train()
    return {k: v / max(n, 1) for k, v in totals.items()}


class EncoderTask(TrainTask):
    """The W encoder on cached embeddings, for :func:`fastavatar.train.loop.run_training`."""

    name = "encoder"
    lr_keys = {"encoder": ["encoder_lr"]}

    def __init__(self, cfg: EncoderTrainConfig, data: EmbeddingSet, w_vectors: torch.Tensor, env: DistEnv):
        from fastavatar.models.w_encoder import WEncoder

        device = env.device
        self.cfg, self.data, self.w_vectors, self.device = cfg, data, w_vectors, device
        self.encoder = WEncoder().to(device).train()
        self.ddp_encoder = wrap_ddp(self.encoder, env)
        # under torchrun each rank takes its shard of the embeddings (reshuffled every epoch)
        self.sampler = make_sampler(range(data.train_embeddings.shape[0]), env, shuffle=True, seed=cfg.seed)
        optimizer = torch.optim.Adam(self.encoder.parameters(), lr=cfg.encoder_lr)
        self.optimizers = {"encoder": optimizer}
        self.schedulers = {"encoder": torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.scheduler_factor, patience=cfg.scheduler_patience)}
        self.last_val: Dict[str, float] = {}
        self.epoch, self.global_step = 0, 0
        self.extra_base = {"subjects": data.subjects, "excluded_subjects": data.excluded_subjects,
                           "val_cameras": list(cfg.val_cameras), "decoder_load_path": str(cfg.decoder_load_path)}

    def batches(self, epoch: int):
        self.encoder.train()
        n = self.data.train_embeddings.shape[0]
        if self.sampler is not None:
            set_epoch(self.sampler, epoch)
            order = torch.tensor(list(self.sampler), dtype=torch.long)
            n = order.numel()
        else:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch))
        for s in range(0, n, max(1, self.cfg.batch_size)):
            yield order[s : s + self.cfg.batch_size]

    def losses(self, idx):
        emb = self.data.train_embeddings[idx].to(self.device)
        rows = self.data.train_rows[idx].to(self.device)
        return encoder_loss(self.ddp_encoder(emb), self.w_vectors[rows], rows, self.cfg), idx.numel()

    def clip_groups(self):
        return [list(self.encoder.parameters())]

    def validate(self, epoch: int) -> Dict[str, float]:
        if self.data.val_embeddings.shape[0] == 0:
            return {}
        self.last_val = evaluate(self.encoder, self.data.val_embeddings, self.data.val_rows, self.w_vectors, self.cfg,
                                 self.device)
        return self.last_val

    def scheduler_metric(self, train_loss: float, val) -> float:
        return self.last_val.get("total", train_loss)

    def best_score(self, val) -> Optional[float]:
        return val.get("cosine")

    def save_checkpoint(self, path: Path, epoch: int, global_step: int, record) -> None:
        from fastavatar.io.checkpoints import save_w_encoder_checkpoint

        self.epoch, self.global_step = epoch, global_step
        extra = {**self.extra_base, "train_loss": record["train_loss"], "val": dict(self.last_val),
                 "best_score": record["best_score"], "epoch_seconds": record["seconds"]}
        save_w_encoder_checkpoint(path, self.encoder, epoch=epoch, global_step=global_step,
                                  config=config_to_dict(self.cfg), optimizer_dict=self.optimizers["encoder"].state_dict(),
                                  scheduler_dict=self.schedulers["encoder"].state_dict(), extra=extra)

    def load_checkpoint(self, ckpt) -> None:
        self.epoch, self.global_step = restore_single_model(ckpt, self.encoder, "model_dict", self.optimizers["encoder"],
                                                            self.schedulers["encoder"])

    def epoch_summary(self, record) -> str:
        val = record.get("val")
        return f"train loss {record['train_loss']:.5f}" + (
            f", val cos {val['cosine']:.4f} mse {val['mse']:.5f}" if val else "")


def train_encoder(cfg: EncoderTrainConfig) -> Dict[str, object]:
    """Run W-encoder training; returns final metrics (also written to ``metrics.json``)."""
    from fastavatar.face.embedding import resolve_insightface_root
    from fastavatar.io.checkpoints import load_decoder

    seed_everything(cfg.seed)
    with distributed_session(cfg.device, cfg.dist_backend) as env:
        device = env.device
        if cfg.num_workers > 0 and env.is_main:
            print(f"[encoder] --num_workers {cfg.num_workers}: not used (the cached embeddings are batched in memory)")
        # Fail fast (before creating the run folder) on missing inputs.
        _, w_vectors, w_ids_to_idx = load_decoder(cfg.decoder_load_path, "cpu")
        if w_vectors is None or not w_ids_to_idx:
            raise ValueError(f"{cfg.decoder_load_path}: decoder checkpoint has no w_vectors / w_ids_to_idx to regress onto")
        resolve_insightface_root(cfg.insightface_root)
        w_vectors = w_vectors.detach().to(device)  # targets only
        run = open_run(cfg, env)
        if env.is_main:
            save_config(cfg, run.path)
        try:
            # rank 0 fills the embedding cache first; the other ranks then read it
            if not env.is_main:
                barrier(env)
            data = collect_embeddings(cfg, w_ids_to_idx, str(device), cfg.progress and env.is_main)
            if env.is_main:
                barrier(env)
            task = EncoderTask(cfg, data, w_vectors, env)
            run_training(task, cfg, run, env)
            metrics = {"epoch": task.epoch, "global_step": task.global_step, "val": task.last_val,
                       "num_train": int(data.train_embeddings.shape[0]), "num_val": int(data.val_embeddings.shape[0]),
                       "subjects": data.subjects, "excluded_subjects": data.excluded_subjects,
                       "failed_images": [p for p, _ in data.failed_images]}
            if env.is_main:
                atomic_write_json(run.path / "metrics.json", metrics)
            return metrics
        finally:
            run.close()
