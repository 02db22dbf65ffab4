"""Leave-one-out decoders on the bundled subjects: for each held-out subject, the demo's template
and decoder (:func:`fastavatar.apps.demo.build_demo_decoder`: trained on the other subjects,
camera 08 held out, 1/4 scale, the demo's sizes and epochs) under ``<output_dir>/<held_out>/``.

The evaluation protocols score each held-out subject with the decoder trained without it
(``--decoder_checkpoint 'outputs/loo/{subject}/decoder_run/checkpoints/latest.pth'``); the README
tables come from these (``scripts/train_loo_decoders.py``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List

from fastavatar.apps.demo import DemoConfig, build_demo_decoder
from fastavatar.config import option, save_config
from fastavatar.runtime import resolve_device, seed_everything


@dataclass
class LooConfig:
    """Which leave-one-out decoders to train; every other setting is the demo's (``DemoConfig`` defaults)."""

    data_root: str = option("data/nersemble", "bundled sample data")
    subjects: List[str] = option(["128", "306", "369"], "all subjects; each is held out once")
    held_out: List[str] = option(["128", "306", "369"], "which held-out configurations to train")
    output_dir: str = option("outputs/loo", "one folder per held-out subject")
    skip_existing: bool = option(True, "skip a held-out subject whose checkpoint already exists (and say so)")
    device: str = option("auto", "auto, cpu or cuda")
    seed: int = option(0, "random seed (the demo's)")


def loo_checkpoint(output_dir: str, held_out: str) -> Path:
    """Where the decoder trained without ``held_out`` is written."""
    return Path(output_dir) / held_out / "decoder_run" / "checkpoints" / "latest.pth"


def check_same_setup(ckpt: Path) -> None:
    """An existing leave-one-out decoder is reused only if it was trained for the demo setup's epochs
    (read from its run folder's config.yaml; a folder without one cannot tell and is reused)."""
    from fastavatar.config import load_yaml

    saved = ckpt.parent.parent / "config.yaml"
    if not saved.is_file():
        return
    epochs = load_yaml(saved).get("max_epochs")  # a damaged file: load_yaml's one-line error naming it
    wanted = DemoConfig().decoder_epochs
    if epochs is not None and int(epochs) != wanted:
        raise ValueError(f"{ckpt} was trained for {epochs} epochs, the demo setup now trains {wanted}: pass "
                         "--no-skip_existing to retrain it (or --output_dir elsewhere to keep it)")


def train_loo_decoders(cfg: LooConfig) -> Dict[str, str]:
    """Train one decoder per held-out subject (sequentially); returns ``{held_out: checkpoint path}``."""
    unknown = [s for s in cfg.held_out if s not in cfg.subjects]
    if unknown:
        raise ValueError(f"--held_out {unknown} not in --subjects {cfg.subjects}")
    device = resolve_device(cfg.device)
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root)
    checkpoints: Dict[str, str] = {}
    for held_out in cfg.held_out:
        ckpt = loo_checkpoint(cfg.output_dir, held_out)
        if cfg.skip_existing and ckpt.is_file():
            check_same_setup(ckpt)
            print(f"[loo] {held_out}: {ckpt} exists, skipped (--no-skip_existing retrains)")
            checkpoints[held_out] = str(ckpt)
            continue
        train_subjects = [s for s in cfg.subjects if s != held_out]
        # --no-skip_existing asked for a retrain: an earlier run's checkpoints there are replaced
        demo = replace(DemoConfig(), data_root=cfg.data_root, train_subjects=train_subjects, test_subject=held_out,
                       output_dir=str(root / held_out), device=cfg.device, seed=cfg.seed,
                       overwrite=not cfg.skip_existing)
        Path(demo.output_dir).mkdir(parents=True, exist_ok=True)
        save_config(demo, Path(demo.output_dir))
        seed_everything(cfg.seed)
        t0 = time.time()
        print(f"[loo] held out {held_out}: the demo's template and decoder from {train_subjects}")
        template_path, run_dir, timings = build_demo_decoder(demo, device)
        ckpt = run_dir / "checkpoints" / "latest.pth"
        checkpoints[held_out] = str(ckpt)
        (root / held_out / "loo.json").write_text(json.dumps({
            "held_out": held_out, "train_subjects": train_subjects, "checkpoint": str(ckpt),
            "template": str(template_path), **timings, "total_s": time.time() - t0}, indent=2))
        print(f"[loo] held out {held_out}: {ckpt} ({time.time() - t0:.0f} s)")
    return checkpoints
