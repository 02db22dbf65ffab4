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

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from fastavatar.config import config_to_dict, option, save_config
from fastavatar.utils.io import atomic_write_json


@dataclass
class EncoderTrainConfig:
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
    batch_size: int = option(64, "embeddings per step")
    max_epochs: int = option(400, "epochs")
    mse_weight: float = option(0.1, "weight of MSE(pred, w)")
    cosine_weight: float = option(1.0, "weight of 1 - cos(pred, w)")
    contrastive_weight: float = option(0.0, "weight of the InfoNCE term (positives = same subject)")
    contrastive_temperature: float = option(0.07, "InfoNCE temperature")
    scheduler_patience: int = option(5, "ReduceLROnPlateau patience (epochs)")
    scheduler_factor: float = option(0.5, "ReduceLROnPlateau factor")
    gradient_clip_norm: float = option(1.0, "gradient-norm clip (0 disables)")
    seed: int = option(42, "random seed")
    # bookkeeping
    output_dir: str = option("runs/encoder", "run folder: config.yaml, checkpoints/, tb/, metrics.json")
    device: str = option("auto", "torch device: auto, cpu, cuda")
    resume: bool = option(False, "continue from output_dir/checkpoints/latest.pth")
    save_every: int = option(50, "write checkpoints/epoch_XXXX.pth every this many epochs (latest.pth every epoch)")
    eval_every: int = option(1, "validate every this many epochs")
    log_every: int = option(10, "TensorBoard step-scalar interval (steps)")
    progress_bar: bool = option(True, "show tqdm progress bars")


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
    from fastavatar.checkpoints import normalize_subject_id
    from fastavatar.data import discover_subjects
    from fastavatar.face.cache import EmbeddingCache, default_cache_dir, embed_with_cache
    from fastavatar.face.embedding import FaceEmbedder, FaceError
    from fastavatar.face.images import ImageError, list_images
    from fastavatar.train.common import progress

    subject_dirs = discover_subjects(cfg.data_root)[: max(0, cfg.max_subjects)]
    usable, excluded = [], []
    for folder in subject_dirs:
        sid = normalize_subject_id(folder.name.split("_", 1)[0])
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


