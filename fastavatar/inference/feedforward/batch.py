"""Feed-forward inference over one photo or a folder of photos, and the CLI entry point."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from fastavatar.config import parse_config, save_config
from fastavatar.face.embedding import FaceError
from fastavatar.face.images import ImageError, list_images
from fastavatar.inference.feedforward.config import FeedForwardConfig
from fastavatar.inference.feedforward.loading import load_models
from fastavatar.inference.feedforward.outputs import write_outputs
from fastavatar.inference.feedforward.pipeline import run_photo
from fastavatar.io.atomic import atomic_write_json
from fastavatar.runtime import progress, resolve_device, seed_everything


def _output_names(paths: Sequence[Path]) -> List[str]:
    """One folder name per photo: the stem, or stem_ext when two photos share a stem."""
    stems = [p.stem for p in paths]
    return [f"{p.stem}_{p.suffix.lstrip('.').lower()}" if stems.count(p.stem) > 1 else p.stem for p in paths]


def run(cfg: FeedForwardConfig) -> Dict[str, Any]:
    """Single photo -> ``output_dir``; folder -> ``output_dir/<photo stem>/`` each.

    Returns ``{"ok": [...], "failed": [{"image", "error"}]}``. In single mode an unreadable
    photo or missing face raises (the script prints the one-line message).
    """
    if not cfg.image:
        raise ValueError("--image is required (a photo or a folder of photos)")
    source = Path(cfg.image)
    if not source.exists():
        raise ImageError(f"{source}: file not found")
    seed_everything(cfg.seed)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    models = load_models(cfg.encoder_checkpoint, cfg.decoder_checkpoint, cfg.dino_checkpoint,
                         cfg.insightface_root, device, cfg.det_size)
    output_dir = Path(cfg.output_dir)
    save_config(cfg, output_dir)
    if source.is_file():
        result = run_photo(models, source, cfg.tracker_preprocess, cfg.overlap_face_and_tracker)
        summary = write_outputs(result, output_dir, cfg)
        return {"ok": [{"image": str(source), "output_dir": str(output_dir), "summary": summary}], "failed": []}

    photos = list_images(source)
    if not photos:
        raise ImageError(f"{source}: folder contains no images ({', '.join(('.jpg', '.png', '...'))})")
    ok, failed = [], []
    for photo, name in progress(list(zip(photos, _output_names(photos))), desc="photos", unit="photo"):
        try:
            result = run_photo(models, photo, cfg.tracker_preprocess, cfg.overlap_face_and_tracker)
            summary = write_outputs(result, output_dir / name, cfg)
            ok.append({"image": str(photo), "output_dir": str(output_dir / name), "summary": summary})
        except (ImageError, FaceError) as exc:
            print(f"[fastavatar] skipped: {exc}", file=sys.stderr)
            failed.append({"image": str(photo), "error": str(exc)})
        except Exception as exc:  # one bad photo must not stop a long batch; report it
            message = f"{photo}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"[fastavatar] skipped: {message}", file=sys.stderr)
            failed.append({"image": str(photo), "error": message})
    batch = {"ok": [{"image": o["image"], "output_dir": o["output_dir"]} for o in ok], "failed": failed}
    atomic_write_json(output_dir / "batch_summary.json", batch)
    return {"ok": ok, "failed": failed}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point (``scripts/inference_feedforward_no_guidance.py``); returns the exit code."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = parse_config(FeedForwardConfig, argv, description="FastAvatar feed-forward inference: photo -> 3DGS head")
    try:
        out = run(cfg)
    except (ImageError, FaceError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for item in out["ok"]:
        timings = item["summary"]["timings_s"]
        total = sum(v for k, v in timings.items() if k != "render")
        print(f"{item['image']} -> {item['output_dir']} ({item['summary']['num_gaussians']} Gaussians, "
              f"{total:.3f} s without rendering)")
    if out["failed"]:
        print(f"{len(out['failed'])} photo(s) failed, see {Path(cfg.output_dir) / 'batch_summary.json'}",
              file=sys.stderr)
    return 0 if out["ok"] else 1