def train_encoder(cfg: EncoderTrainConfig) -> Dict[str, object]:
    """Run W-encoder training; returns final metrics (also written to ``metrics.json``)."""
    from fastavatar.checkpoints import load_checkpoint_file, load_decoder, save_w_encoder_checkpoint
    from fastavatar.models.w_encoder import WEncoder
    from fastavatar.train.common import RunDir, check_finite, progress, resolve_device, seed_everything

    from fastavatar.face.embedding import resolve_insightface_root

    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    # Fail fast (before creating the run folder) on missing inputs.
    _, w_vectors, w_ids_to_idx = load_decoder(cfg.decoder_load_path, "cpu")
    if w_vectors is None or not w_ids_to_idx:
        raise ValueError(f"{cfg.decoder_load_path}: decoder checkpoint has no w_vectors / w_ids_to_idx to regress onto")
    resolve_insightface_root(cfg.insightface_root)
    w_vectors = w_vectors.detach().to(device)  # targets only
    run = RunDir(Path(cfg.output_dir))
    save_config(cfg, run.path)
    try:
        data = collect_embeddings(cfg, w_ids_to_idx, str(device), cfg.progress_bar)

        encoder = WEncoder().to(device).train()
        optimizer = torch.optim.Adam(encoder.parameters(), lr=cfg.encoder_lr)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.scheduler_factor, patience=cfg.scheduler_patience)
        start_epoch, global_step, best_cos = 1, 0, -float("inf")
        latest = run.latest_checkpoint()
        if cfg.resume:
            if latest is None:
                raise FileNotFoundError(f"--resume: no checkpoint at {run.checkpoints / 'latest.pth'}")
            ckpt = load_checkpoint_file(latest)
            encoder.load_state_dict(ckpt["model_dict"], strict=True)
            if ckpt.get("optimizer_dict"):
                optimizer.load_state_dict(ckpt["optimizer_dict"])
            if ckpt.get("scheduler_dict"):
                scheduler.load_state_dict(ckpt["scheduler_dict"])
            start_epoch = int(ckpt["epoch"]) + 1
            global_step = int(ckpt["global_step"])
            best_cos = float((ckpt.get("extra") or {}).get("best_val_cosine", best_cos))
            print(f"[encoder] resumed from {latest} (epoch {ckpt['epoch']}, step {global_step})")

        extra_base = {"subjects": data.subjects, "excluded_subjects": data.excluded_subjects,
                      "val_cameras": list(cfg.val_cameras), "decoder_load_path": str(cfg.decoder_load_path)}
        n = data.train_embeddings.shape[0]
        val_metrics: Dict[str, float] = {}
        epoch = start_epoch - 1
        for epoch in progress(range(start_epoch, cfg.max_epochs + 1), enabled=cfg.progress_bar, desc="epochs"):
            t0 = time.perf_counter()
            gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
            order = torch.randperm(n, generator=gen)
            epoch_sum, epoch_count = 0.0, 0
            for s in range(0, n, max(1, cfg.batch_size)):
                idx = order[s : s + cfg.batch_size]
                emb = data.train_embeddings[idx].to(device)
                rows = data.train_rows[idx].to(device)
                losses = encoder_loss(encoder(emb), w_vectors[rows], rows, cfg)
                global_step += 1
                check_finite(losses["total"], global_step, run.path, "encoder loss")
                optimizer.zero_grad(set_to_none=True)
                losses["total"].backward()
                if cfg.gradient_clip_norm > 0:
                    torch.nn.utils.clip_grad_norm_(encoder.parameters(), cfg.gradient_clip_norm)
                optimizer.step()
                epoch_sum += float(losses["total"].detach()) * idx.numel()
                epoch_count += idx.numel()
                if global_step % max(1, cfg.log_every) == 0:
                    for k, v in losses.items():
                        run.scalar(f"train/{k}", float(v), global_step)
            train_loss = epoch_sum / max(epoch_count, 1)
            run.scalar("epoch/train_loss", train_loss, epoch)
            run.scalar("epoch/lr", optimizer.param_groups[0]["lr"], epoch)
            has_val = data.val_embeddings.shape[0] > 0
            if has_val and (epoch % max(1, cfg.eval_every) == 0 or epoch == cfg.max_epochs):
                val_metrics = evaluate(encoder, data.val_embeddings, data.val_rows, w_vectors, cfg, device)
                for k, v in val_metrics.items():
                    run.scalar(f"val/{k}", v, epoch)
            scheduler.step(val_metrics.get("total", train_loss) if has_val and val_metrics else train_loss)
            extra = {**extra_base, "train_loss": train_loss, "val": dict(val_metrics),
                     "best_val_cosine": max(best_cos, val_metrics.get("cosine", -float("inf")))
                     if val_metrics else best_cos, "epoch_seconds": time.perf_counter() - t0}
            state = dict(epoch=epoch, global_step=global_step, config=config_to_dict(cfg),
                         optimizer_dict=optimizer.state_dict(), scheduler_dict=scheduler.state_dict(), extra=extra)
            save_w_encoder_checkpoint(run.checkpoints / "latest.pth", encoder, **state)
            if epoch % max(1, cfg.save_every) == 0 or epoch == cfg.max_epochs:
                save_w_encoder_checkpoint(run.checkpoints / f"epoch_{epoch:04d}.pth", encoder, **state)
            if val_metrics and val_metrics["cosine"] > best_cos:
                best_cos = val_metrics["cosine"]
                save_w_encoder_checkpoint(run.checkpoints / "best.pth", encoder, **state)
            print(f"[encoder] epoch {epoch}: train loss {train_loss:.5f}"
                  + (f", val cos {val_metrics['cosine']:.4f} mse {val_metrics['mse']:.5f}" if val_metrics else ""))
        metrics = {"epoch": epoch, "global_step": global_step, "val": val_metrics,
                   "num_train": int(n), "num_val": int(data.val_embeddings.shape[0]),
                   "subjects": data.subjects, "excluded_subjects": data.excluded_subjects,
                   "failed_images": [p for p, _ in data.failed_images]}
        atomic_write_json(run.path / "metrics.json", metrics)
        return metrics
    finally:
        run.close()
